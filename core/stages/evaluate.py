"""Evaluation: every metric, for the finetuned model and every compressed variant.

Each variant is measured through the runtime that serves it (:func:`measure_variant`);
:func:`write_evaluation` then turns the rows into the report: ``evaluation.json``, a
Markdown table with the Pareto frontiers in ``report.md``, and the plots
``quality_vs_size.png`` and ``quality_vs_speed.png``. The evaluate stage runs both in one
process; the sweep flow maps ``measure_variant`` over variants as Prefect tasks.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.config.schema import BASELINE, EvaluateParams
from unbottle.core.data.prompts import prompt_format_of
from unbottle.core.registry import Registry
from unbottle.core.stages.layout import StageResult, strategy_record
from unbottle.core.store.artifacts import atomic_dir, tree_hash, write_json_atomic, write_manifest

if TYPE_CHECKING:
    from unbottle.core.data.corpus import Corpus

log = logging.getLogger("unbottle.evaluate")
PRETRAINED = "pretrained"
EVALUATION = "evaluation.json"
REPORT = "report.md"


def variant_dirs(baseline: Path, variants_dir: Path) -> dict[str, Path]:
    """The finetuned model and every compressed variant, in params order."""
    from unbottle.core.stages.compress import VARIANTS_INDEX

    names = json.loads((variants_dir / VARIANTS_INDEX).read_text(encoding="utf-8"))
    return {BASELINE: baseline, **{name: variants_dir / name for name in names}}


def resolve_device(device: str) -> str:
    """``auto`` is a GPU when torch sees one, else the CPU."""
    if device != "auto":
        if device == "cuda":
            import torch

            from unbottle.core.contract.errors import ConfigError

            if not torch.cuda.is_available():
                raise ConfigError("evaluate.device: 'cuda' but torch sees no GPU; use cpu or auto")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_metrics(cfg: EvaluateParams, registry: Registry) -> list[tuple[str, Any]]:
    for ref in cfg.metrics:
        check_columns(registry.get("metric", ref.name))
    return [(ref.name, registry.create("metric", ref.name, ref.options)) for ref in cfg.metrics]


def check_columns(info: Any) -> None:
    """A metric's declared report columns must format a number, before any measuring."""
    from unbottle.core.contract.errors import PluginError
    from unbottle.core.contract.strategies import ReportColumn

    for key, column in (getattr(info.cls, "columns", None) or {}).items():
        where = f"{info.provider}: metric '{info.name}' column '{key}'"
        if not isinstance(column, ReportColumn):
            raise PluginError(f"{where} is {column!r}, not an unbottle.ReportColumn")
        try:
            column.format.format(0.5)
        except (ValueError, IndexError, KeyError) as e:
            raise PluginError(f"{where}: format {column.format!r} fails on a number: {e}") from e
        if column.direction not in (None, "lower", "higher"):
            raise PluginError(f"{where}: direction {column.direction!r}; allowed: lower, higher")


def check_shots(cfg: EvaluateParams, metrics: Sequence[tuple[str, Any]], pairs: int) -> None:
    """A metric with a ``shots`` option draws that many solved examples from the training
    pairs for each question: refuse more than there are, before measuring anything."""
    from unbottle.core.contract.errors import ConfigError

    for i, (_, metric) in enumerate(metrics):
        shots = getattr(getattr(metric, "config", None), "shots", 0) or 0
        if shots > pairs:
            raise ConfigError(
                f"evaluate.metrics[{i}].shots: {shots} is more than the {pairs} training pairs "
                f"in data.qa_train; use at most {pairs}"
            )


