"""Where an artifact came from: code version, data version, packages and device.

Timestamps are left out on purpose: two runs with the same inputs on the same checkout
should write the same manifest, so DVC and the content-hash caches see the same artifact.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

_PACKAGES = ("unbottle", "torch", "transformers", "accelerate", "optimum", "onnxruntime")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> str:
    """The device training and inference run on, as a person would name it."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu: {_cpu_name()}, {os.cpu_count()} threads"


#: What a pipeline run itself writes into a workspace: changes there do not make the
#: checkout "dirty" (a committed tree stays clean while the pipeline runs in it).
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "artifacts")


def workspace_root(where: Path) -> Path:
    """The workspace an artifact lives in: the folder holding its ``artifacts/``."""
    where = Path(where).resolve()
    for folder in [where, *where.parents]:
        if folder.name == "artifacts":
            return folder.parent
    return where


def git_state(where: Path) -> dict[str, Any]:
    """The commit of the checkout holding ``where`` and whether tracked files differ from
    it, not counting the pipeline's own outputs (:data:`PIPELINE_OUTPUTS`)."""

    root = workspace_root(where)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    excluded = [f":(exclude){name}" for name in PIPELINE_OUTPUTS]  # relative to root
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded)
    return {"commit": commit, "dirty": bool(changes)}


def dvc_data_hash(where: Path) -> str | None:
    """The md5 that ``data.dvc`` records, read from the nearest DVC project above ``where``."""
    import yaml

    for folder in [where, *where.parents]:
        if (folder / ".dvc").is_dir():
            spec = folder / "data.dvc"
            if not spec.is_file():
                return None
            outs = (yaml.safe_load(spec.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
            return outs[0].get("md5")
    return None


@cache
def cpu_kernels() -> str:
    """Which vectorised kernels torch runs on this CPU ("AVX2", "AVX512", ...), as
    detected or as ``ATEN_CPU_CAPABILITY`` pins it: float sums round differently from one
    to another, so results made with different ones differ (docs/operations.md)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in _PACKAGES},
        "machine": platform.machine(),
        "device": device(),
        "cpu_kernels": cpu_kernels(),
    }


def provenance(where: Path) -> dict[str, Any]:
    """Everything a manifest records about the run that made an artifact under ``where``."""
    where = Path(where).resolve()
    return {**environment(), "git": git_state(where), "dvc_data": dvc_data_hash(where)}
