"""Where an artifact came from: package versions and the device, without timestamps.

Timestamps are left out on purpose: two runs with the same inputs should write the same
manifest, so DVC sees the same artifact.
"""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

_PACKAGES = ("unbottle", "torch", "transformers", "accelerate", "optimum", "onnxruntime")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@cache
def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in _PACKAGES},
        "machine": platform.machine(),
    }
