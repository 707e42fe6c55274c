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
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics_file(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"

    def timing_file(self, stage: str) -> Path:
        """Timings live apart from quality metrics: they differ on every run."""
        return self.metrics_dir / f"{stage}_timing.json"

    def plot_file(self, name: str) -> Path:
        return self.metrics_dir / f"{name}.csv"

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path


def strategy_record(info: Any) -> dict[str, str]:
    """How a manifest names a strategy: its name and the distribution that provided it."""
    return {"name": info.name, "distribution": info.distribution, "version": info.version}