def measure_variant(
    model_dir: Path,
    metrics: Sequence[tuple[str, Any]],
    *,
    valid_text: str | Corpus,
    questions: list[dict[str, str]],
    seed: int,
    device: str = "cpu",
    label: str = "",
    prompt_format: Any = None,
    train_pairs: list[dict[str, str]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every metric on one model, in order: (row, samples). Refuses a damaged artifact.
    ``prompt_format``: how finetuning rendered prompts (see :func:`prompt_format_of`)."""
    from unbottle.core.models.runtimes import load_runner
    from unbottle.core.store.artifacts import verify_artifact

    manifest = verify_artifact(model_dir)
    runner = load_runner(model_dir, device)
    return measure_runner(
        runner,
        model_dir,
        metrics,
        fmt=manifest.get("format", runner.format),
        valid_text=valid_text,
        questions=questions,
        seed=seed,
        label=label,
        prompt_format=prompt_format,
        train_pairs=train_pairs,
    )


def measure_runner(
    runner: Any,
    model_dir: Path,
    metrics: Sequence[tuple[str, Any]],
    *,
    fmt: str,
    valid_text: str | Corpus,
    questions: list[dict[str, str]],
    seed: int,
    label: str = "",
    prompt_format: Any = None,
    train_pairs: list[dict[str, str]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every metric on a loaded model (``runner``, whose files are in ``model_dir``), in
    order: (row, samples). The deploy stage measures a bundle it wrote this way."""
    from unbottle.core.contract.strategies import EvalContext

    ctx = EvalContext(
        tokenizer=runner.tokenizer,
        valid_text=valid_text,
        questions=questions,
        model_dir=model_dir,
        seed=seed,
        prompt_format=prompt_format,
        train_pairs=list(train_pairs or []),
    )
    row: dict[str, Any] = {"format": fmt}
    for metric_name, metric in metrics:
        log.info("evaluate %s: %s", label or model_dir.name, metric_name)
        values = metric.measure(runner, ctx)
        row.update(values)
        ctx.measured.update(values)
    return row, ctx.samples


@dataclass(frozen=True)
class EvaluationInputs:
    """What the evaluate stage measures with (its params, held-out data, training pairs
    and seed), so the deploy stage measures a bundle it writes exactly the same way."""

    cfg: EvaluateParams
    valid_text: Path
    qa_test: Path
    qa_train: Path | None
    seed: int

    def setup(self, registry: Registry) -> list[tuple[str, Any]]:
        """The configured metrics, checked as the evaluate stage checks them, before any
        work."""
        from unbottle.core.data import prompts as task

        metrics = create_metrics(self.cfg, registry)
        check_shots(self.cfg, metrics, len(self._train_pairs()))
        task.read_pairs(self.qa_test, "data.qa_test")
        return metrics

    def hashes(self) -> dict[str, str]:
        """The content hashes of the data a measurement read, for a manifest."""
        files = {"valid_text": self.valid_text, "qa_test": self.qa_test}
        if self.qa_train is not None:
            files["qa_train"] = self.qa_train
        return {name: tree_hash(path) for name, path in files.items()}

    def _train_pairs(self) -> list[dict[str, str]]:
        from unbottle.core.data import prompts as task

        if self.qa_train is None:
            return []
        return task.read_pairs(self.qa_train, "data.qa_train")

    def measure(
        self,
        runner: Any,
        model_dir: Path,
        metrics: Sequence[tuple[str, Any]],
        *,
        prompt_format: Any,
        label: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(row, samples) of a loaded model, measured as the evaluate stage measures."""
        from unbottle.core.data import prompts as task
        from unbottle.core.data.corpus import Corpus

        return measure_runner(
            runner,
            model_dir,
            metrics,
            fmt=runner.format,
            valid_text=Corpus(self.valid_text, "data.valid_text"),
            questions=task.read_pairs(self.qa_test, "data.qa_test")[: self.cfg.max_questions],
            seed=self.seed,
            label=label,
            prompt_format=prompt_format,
            train_pairs=self._train_pairs(),
        )


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
    images_dir: Path | None = None,
    qa_train: Path | None = None,
    row_cache: Path | None = None,
) -> StageResult:
    """Measure the pretrained, finetuned and every compressed model and write the report.
    With ``row_cache``, a model whose row key is found there is not measured again."""
    from unbottle.core.data import prompts as task
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.store.artifacts import verify_artifact

    metrics = create_metrics(cfg, registry)
    # Read by each metric as far as it needs, never whole (unless a metric asks).
    held_out = Corpus(valid_text, "data.valid_text")
    questions = task.read_pairs(qa_test, "data.qa_test")[: cfg.max_questions]
    train_pairs = task.read_pairs(qa_train, "data.qa_train") if qa_train is not None else []
    check_shots(cfg, metrics, len(train_pairs))
    device = resolve_device(cfg.device)
    verify_artifact(variants_dir)
    # The pretrained model is measured too, as the reference finetuning must beat.
    targets = {PRETRAINED: pretrained, **variant_dirs(baseline, variants_dir)}
    for model_dir in targets.values():
        verify_artifact(model_dir)  # every input checked before the first measurement
    prompt_format = prompt_format_of(baseline)

    results, reused = measure_all(
        targets,
        metrics,
        valid_text=held_out,
        questions=questions,
        seed=seed,
        device=device,
        prompt_format=prompt_format,
        train_pairs=train_pairs,
        registry=registry,
        row_cache=row_cache,
    )
    result = write_evaluation(
        cfg,
        results,
        out_dir=out_dir,
        registry=registry,
        inputs={
            "pretrained": tree_hash(pretrained),
            "baseline": tree_hash(baseline),
            "variants": tree_hash(variants_dir),
            "valid_text": held_out.sha256,
            "qa_test": tree_hash(qa_test),
            **({"qa_train": tree_hash(qa_train)} if qa_train is not None else {}),
        },
        images_dir=images_dir,
    )
    if row_cache is not None:  # a run fact, kept with the timings (see is_timing)
        result.metrics["reused"] = reused
    return result


def row_key(
    model_dir: Path,
    metrics: Sequence[tuple[str, Any]],
    *,
    valid_text: str | Corpus,
    questions: list[dict[str, str]],
    seed: int,
    device: str,
    prompt_format: Any,
    registry: Registry,
    train_pairs: list[dict[str, str]] | None = None,
) -> str:
    """The key of one model's evaluation row: the model directory's content, every metric
    (name, validated options, distribution, source), the held-out data and the training
    pairs few-shot examples come from, seed, device, the prompt format and the evaluate
    stage's code."""
    from unbottle.core.data.corpus import Corpus
    from unbottle.core.store.cache import code_hashes, digest, strategy_identity
    from unbottle.core.store.fingerprint import STAGE_CODE
    from unbottle.core.store.provenance import package_version

    return digest(
        {
            "model": tree_hash(model_dir),
            "metrics": [
                strategy_identity(
                    registry.get("metric", name),
                    metric.config.model_dump(mode="json") if hasattr(metric, "config") else None,
                )
                for name, metric in metrics
            ],
            "valid_text": (
                valid_text if isinstance(valid_text, Corpus) else Corpus.of_text(valid_text)
            ).sha256,
            "questions": digest(questions),
            "train_pairs": digest(train_pairs or []),
            "seed": seed,
            "device": device,
            "prompt_format": prompt_format.record() if prompt_format is not None else None,
            "code": code_hashes(STAGE_CODE["evaluate"]),
            "unbottle": package_version("unbottle"),
        }
    )


def measure_all(
    targets: dict[str, Path],
    metrics: Sequence[tuple[str, Any]],
    *,
    valid_text: str | Corpus,
    questions: list[dict[str, str]],
    seed: int,
    device: str,
    prompt_format: Any,
    registry: Registry,
    train_pairs: list[dict[str, str]] | None = None,
    row_cache: Path | None = None,
) -> tuple[dict[str, tuple[dict[str, Any], dict[str, Any]]], list[str]]:
    """Every model's (row, samples), in order, and the names whose rows came from
    ``row_cache``: a row whose key (:func:`row_key`) is there is not measured again, and
    every row measured is stored there."""
    from unbottle.core.progress import progress_bar
    from unbottle.core.store.cache import RowCache

    cache = RowCache(row_cache) if row_cache is not None else None
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    reused: list[str] = []
    with progress_bar("evaluate", len(targets)) as advance:
        for name, model_dir in targets.items():
            key = None
            if cache is not None:
                key = row_key(
                    model_dir,
                    metrics,
                    valid_text=valid_text,
                    questions=questions,
                    seed=seed,
                    device=device,
                    prompt_format=prompt_format,
                    train_pairs=train_pairs,
                    registry=registry,
                )
                hit = cache.get(key)
                if hit is not None:
                    log.info(
                        "evaluate %s: unchanged (key %s), row reused from the cache, "
                        "timings included as they were measured then",
                        name,
                        key[:12],
                    )
                    results[name] = hit
                    reused.append(name)
                    advance()
                    continue
            results[name] = measure_variant(
                model_dir,
                metrics,
                valid_text=valid_text,
                questions=questions,
                seed=seed,
                device=device,
                label=name,
                prompt_format=prompt_format,
                train_pairs=train_pairs,
            )
            if cache is not None and key is not None:
                cache.put(key, *results[name])
            advance()
    return results, reused


def write_evaluation(
    cfg: EvaluateParams,
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    *,
    out_dir: Path,
    registry: Registry,
    inputs: dict[str, str],
    images_dir: Path | None = None,
    stage: str = "evaluate",
) -> StageResult:
    """Write the report of measured rows into ``out_dir`` (atomically); PNG copies named
    ``evaluate_<plot>.png`` go to ``images_dir`` too, for DVC's plots."""
    from unbottle.core.stages.layout import is_timing
    from unbottle.core.stages.report import (
        add_ratios,
        frontiers,
        markdown_table,
        plot_tradeoffs,
        plugin_columns,
        report_markdown,
        table_rows,
    )
    from unbottle.core.store.artifacts import write_text_atomic

    rows = {name: dict(row) for name, (row, _) in results.items()}
    samples = {name: s for name, (_, s) in results.items()}
    add_ratios(rows, rows.get(BASELINE, {}))
    candidates = [name for name in rows if name != PRETRAINED]
    # The frontiers stay out of the rows: the speed one moves with the machine's timings.
    fronts = frontiers(rows, candidates)
    extra = plugin_columns(registry.get("metric", ref.name).cls for ref in cfg.metrics)
    table = markdown_table(rows, fronts, extra)
    log.info("evaluation:\n%s", table)

    with atomic_dir(out_dir) as tmp:
        plots = plot_tradeoffs(rows, fronts, tmp, reference=PRETRAINED)
        write_json_atomic(
            tmp / EVALUATION,
            {
                "variants": rows,
                "order": list(rows),  # params order (JSON objects here are key-sorted)
                "frontiers": fronts,
                "table": table,
                "samples": samples,
            },
        )
        write_text_atomic(tmp / REPORT, report_markdown(table, fronts, plots, samples))
        write_manifest(
            tmp,
            stage=stage,
            config=cfg.model_dump(mode="json"),
            strategies={
                f"metric_{ref.name}": strategy_record(registry.get("metric", ref.name))
                for ref in cfg.metrics
            },
            inputs=inputs,
            metrics={  # what the model is, not how fast this machine ran it
                name: {k: v for k, v in row.items() if not is_timing(k)}
                for name, row in rows.items()
            },
        )
        # From the finished artifact before its swap (the runner swaps it after stamping).
        if images_dir is not None:
            images_dir.mkdir(parents=True, exist_ok=True)
            for plot in plots:
                copy = images_dir / f"{stage}_{plot.name}"
                partial = copy.with_name(f".{copy.name}.tmp")
                shutil.copyfile(tmp / plot.name, partial)
                partial.replace(copy)
    return StageResult(out_dir, {"variants": rows}, plots={f"{stage}_table": table_rows(rows)})


def example_question(evaluation_dir: Path) -> str | None:
    """The first held-out question the evaluation asked (from its accuracy samples)."""
    data = json.loads((evaluation_dir / EVALUATION).read_text(encoding="utf-8"))
    for per_metric in (data.get("samples") or {}).values():
        for sample in (per_metric or {}).get("accuracy") or []:
            if isinstance(sample, dict) and isinstance(sample.get("question"), str):
                return sample["question"]
    return None


def read_evaluation(evaluation_dir: Path) -> tuple[dict[str, Any], str]:
    """The rows (in params order) and the Markdown table an evaluate stage wrote."""
    from unbottle.core.store.artifacts import verify_artifact

    verify_artifact(evaluation_dir)
    data = json.loads((evaluation_dir / EVALUATION).read_text(encoding="utf-8"))
    rows = data["variants"]
    return {name: rows[name] for name in data.get("order", rows)}, data["table"]
