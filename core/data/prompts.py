"""The question-answering task: one prompt format shared by finetune and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

from unbottle.core.contract.errors import DataError, shorten
from unbottle.core.store.artifacts import read_utf8


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def target(answer: str) -> str:
    return f" {answer}"


def normalize(text: str) -> str:
    """What exact match compares: the first line, without surrounding space or a final '.'."""
    return text.strip().split("\n", 1)[0].strip().rstrip(".").strip().lower()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def read_pairs(path: Path, what: str) -> list[dict[str, str]]:
    """Read question/answer pairs from JSONL: one {"question": ..., "answer": ...} a line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{what}: {shorten(path)} does not exist (run `unbottle data demo` or fix params)"
        )
    pairs: list[dict[str, str]] = []
    for lineno, line in enumerate(read_utf8(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{what}: {path}:{lineno} is not valid JSON") from None
        if not isinstance(obj, dict) or not all(
            isinstance(obj.get(k), str) and obj.get(k) for k in ("question", "answer")
        ):
            raise DataError(f'{what}: {path}:{lineno} needs string fields "question" and "answer"')
        pairs.append(obj)
    if not pairs:
        raise DataError(f"{what}: {path} has no question/answer pairs")
    return pairs
