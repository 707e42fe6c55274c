"""Structured outputs: a grammar every generated token must keep to.

A request may ask for JSON (any object, or one that a JSON schema describes), a regular
expression, one of a list of strings, or a context-free grammar. Before each token is
chosen, the tokens that could not continue a text of the grammar get a logit of minus
infinity; the grammar's end ends the sequence.

The grammars are compiled and matched by llguidance (guidance-ai/llguidance, the engine
behind vLLM's ``guidance`` backend and llama.cpp's ``LLGUIDANCE`` option): an Earley parser
over a lexer that computes the whole vocabulary's mask in a fraction of a millisecond.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: What a request may constrain its output to, by the name vLLM's ``structured_outputs``
#: gives it: a JSON schema, a regular expression (Rust's syntax), a list of strings, a
#: Lark or GBNF grammar, or any JSON object.
KINDS = ("json", "regex", "choice", "grammar", "json_object")

#: What JSON may hold between two of its tokens, unless a request says otherwise: nothing,
#: a space, or a new line and an indent. Any run of whitespace (JSON's own rule, and
#: llguidance's and vLLM's default) lets a weak model write blank lines until it runs out of
#: tokens; seen on the test model, whose answers all ended by length.
JSON_WHITESPACE = r"[ ]?|\n[ \t]{0,16}"


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message says why."""


def compile_grammar(kind: str, spec: Any, *, whitespace: str = JSON_WHITESPACE) -> str:
    """llguidance's serialized grammar for ``spec`` of ``kind`` (one of ``KINDS``).

    ``whitespace``: a regular expression for what JSON may hold between its tokens ("":
    nothing).
    """
    import llguidance

    if kind not in KINDS:
        raise GrammarError(f"{kind}: not a kind of structured output ({', '.join(KINDS)})")
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else spec
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema is an object")
            options: dict[str, Any] = (
                {"whitespace_pattern": whitespace} if whitespace else {"whitespace_flexible": False}
            )
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        if kind == "choice":
            if not (
                isinstance(spec, list) and spec and all(isinstance(c, str) and c for c in spec)
            ):
                raise GrammarError("choice is a non-empty list of non-empty strings")
            return llguidance.grammar_from("choice", spec)
        if not isinstance(spec, str) or not spec.strip():
            raise GrammarError(f"{kind} is a non-empty string")
        # "grammar": Lark as llguidance reads it, or llama.cpp's GBNF, converted.
        return llguidance.grammar_from("regex" if kind == "regex" else "grammar", spec)
    except GrammarError:
        raise
    except ValueError as e:  # bad JSON, or a GBNF grammar that does not convert
        raise GrammarError(_one_line(str(e))) from None


class Grammars:
    """One tokenizer's side of llguidance: checks grammars and makes their matchers.

    llguidance's tokenizer takes about a third of a second to build from a 49k
    vocabulary, so it is built once, on the first request that needs it.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = sorted(t for t in eos_token_ids if t >= 0)
        self._lock = threading.Lock()
        self._built: Any = None

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._built is None:
                try:
                    self._built = self._build()
                except GrammarError as e:
                    self._built = e  # refused once, refused alike without a rebuild
            if isinstance(self._built, GrammarError):
                raise self._built
            return self._built

    def _build(self) -> Any:
        """llguidance's tokenizer, checked: the bytes it gives a probe's tokens must be the
        text the tokenizer decodes them to, or every mask would be wrong."""
        import copy

        import llguidance

        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError("structured outputs need a fast (Rust) tokenizer")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        probe = "Hello world, it is 3 pm: ünïcode — ✓\n\t{}"
        ids = self._tokenizer(probe, add_special_tokens=False)["input_ids"]
        # A sentencepiece decoder drops the first piece's space; llguidance keeps it.
        decoded = self._tokenizer.decode(ids).encode().lstrip(b" ")

        def reads_right(built: Any) -> bool:
            return built.decode_bytes(ids).lstrip(b" ") == decoded

        built = llguidance.LLTokenizer(backend.to_str(), eos_token=self._eos or None)
        if not reads_right(built) and _byte_level(backend):
            # transformers' tokenizer of a GGUF file decodes byte-level pieces through a
            # sequence that starts with sentencepiece's byte fallback, which llguidance
            # takes for a sentencepiece vocabulary: give it the byte-level decoder alone.
            from tokenizers import decoders

            backend.decoder = decoders.ByteLevel()
            built = llguidance.LLTokenizer(backend.to_str(), eos_token=self._eos or None)
        if not reads_right(built):
            raise GrammarError(
                "structured outputs: llguidance reads this tokenizer's tokens as other bytes "
                f"({built.decode_bytes(ids)[:40]!r} for {decoded[:40]!r})"
            )
        return built

    def check(self, grammar: str) -> None:
        """GrammarError naming the first problem of ``grammar``, if it has one."""
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._llg_tokenizer()
        )
        if failed:
            raise GrammarError(_one_line(messages[0]))

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher of ``grammar`` for one sequence."""
        import llguidance

        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        return matcher


def _byte_level(backend: Any) -> bool:
    """Whether a tokenizers decoder is, or holds, GPT-2's byte-level decoder."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def _one_line(message: str, most: int = 300) -> str:
    """llguidance's message (a regex error spans lines, with a caret) on one line."""
    line = " ".join(message.split())
    return line if len(line) <= most else line[: most - 3] + "..."


def mask_refused(matcher: Any, scores: torch.Tensor) -> torch.Tensor:
    """A copy of (V,) ``scores`` with minus infinity for every token ``matcher`` refuses
    next; ids past the tokenizer's vocabulary (a model's padded rows) are refused too.

    In numpy, on one thread: torch would split these vocabulary-long operations across
    its threads, and a split can wait on a core that the server's other work holds."""
    import numpy as np
    import torch

    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    width = scores.shape[-1]
    allowed = np.unpackbits(bits, count=width, bitorder="little").view(bool)
    if not allowed.any():
        raise GrammarError(f"no token continues the grammar: {matcher.get_error()}")
    values = scores.detach().float().numpy().copy()
    values[~allowed] = -np.inf
    return torch.from_numpy(values)
