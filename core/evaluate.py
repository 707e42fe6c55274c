"""Evaluation: every metric, for the finetuned model and every compressed variant."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unbottle.core.artifacts import atomic_dir, tree_hash, write_json_atomic, write_manifest
from unbottle.core.config import BASELINE, EvaluateParams
from unbottle.core.registry import Registry
from unbottle.core.stage import StageResult, strategy_record

log = logging.getLogger("unbottle.evaluate")
PRETRAINED = "pretrained"
EVALUATION = "evaluation.json"
REPORT = "report.md"
# Metrics that depend on the machine's speed; kept out of the manifest (they vary per run).
TIMING_KEYS = ("ttft_s", "latency_p50_s", "latency_p95_s", "decode_tokens_per_s", "tokens_per_s")


def variant_dirs(baseline: Path, variants_dir: Path) -> dict[str, Path]:
    """The finetuned model and every compressed variant, in params order."""
    from unbottle.core.compress import VARIANTS_INDEX

    names = json.loads((variants_dir / VARIANTS_INDEX).read_text(encoding="utf-8"))
    return {BASELINE: baseline, **{name: variants_dir / name for name in names}}


def evaluate(
    cfg: EvaluateParams,
    *,
    pretrained: Path,
    baseline: Path,
    variants_dir: Path,
    valid_text: Path,
    qa_test: Path,
    out_dir: Path,
    seed: int,
    registry: Registry,
) -> StageResult:
    from unbottle.core import task
    from unbottle.core.artifacts import verify_artifact
    from unbottle.core.modeling import read_text
    from unbottle.core.report import add_ratios, markdown_table
    from unbottle.core.runtime import load_runner
    from unbottle.core.strategies import EvalContext

    metrics = [(ref.name, registry.create("metric", ref.name, ref.options)) for ref in cfg.metrics]
    text = read_text(valid_text, "data.valid_text")
    questions = task.read_pairs(qa_test, "data.qa_test")[: cfg.max_questions]
    verify_artifact(variants_dir)
    # The pretrained model is measured too, as the reference finetuning must beat.
    targets = {PRETRAINED: pretrained, **variant_dirs(baseline, variants_dir)}

    rows: dict[str, dict[str, Any]] = {}
    samples: dict[str, Any] = {}
    for name, model_dir in targets.items():
        manifest = verify_artifact(model_dir)
        runner = load_runner(model_dir)
        ctx = EvalContext(
            tokenizer=runner.tokenizer,
            valid_text=text,
            questions=questions,
            model_dir=model_dir,
            seed=seed,
        )
        row: dict[str, Any] = {"format": manifest.get("format", runner.format)}
        for metric_name, metric in metrics:
            log.info("evaluate %s: %s", name, metric_name)
            row.update(metric.measure(runner, ctx))
        rows[name] = row
        samples[name] = ctx.samples
    add_ratios(rows, BASELINE)
    table = markdown_table(rows)
    log.info("evaluation:\n%s", table)

    with atomic_dir(out_dir) as tmp:
        write_json_atomic(tmp / EVALUATION, {"variants": rows, "samples": samples})
        (tmp / REPORT).write_text(f"# Evaluation\n\n{table}\n", encoding="utf-8")
        write_manifest(
            tmp,
            stage="evaluate",
            config=cfg.model_dump(mode="json"),
            strategies={
                f"metric_{n}": strategy_record(registry.get("metric", n)) for n, _ in metrics
            },
            inputs={
                "pretrained": tree_hash(pretrained),
                "baseline": tree_hash(baseline),
                "variants": tree_hash(variants_dir),
                "valid_text": tree_hash(valid_text),
                "qa_test": tree_hash(qa_test),
            },
            metrics={
                name: {k: v for k, v in row.items() if k not in TIMING_KEYS}
                for name, row in rows.items()
            },
        )
    return StageResult(out_dir, {"variants": rows}, plots={})


def read_evaluation(evaluation_dir: Path) -> tuple[dict[str, Any], str]:
    """The rows and the Markdown table an evaluate stage wrote."""
    from unbottle.core.artifacts import verify_artifact

    verify_artifact(evaluation_dir)
    data = json.loads((evaluation_dir / EVALUATION).read_text(encoding="utf-8"))
    report = (evaluation_dir / REPORT).read_text(encoding="utf-8")
    return data["variants"], report.split("\n\n", 1)[1].strip()
