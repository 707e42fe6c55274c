"""Optional metric ``lm-eval``: lm-evaluation-harness tasks from local files.

Registered by the built-in metrics plugin; the harness itself is imported only when the
metric is named in params (and its absence is a config error before any work).

Users' existing task definitions (lm-eval's YAML format) run against every variant,
through the same runner the other metrics use, so an int8 ONNX model is scored in ONNX
Runtime. Tasks come only from ``include_path`` (the harness's built-in tasks are not
indexed) and their data from local files, e.g.::

    task: people_qa
    dataset_path: json
    dataset_kwargs: {data_files: {test: data/qa/test.jsonl}}
    test_split: test
    output_type: generate_until
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_target: " {{answer}}"
    generation_kwargs: {until: ["\\n"], max_gen_toks: 8}
    metric_list: [{metric: exact_match, ignore_case: true, ignore_punctuation: true}]

Nothing is downloaded: relative ``data_files`` resolve against the working directory (the
workspace), and the Hugging Face hub is kept offline while the harness runs.

Install the harness with ``pip install 'unbottle[lm-eval]'`` (lm-eval needs ``datasets``,
whose releases cap ``fsspec``; see docs/evaluation.md). Each task metric is reported as
``lm_eval_<task>_<metric>``; the harness's standard errors are dropped.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from unbottle import ConfigError, EvalContext, StrategyConfig


def _score_batch(runner: Any, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation after its context, and whether greedy decoding
    would have produced it. One forward pass for the batch (right padding is harmless to
    a causal model: no position reads the padding after it)."""
    import torch

    seqs = [(ctx + cont)[-(runner.context + 1) :] for ctx, cont in pairs]
    width = max(len(s) - 1 for s in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        batch[i, : len(s) - 1] = torch.tensor(s[:-1])
    logprobs = torch.log_softmax(runner.logits(batch).double(), dim=-1)  # (B, T, V)
    out = []
    for i, ((_, cont), s) in enumerate(zip(pairs, seqs, strict=True)):
        n, end = len(cont), len(s) - 1
        target = torch.tensor(s[-n:])  # (n,)
        rows = logprobs[i, end - n : end]  # (n, V): predictions of the continuation
        total = float(rows.gather(1, target[:, None]).sum())
        out.append((total, bool((rows.argmax(-1) == target).all())))
    return out


def harness_model(runner: Any, tokenizer: Any, batch_size: int) -> Any:
    """An lm-eval ``LM`` that scores and generates through an unbottle model runner."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-eval's HF model does: trailing spaces belong to the continuation, and the
        # continuation's tokens are those of the whole text after the context's.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = encode(context + continuation), encode(context)
        return (ctx or [eos]), whole[len(ctx) :]

    def score(pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), batch_size):
            results.extend(_score_batch(runner, pairs[start : start + batch_size]))
        return results

    class RunnerLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return score([pair(*r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            totals = []
            for r in requests:
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        encode(r.args[0]), eos, runner.context, context_len=1
                    )
                ]
                totals.append(sum(ll for ll, _ in score(windows)))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            tokenizer.padding_side = "left"  # generation continues from the right edge
            texts = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kwargs.get("max_gen_toks", 256))
                ids = encode(context)[-max(1, runner.context - new) :]
                enc = tokenizer.pad({"input_ids": [ids]}, return_tensors="pt")
                out = runner.generate(
                    enc["input_ids"], enc["attention_mask"], new, eos_token_id=eos
                )
                text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop, 1)[0]
                texts.append(text)
            return texts

    return RunnerLM()


def _metric_name(task: str, key: str) -> str:
    metric, _, filter_name = key.partition(",")
    parts = ["lm_eval", task, metric] + ([filter_name] if filter_name not in ("", "none") else [])
    return re.sub(r"[^a-z0-9_]+", "_", "_".join(parts).lower()).strip("_")


class LmEvalTasks:
    """Run lm-evaluation-harness tasks defined in local YAML files."""

    name = "lm-eval"

    class Config(StrategyConfig):
        tasks: list[str] = Field(min_length=1)
        include_path: Path  # a directory (or file) of task YAMLs
        limit: int | None = Field(None, ge=1)  # documents per task (all when unset)
        num_fewshot: int | None = Field(None, ge=0)
        batch_size: int = Field(16, ge=1)

        @field_validator("include_path")
        @classmethod
        def _exists(cls, path: Path) -> Path:
            if importlib.util.find_spec("lm_eval") is None:
                raise ValueError(
                    "lm-evaluation-harness is not installed; pip install 'unbottle[lm-eval]'"
                )
            try:
                exists = path.exists()
            except OSError as e:  # a name the system refuses (too long): one line too
                raise ValueError(f"cannot read {str(path)!r}: {e.strerror}") from None
            if not exists:
                raise ValueError(f"{str(path)!r} does not exist")
            return path

    def __init__(self, config: Config) -> None:
        self.config = config

    def measure(self, model: Any, ctx: EvalContext) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        c = self.config
        os.environ["HF_HUB_OFFLINE"] = "1"  # local tasks only: never reach for the hub
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        manager = TaskManager(include_path=str(c.include_path), include_defaults=False)
        unknown = [t for t in c.tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(
                f"lm-eval: no task {', '.join(map(repr, unknown))} under {c.include_path}; "
                f"defined there: {', '.join(sorted(manager.all_tasks)) or 'none'}"
            )
        results = simple_evaluate(
            model=harness_model(model, ctx.tokenizer, c.batch_size),
            tasks=list(c.tasks),
            task_manager=manager,
            num_fewshot=c.num_fewshot,
            limit=c.limit,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=ctx.seed,
            numpy_random_seed=ctx.seed,
            torch_random_seed=ctx.seed,
            fewshot_random_seed=ctx.seed,
        )
        out: dict[str, float] = {}
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                if "_stderr" in key or isinstance(value, bool):
                    continue
                if isinstance(value, int | float):
                    out[_metric_name(task, key)] = float(value)
        return out
