"""What every stage returns, and where the pipeline keeps its files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "finetune", "compress", "evaluate", "deploy")


@dataclass
class StageResult:
    """A stage's output directory, its metrics, and rows for plots (e.g. a loss curve)."""

    out_dir: Path
    metrics: dict[str, Any]
    plots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: bool = False  # the output was already current, nothing ran


@dataclass(frozen=True)
class Layout:
    """The workspace's paths; dvc.yaml names the same ones."""

    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def artifact(self, stage: str) -> Path:
        return self.artifacts / stage

    @property
    def checkpoints(self) -> Path:
        """Where training runs keep their checkpoints unless ``train.checkpoint_dir`` says
        otherwise: ``<stage>/<run key>/`` in it."""
        from unbottle.core.training.checkpoint import FOLDER

        return self.artifacts / FOLDER

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics_file(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    def timing_file(self, stage: str) -> Path:
        """Timings live apart from quality metrics: they differ on every run."""
        return self.metrics_dir / f"{stage}_timing.json"

    def plot_file(self, name: str) -> Path:
        return self.metrics_dir / f"{name}.csv"

    def plugin_lock_file(self, stage: str) -> Path:
        """The strategies a stage uses and their code hashes, for DVC (dvc.yaml's
        ``plugins`` stage writes it; the stage depends on it)."""
        return self.root / "locks" / f"{stage}.json"

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path


def strategy_record(info: Any) -> dict[str, str]:
    """How a manifest names a strategy: its name and the distribution that provided it."""
    return {"name": info.name, "distribution": info.distribution, "version": info.version}


def is_timing(key: str) -> bool:
    """Measurements of the machine or of one run (speed, peak memory, where a run resumed),
    not of the model: they vary run to run, so they stay out of the reproducible metrics
    and out of manifests (a resumed run then writes the same artifact as an uninterrupted
    one)."""
    return (
        key.endswith(("_s", "_seconds"))
        or "per_s" in key
        or key == "seconds"
        or key == "resumed_from_step"
        or key == "reused"  # a result taken from a cache rather than computed in this run
        or key.startswith(("peak_", "roofline_"))  # roofline_pct: speed over bandwidth
    )


def split_timings(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split (nested) metrics into (quality, timing); the quality part is reproducible."""
    quality: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            q, t = split_timings(value)
            if q:
                quality[key] = q
            if t:
                timing[key] = t
        elif is_timing(key):
            timing[key] = value
        else:
            quality[key] = value
    return quality, timing
