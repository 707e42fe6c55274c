"""Compression: each variant is a recipe, an ordered list of prune/distill/quantize steps.

Every variant starts from the finetuned model. Prune and distill steps work on the float
model in memory; a quantize step, always the last, writes the quantized model. Each step
is recorded in the variant's manifest with its strategy, options, metrics and time.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from unbottle.core.artifacts import atomic_dir, tree_hash, write_json_atomic, write_manifest
from unbottle.core.config import CompressParams
from unbottle.core.registry import Registry
from unbottle.core.stage import StageResult, strategy_record
from unbottle.core.strategies import CompressContext

log = logging.getLogger("unbottle.compress")
VARIANTS_INDEX = "variants.json"


def calibration_batches(stream: Any, samples: int, seq_len: int, seed: int) -> list[Any]:
    """``samples`` windows of ``seq_len`` tokens, each (1, T), drawn reproducibly."""
    import torch

    from unbottle.core.errors import DataError
    from unbottle.core.training import rng

    if stream.numel() < seq_len + 1:
        raise DataError(
            f"compress.calibration: the training text has {stream.numel()} tokens, fewer "
            f"than one window of {seq_len}; lower compress.calibration.seq_len"
        )
    starts = torch.randint(0, stream.numel() - seq_len, (samples,), generator=rng(seed + 1))
    return [stream[s : s + seq_len].unsqueeze(0) for s in starts.tolist()]


def compress(
    cfg: CompressParams,
    *,
    model: Path,
    train_text: Path,
    out_dir: Path,
    seed: int,
    registry: Registry,
) -> StageResult:
    from unbottle.core.artifacts import verify_artifact
    from unbottle.core.modeling import encode_stream, load_model, read_text, save_model

    verify_artifact(model)
    # Resolve every step's strategy (and validate its options) before any work.
    plans = {
        name: [(step, registry.create(step.kind, step.strategy, step.options)) for step in steps]
        for name, steps in cfg.variants.items()
    }
    base, tokenizer = load_model(model)
    stream = encode_stream(tokenizer, read_text(train_text, "data.train_text"))
    calibration = calibration_batches(
        stream, cfg.calibration.samples, cfg.calibration.seq_len, seed
    )

    metrics: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for name, plan in plans.items():
            variant_dir = tmp / name
            variant_dir.mkdir()
            ctx = CompressContext(
                tokenizer=tokenizer,
                calibration=calibration,
                train_ids=stream,
                seed=seed,
                work_dir=tmp,
            )
            current = copy.deepcopy(base)
            records: list[dict[str, Any]] = []
            fmt = "hf"  # until a quantize step (always the last) writes its own format
            quantized = False
            for i, (step, strategy) in enumerate(plan):
                log.info("compress %s: step %d/%d %s", name, i + 1, len(plan), step.describe())
                start = time.perf_counter()
                if step.action == "prune":
                    step_metrics = strategy.prune(current, ctx)
                elif step.action == "distill":
                    current, step_metrics = strategy.distill(current, ctx)
                else:
                    with tempfile.TemporaryDirectory(dir=tmp) as float_dir:
                        save_model(current, tokenizer, Path(float_dir))
                        step_metrics = strategy.quantize(Path(float_dir), variant_dir, ctx)
                    fmt = strategy.output_format
                    quantized = True
                records.append(
                    {
                        "step": i + 1,
                        "action": step.action,
                        "strategy": strategy_record(registry.get(step.kind, step.strategy)),
                        "options": strategy.config.model_dump(mode="json"),
                        "metrics": step_metrics,
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                )
            if not quantized:
                save_model(current, tokenizer, variant_dir)
            write_manifest(
                variant_dir,
                stage="compress",
                config={"variant": name, "calibration": cfg.calibration.model_dump()},
                strategies={f"step{r['step']}_{r['action']}": r["strategy"] for r in records},
                inputs={"model": tree_hash(model), "train_text": tree_hash(train_text)},
                metrics={
                    f"step{r['step']}_{k}": v for r in records for k, v in r["metrics"].items()
                },
                extra={
                    "format": fmt,
                    "steps": [{k: v for k, v in r.items() if k != "seconds"} for r in records],
                },
            )
            metrics[name] = {
                "format": fmt,
                "seconds": round(sum(r["seconds"] for r in records), 3),
                **{f"{r['action']}_{k}": v for r in records for k, v in r["metrics"].items()},
            }
        write_json_atomic(tmp / VARIANTS_INDEX, list(plans))
        write_manifest(
            tmp,
            stage="compress",
            config=cfg.model_dump(mode="json"),
            strategies={},
            inputs={"model": tree_hash(model), "train_text": tree_hash(train_text)},
            metrics={},
            extra={"variants": list(plans)},
        )
    return StageResult(out_dir, metrics)
