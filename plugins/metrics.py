"""Built-in evaluation metrics: perplexity, accuracy, size and speed.

Each measures a variant through its own runtime (a :class:`ModelRunner`), so an int8
ONNX model is timed in ONNX Runtime, not in torch.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from pydantic import Field

from unbottle import EvalContext, StrategyConfig, hookimpl
from unbottle.core.errors import DataError


class Perplexity:
    """Perplexity of the held-out text, over sliding windows.

    Every token after the first window's start is scored exactly once, with up to
    ``window - stride`` tokens of context carried over from the previous window.
    """

    name = "perplexity"

    class Config(StrategyConfig):
        window: int | None = Field(None, ge=8)  # default: the model's context, at most 512
        stride: int | None = Field(None, ge=1)  # default: half the window

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        import torch

        from unbottle.core.modeling import encode_stream

        ids = encode_stream(ctx.tokenizer, ctx.valid_text)
        window = self.config.window or min(model.context, 512)
        window = min(window, model.context)
        stride = min(self.config.stride or max(1, window // 2), window)
        if ids.numel() < window + 1:
            raise DataError(
                f"perplexity: the held-out text has {ids.numel()} tokens, fewer than the "
                f"window of {window} + 1; give more text or a smaller window"
            )
        nll, counted, scored_until = 0.0, 0, 0
        for start in range(0, ids.numel() - 1, stride):
            end = min(start + window, ids.numel())
            chunk = ids[start:end].unsqueeze(0)  # (1, T)
            logits = model.logits(chunk)[0, :-1]  # (T-1, V): predictions for chunk[1:]
            targets = chunk[0, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.double(), targets, reduction="none"
            )  # (T-1,)
            first_new = max(scored_until - start - 1, 0)  # skip tokens scored already
            nll += float(losses[first_new:].sum())
            counted += int(losses.numel() - first_new)
            scored_until = end
            if end == ids.numel():
                break
        return {"perplexity": math.exp(nll / counted), "perplexity_tokens": counted}


class Accuracy:
    """Exact match of greedy answers to the held-out questions."""

    name = "accuracy"

    class Config(StrategyConfig):
        batch_size: int = Field(16, ge=1)
        max_new_tokens: int = Field(8, ge=1, le=256)
        samples: int = Field(5, ge=0)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        from unbottle.core import task

        tokenizer = ctx.tokenizer
        tokenizer.padding_side = "left"  # generation continues from the right edge
        correct = 0
        samples: list[dict[str, Any]] = []
        questions = ctx.questions
        for start in range(0, len(questions), self.config.batch_size):
            batch = questions[start : start + self.config.batch_size]
            enc = tokenizer(
                [task.prompt(q["question"]) for q in batch], return_tensors="pt", padding=True
            )
            out = model.generate(
                enc["input_ids"],
                enc["attention_mask"],
                self.config.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for pair, text in zip(batch, texts, strict=True):
                ok = task.exact_match(text, pair["answer"])
                correct += ok
                if len(samples) < self.config.samples:
                    samples.append(
                        {
                            "question": pair["question"],
                            "answer": pair["answer"],
                            "prediction": task.normalize(text),
                            "correct": ok,
                        }
                    )
        ctx.samples["accuracy"] = samples
        return {"accuracy": correct / len(questions), "questions": len(questions)}


class Size:
    """Bytes on disk, stored weight elements and how many of them are nonzero."""

    name = "size"

    class Config(StrategyConfig):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        from unbottle.core.artifacts import MANIFEST

        weights = [
            p
            for p in ctx.model_dir.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".onnx", ".data") and p.name != MANIFEST
        ]
        total, nonzero = model.parameter_counts()
        return {
            "size_bytes": sum(p.stat().st_size for p in weights),
            "parameters": total,
            "nonzero_parameters": nonzero,
            "sparsity": 1 - nonzero / total if total else 0.0,
        }


class Speed:
    """Greedy decoding latency and throughput at batch 1, warm-up excluded."""

    name = "speed"

    class Config(StrategyConfig):
        prompt_tokens: int = Field(32, ge=1)
        new_tokens: int = Field(32, ge=2)
        repeats: int = Field(5, ge=1)
        warmup: int = Field(1, ge=0)

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        import torch

        from unbottle.core.modeling import encode_stream

        ids = encode_stream(ctx.tokenizer, ctx.valid_text)[: self.config.prompt_tokens]
        prompt = ids.unsqueeze(0)  # (1, P)
        mask = torch.ones_like(prompt)
        n_new = self.config.new_tokens
        if prompt.shape[1] + n_new > model.context:
            raise DataError(
                f"speed: prompt_tokens + new_tokens = {prompt.shape[1] + n_new} exceeds the "
                f"model's context of {model.context}"
            )

        def timed(max_new: int) -> float:
            start = time.perf_counter()
            model.generate(prompt, mask, max_new, min_new_tokens=max_new, eos_token_id=None)
            return time.perf_counter() - start

        for _ in range(self.config.warmup):
            timed(n_new)
        first = [timed(1) for _ in range(self.config.repeats)]
        full = sorted(timed(n_new) for _ in range(self.config.repeats))
        ttft = statistics.median(first)
        p50 = statistics.median(full)
        p95 = full[min(len(full) - 1, math.ceil(0.95 * len(full)) - 1)]
        return {
            "ttft_s": ttft,
            "latency_p50_s": p50,
            "latency_p95_s": p95,
            "decode_tokens_per_s": (n_new - 1) / max(p50 - ttft, 1e-9),
            "tokens_per_s": n_new / p50,
        }


@hookimpl
def register_metrics(register):
    register(Perplexity)
    register(Accuracy)
    register(Size)
    register(Speed)
