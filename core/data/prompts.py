"""The question-answering task: the records users give, and the one prompt format that
finetune, evaluate and the server's chat endpoint share.

Records (JSONL, one a line) come in the three common shapes:

- ``{"question": ..., "answer": ...}``;
- ``{"prompt": ..., "completion": ...}`` (TRL's prompt-completion format);
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the OpenAI/TRL conversational
  format), ending with an assistant turn.

Each is read as a pair ``{"question", "answer"}`` (the last user turn and the last
assistant turn) that keeps its conversation, so metrics that only need the pair still work.

A :class:`PromptFormat` turns a pair into tokens in one of two formats:

- ``chat``: the tokenizer's own chat template (``apply_chat_template``), exactly what
  ``/v1/chat/completions`` renders, with an optional system prompt; the loss covers the
  assistant turns only.
- ``completion``: ``Question: <q>\\nAnswer: <a><eos>`` for question/answer pairs, the prompt
  and completion verbatim for prompt/completion records (the server's chat endpoint uses
  the same ``Question:``/``Answer:`` form for a model without a chat template).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unbottle.core.contract.errors import DataError
from unbottle.core.data.demo import missing_data_hint
from unbottle.core.store.artifacts import read_jsonl, read_manifest

CHAT, COMPLETION = "chat", "completion"
ROLES = ("system", "user", "assistant")


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


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _pair(obj: Any, where: str) -> dict[str, Any]:
    """One record as a pair that keeps its shape (and its conversation)."""
    if isinstance(obj, dict) and _text(obj.get("question")) and _text(obj.get("answer")):
        return {"question": obj["question"], "answer": obj["answer"]}
    if isinstance(obj, dict) and _text(obj.get("prompt")) and _text(obj.get("completion")):
        return {"question": obj["prompt"], "answer": obj["completion"], "shape": "prompt"}
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        messages = obj["messages"]
        for turn in messages:
            if not (
                isinstance(turn, dict)
                and turn.get("role") in ROLES
                and isinstance(turn.get("content"), str)
            ):
                raise DataError(
                    f"{where}: every message needs a role ({', '.join(ROLES)}) and a string content"
                )
        users = [t for t in messages if t["role"] == "user"]
        if not users or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise DataError(
                f"{where}: messages need a user turn and must end with a non-empty "
                "assistant turn (the answer to learn or to check)"
            )
        return {
            "question": users[-1]["content"],
            "answer": messages[-1]["content"],
            "messages": [{"role": t["role"], "content": t["content"]} for t in messages],
        }
    raise DataError(
        f'{where} needs string fields "question" and "answer", "prompt" and "completion", '
        'or a "messages" list'
    )


def read_pairs(path: Path, what: str) -> list[dict[str, Any]]:
    """Read records in any of the three shapes as pairs (see the module docstring)."""
    pairs = [
        _pair(obj, f"{what}: {path}:{lineno}")
        for lineno, obj in read_jsonl(path, what, if_missing=missing_data_hint)
    ]
    if not pairs:
        raise DataError(f"{what}: {path} has no question/answer pairs")
    return pairs


@dataclass(frozen=True)
class PromptFormat:
    """How a pair becomes tokens; finetune records it, evaluate and the server reuse it."""

    kind: str = COMPLETION  # CHAT or COMPLETION
    system_prompt: str | None = None

    @classmethod
    def resolve(cls, requested: str, system_prompt: str | None, tokenizer: Any) -> PromptFormat:
        """``auto`` is chat when the tokenizer has a chat template, completion otherwise."""
        from unbottle.core.contract.errors import ConfigError

        has_template = getattr(tokenizer, "chat_template", None) is not None
        kind = (CHAT if has_template else COMPLETION) if requested == "auto" else requested
        if kind == CHAT and not has_template:
            raise ConfigError(
                "finetune.format: chat needs a tokenizer with a chat template and this model's "
                "has none; use completion (or auto)"
            )
        if kind == COMPLETION and system_prompt is not None:
            raise ConfigError(
                "finetune.system_prompt: a system prompt needs finetune.format: chat; the "
                "completion format has no place for it"
            )
        return cls(kind=kind, system_prompt=system_prompt)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> PromptFormat:
        """The format a finetune manifest recorded; completion for older artifacts."""
        return cls(**record) if record else cls()

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "system_prompt": self.system_prompt}

    def conversation(self, pair: dict[str, Any]) -> list[dict[str, str]]:
        messages = pair.get("messages") or [
            {"role": "user", "content": pair["question"]},
            {"role": "assistant", "content": pair["answer"]},
        ]
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def _completion_texts(self, pair: dict[str, Any]) -> tuple[str, str]:
        if pair.get("messages") and [t["role"] for t in pair["messages"]] != [
            "user",
            "assistant",
        ]:
            raise DataError(
                f"the conversation {pair['question']!r} has system or several turns, which "
                "only finetune.format: chat can render"
            )
        if pair.get("shape") == "prompt":
            return pair["question"], pair["answer"]
        return prompt(pair["question"]), target(pair["answer"])

    def prompt_text(self, tokenizer: Any, pair: dict[str, Any]) -> str:
        """What the model is given to answer the pair's last question."""
        if self.kind == CHAT:
            return tokenizer.apply_chat_template(
                self.conversation(pair)[:-1], tokenize=False, add_generation_prompt=True
            )
        return self._completion_texts(pair)[0]

    def few_shot_text(
        self, tokenizer: Any, pair: dict[str, Any], examples: list[dict[str, Any]]
    ) -> str:
        """The pair's prompt after solved ``examples``: earlier user/assistant turns in
        chat, ``Question:``/``Answer:`` blocks before it in completion (as
        :func:`few_shot_prompt`); with no examples, exactly :meth:`prompt_text`."""
        if not examples:
            return self.prompt_text(tokenizer, pair)
        if self.kind == CHAT:
            solved = [
                turn
                for e in examples
                for turn in (
                    {"role": "user", "content": e["question"]},
                    {"role": "assistant", "content": e["answer"]},
                )
            ]
            asked = self.conversation(pair)[:-1]
            system = asked[:1] if asked[0]["role"] == "system" else []
            messages = [*system, *solved, *asked[len(system) :]]
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        solved = ["".join(self._completion_texts(e)) for e in examples]
        return SHOT_SEPARATOR.join([*solved, self.prompt_text(tokenizer, pair)])

    def segments(self, tokenizer: Any, pair: dict[str, Any]) -> list[tuple[list[int], bool]]:
        """The pair's training tokens as (ids, learned) runs: the loss covers the answers
        (every assistant turn in chat, ending with the template's end-of-turn token; the
        completion and EOS otherwise)."""

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        if self.kind == COMPLETION:
            before, answer = self._completion_texts(pair)
            return [(ids(before), False), ([*ids(answer), tokenizer.eos_token_id], True)]
        messages = self.conversation(pair)
        runs: list[tuple[list[int], bool]] = []
        rendered = ""
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            # The template renders a prefix of a conversation as a prefix of the whole
            # (true of ChatML and the common templates), so each assistant turn is the text
            # between the generation prompt before it and the rendering up to it.
            before = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (before.startswith(rendered) and upto.startswith(before)):
                raise DataError(
                    "finetune.format: chat: the tokenizer's chat template does not render a "
                    "conversation's beginning as a prefix of the whole; use completion"
                )
            runs += [(ids(before[len(rendered) :]), False), (ids(upto[len(before) :]), True)]
            rendered = upto
        return runs


def prompt_format_of(finetuned: Path) -> PromptFormat:
    """The prompt format the finetune artifact recorded: every model is asked, and the
    compressors calibrated, the way finetuning rendered the pairs and the deployed
    model's chat endpoint will render them."""
    return PromptFormat.from_record(read_manifest(finetuned).get("prompt_format"))
