"""The question-answering task: one prompt format shared by finetune and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

from unbottle.core.contract.errors import DataError


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def target(answer: str) -> str:
    return f" {answer}"


#: What separates solved examples from each other and from the question in a few-shot
#: prompt (finetuning saw one pair at a time, each ending in EOS).
SHOT_SEPARATOR = "\n\n"


def few_shot_prompt(question: str, examples: list[dict[str, str]]) -> str:
    """``question``'s prompt after solved ``examples``, each in the finetuning format
    (``prompt(q) + target(a)``); with no examples, exactly ``prompt(question)``."""
    solved = [prompt(e["question"]) + target(e["answer"]) for e in examples]
    return SHOT_SEPARATOR.join([*solved, prompt(question)])


def choose_shots(
    pool: list[dict[str, str]], question: str, k: int, seed: int, index: int
) -> list[dict[str, str]]:
    """``k`` solved examples from ``pool`` for the ``index``-th held-out ``question``:
    drawn by a generator seeded from (seed, index), never the question itself."""
    import random

    candidates = [pair for pair in pool if normalize(pair["question"]) != normalize(question)]
    if k > len(candidates):
        raise DataError(
            f"{k} shots: only {len(candidates)} training pairs differ from the question "
            f"{question!r}; lower shots"
        )
    return random.Random(f"{seed}:{index}").sample(candidates, k)


def normalize(text: str) -> str:
    """What exact match compares: the first line, without surrounding space or a final '.'."""
    return text.strip().split("\n", 1)[0].strip().rstrip(".").strip().lower()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def read_pairs(path: Path, what: str) -> list[dict[str, str]]:
    """Read question/answer pairs from JSONL: one {"question": ..., "answer": ...} a line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {path} does not exist (run `unbottle data demo` or fix params)")
    pairs: list[dict[str, str]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{what}: {path}:{lineno} is not valid JSON") from None
        if not isinstance(obj, dict) or not all(
            isinstance(obj.get(k), str) and obj.get(k) for k in ("question", "answer")
        ):
            raise DataError(f'{what}: {path}:{lineno} needs string fields "question" and "answer"')
        pairs.append(obj)
    if not pairs:
        raise DataError(f"{what}: {path} has no question/answer pairs")
    return pairs
