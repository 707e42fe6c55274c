"""The end of a stage that makes a model: save it, its tokenizer and its manifest.

Pretrain (trained or from a source) and finetune end the same way; this is that end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unbottle.core.stages.layout import split_timings, strategy_record
from unbottle.core.store.artifacts import atomic_dir, write_manifest

if TYPE_CHECKING:
    from unbottle.core.config.schema import TrainParams
    from unbottle.core.registry import Registry
    from unbottle.core.training.checkpoint import CheckpointStore

log = logging.getLogger("unbottle.stages")


def save_model_artifact(
    out_dir: Path,
    model: Any,
    tokenizer: Any,
    *,
    stage: str,
    config: Any,
    strategies: dict[str, dict[str, str]],
    inputs: dict[str, str],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    finalize: Callable[[Any, Path], Any] | None = None,
) -> None:
    """Write model, tokenizer and ``manifest.json`` as one atomic directory ``out_dir``.

    Call it on the main process only. ``finalize(model, tmp)`` gives the model to save
    (a finetune method merges its adapter there, and may write files of its own).
    """
    from unbottle.core.models.loading import save_model

    with atomic_dir(out_dir) as tmp:
        if finalize is not None:
            model = finalize(model, tmp)
        save_model(model, tokenizer, tmp)
        write_manifest(
            tmp,
            stage=stage,
            config=config,
            strategies=strategies,
            inputs=inputs,
            metrics=metrics,
            extra=extra,
        )


def save_trained_model(
    out_dir: Path,
    model: Any,
    tokenizer: Any,
    *,
    stage: str,
    config: Any,
    strategies: list[tuple[str, str]],
    train: TrainParams,
    registry: Registry,
    inputs: dict[str, str],
    metrics: dict[str, Any],
    checkpoints: CheckpointStore | None,
    extra: dict[str, Any] | None = None,
    finalize: Callable[[Any, Path], Any] | None = None,
) -> None:
    """The end of a training stage, on every process: the main process writes the
    artifact and clears the run's checkpoints (unless ``train.clear_checkpoints`` is
    false), the others wait for it.

    The manifest names the stage's own ``strategies`` (kind, name) and the optimizer and
    parallelism of ``train``; its metrics leave out the timings (they are not results).
    """
    from unbottle.core.training.loop import barrier, is_main_process

    if is_main_process():  # under DDP every process trained; one writes
        save_model_artifact(
            out_dir,
            model,
            tokenizer,
            stage=stage,
            config=config,
            strategies={
                **{kind: strategy_record(registry.get(kind, name)) for kind, name in strategies},
                "optimizer": strategy_record(registry.get("optimizer", train.optimizer.name)),
                "parallelism": strategy_record(registry.get("parallelism", train.parallelism.name)),
            },
            inputs=inputs,
            metrics=split_timings(metrics)[0],
            extra=extra,
            finalize=finalize,
        )
        if checkpoints is not None and train.clear_checkpoints:
            checkpoints.clear()  # the artifact is whole: the run's checkpoints are not needed
        elif checkpoints is not None:
            log.info("%s: kept its checkpoints in %s", stage, checkpoints.dir)
    barrier()
