"""Run one stage by name: what both `unbottle stage NAME` (dvc.yaml) and the Prefect flow
call, so a stage behaves the same on either route."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from pathlib import Path

from unbottle.core.config.schema import Params
from unbottle.core.config.strategy_checks import check_stages_fit, check_strategies
from unbottle.core.contract.errors import echo
from unbottle.core.registry import Registry, get_registry
from unbottle.core.stages.layout import STAGES, Layout, StageResult, split_timings
from unbottle.core.stages.preflight import preflight
from unbottle.core.store.artifacts import (
    PendingSwap,
    json_text,
    swap_later,
    write_json_atomic,
    write_text_atomic,
)
from unbottle.core.store.cache import cache_root
from unbottle.core.store.cache_pruning import using_cache
from unbottle.core.store.locking import stage_lock, sweep_leftovers

log = logging.getLogger("unbottle.pipeline")

#: The columns of the plots dvc.yaml declares, for a stage that has no rows to write.
PLOT_COLUMNS: dict[str, tuple[str, ...]] = {
    "pretrain_loss": ("step", "loss"),
    "finetune_loss": ("step", "loss"),
}


def setup(
    params: Params, registry: Registry | None = None, stages: tuple[str, ...] = STAGES
) -> Registry:
    """Resolve and validate every strategy the params name, and that each of ``stages``
    can take what the stages before it make, before any work."""
    registry = registry or get_registry()
    check_strategies(params, registry)
    check_stages_fit(params, registry, stages)
    return registry


def run_stage(
    name: str,
    params: Params,
    layout: Layout,
    registry: Registry | None = None,
    *,
    force: bool = False,
) -> StageResult:
    """Run stage ``name`` unless its output is already current for these inputs."""
    from unbottle.core.contract.errors import ConfigError
    from unbottle.core.store import fingerprint

    if name not in STAGES:
        raise ConfigError(f"Unknown stage {echo(name)}. Stages: {', '.join(STAGES)}.")
    registry = setup(params, registry, stages=(name,))
    preflight(name, params, layout, registry)
    from unbottle.core.training.loop import is_main_process

    # Under torchrun every rank runs the stage and rank 0 alone writes: it alone locks.
    main = is_main_process()
    with (
        stage_lock(layout.artifacts, name) if main else contextlib.nullcontext(),
        using_cache(cache_root(layout.root)),  # `unbottle cache prune` waits for the stage
    ):
        if main:
            sweep_leftovers(layout.artifacts, name)
        stamp = fingerprint.fingerprint(name, params, layout, registry)
        out_dir, metrics_file = layout.artifact(name), layout.metrics_file(name)
        if not force and fingerprint.is_current(out_dir, stamp, metrics_file):
            log.info("%s is up to date (fingerprint %s), skipping", name, stamp[:12])
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
            return StageResult(out_dir, metrics, skipped=True)
        # The stage's artifact waits under its temporary name until it carries its
        # fingerprint and the hash of its metrics, and the metrics are written: a kill at
        # any moment leaves an artifact that is whole and stamped, or none that is new.
        with swap_later(out_dir) as pending:
            started = time.perf_counter()
            result = _run(name, params, layout, registry)
            if main:
                wall_s = round(time.perf_counter() - started, 3)
                _record(name, result, stamp, layout, pending, wall_s)
    if main:
        # Tracking and notification plugins see the finished, recorded output.
        registry.hook.after_stage(stage=name, artifact_dir=result.out_dir, metrics=result.metrics)
    return result


def _record(
    name: str,
    result: StageResult,
    stamp: str,
    layout: Layout,
    pending: PendingSwap,
    wall_s: float,
) -> None:
    """Stamp the stage's artifact, write its metrics, timings and plots, swap it in."""
    from unbottle.core.store import fingerprint

    quality, timing = split_timings(result.metrics)
    timing["wall_s"] = wall_s
    metrics_text = json_text(quality)
    if pending.tmp is not None:
        pending.stamp(fingerprint=stamp, **fingerprint.metrics_stamp(metrics_text))
    write_text_atomic(layout.metrics_file(name), metrics_text)
    write_json_atomic(layout.timing_file(name), timing)
    for plot, rows in result.plots.items():
        write_text_atomic(layout.plot_file(plot), _csv(rows, PLOT_COLUMNS.get(plot)))
    if pending.tmp is not None:
        pending.commit()
    else:  # a stage that wrote its artifact without atomic_dir
        fingerprint.record(result.out_dir, stamp)


def _run(name: str, params: Params, layout: Layout, registry: Registry) -> StageResult:
    data = params.data
    path = layout.resolve
    if name == "pretrain":
        from unbottle.core.stages.pretrain import pretrain

        result = pretrain(
            params.pretrain,
            train_text=path(data.train_text),
            out_dir=layout.artifact("pretrain"),
            seed=params.seed,
            registry=registry,
            root=layout.root,
            valid_text=path(data.valid_text),
            token_cache=cache_root(layout.root) / "tokens",
        )
    elif name == "finetune":
        from unbottle.core.stages.finetune import finetune

        result = finetune(
            params.finetune,
            base=layout.artifact("pretrain"),
            qa_train=path(data.qa_train),
            out_dir=layout.artifact("finetune"),
            seed=params.seed,
            registry=registry,
        )
    elif name == "compress":
        from unbottle.core.stages.compress import compress

        result = compress(
            params.compress,
            model=layout.artifact("finetune"),
            train_text=path(data.train_text),
            out_dir=layout.artifact("compress"),
            seed=params.seed,
            registry=registry,
            variant_cache=cache_root(layout.root) / "variants",
            token_cache=cache_root(layout.root) / "tokens",
            qa_train=path(data.qa_train),  # calibration windows, by calibration.source
        )
    elif name == "evaluate":
        from unbottle.core.stages.evaluate import evaluate

        result = evaluate(
            params.evaluate,
            pretrained=layout.artifact("pretrain"),
            baseline=layout.artifact("finetune"),
            variants_dir=layout.artifact("compress"),
            valid_text=path(data.valid_text),
            qa_test=path(data.qa_test),
            qa_train=path(data.qa_train),  # few-shot examples
            out_dir=layout.artifact("evaluate"),
            seed=params.seed,
            registry=registry,
            images_dir=layout.metrics_dir,  # the report's PNGs, for `dvc plots show`
            row_cache=cache_root(layout.root) / "evaluations",
        )
    else:
        from unbottle.core.stages.deploy import deploy
        from unbottle.core.stages.evaluate import EvaluationInputs

        result = deploy(
            params.deploy,
            baseline=layout.artifact("finetune"),
            variants_dir=layout.artifact("compress"),
            evaluation=layout.artifact("evaluate"),
            out_dir=layout.artifact("deploy"),
            registry=registry,
            # A target that writes a new model measures it as the evaluate stage would.
            measure_with=EvaluationInputs(
                params.evaluate,
                valid_text=path(data.valid_text),
                qa_test=path(data.qa_test),
                qa_train=path(data.qa_train),
                seed=params.seed,
            ),
        )
    return result


def _csv(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """Rows as CSV; with no rows, the header alone (a loss curve of a model that trained
    no steps is still the file dvc.yaml declares)."""
    out = io.StringIO()
    fieldnames = list(rows[0]) if rows else list(columns or ())
    writer = csv.DictWriter(out, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def workspace(root: Path | None = None) -> Layout:
    return Layout(Path(root or Path.cwd()).resolve())
