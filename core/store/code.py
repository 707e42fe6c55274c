"""Which files make up a piece of code, and one hash of them.

Fingerprints and DVC's plugin locks hash code by *package*, not by the file that defines a
class: a strategy whose helper module changes must rerun its stage even when the module
that defines the strategy did not change (and its version did not move).

- A third-party strategy's code is the whole top-level package its class lives in
  (``unbottle_lion`` for ``unbottle_lion.Lion``: ``__init__.py``, ``optim.py`` and
  every other file in it).
- A built-in strategy's code is its plugin's module or package under ``unbottle.plugins``
  (``unbottle.plugins.pruning`` for every pruner): hashing all of ``unbottle`` would
  rerun every stage on any edit. The core code a stage runs is hashed by subpackage,
  separately (``unbottle.core.store.fingerprint.STAGE_CODE``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import cache
from pathlib import Path

#: Files that are built from the sources, not sources: editing nothing changes them.
_SKIPPED_DIRS = {"__pycache__"}
_SKIPPED_SUFFIXES = (".pyc", ".pyo")


def code_unit(module_name: str) -> str:
    """The dotted name whose files are the code of ``module_name`` (see the module doc)."""
    parts = module_name.split(".")
    if parts[0] != "unbottle":
        return parts[0]
    if parts[:2] == ["unbottle", "plugins"] and len(parts) >= 3:
        return ".".join(parts[:3])
    return module_name


def code_path(module_name: str) -> Path | None:
    """The folder of a package, or the file of a module; None when it has no files."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin and spec.has_location else None


def source_files(path: Path) -> list[Path]:
    """A module's file, or every file of a package folder (not its compiled caches)."""
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not _SKIPPED_DIRS.intersection(p.relative_to(path).parts)
        and not p.name.endswith(_SKIPPED_SUFFIXES)
    )


def code_hash(path: Path | None) -> str:
    """One sha256 over the relative names and contents of the code's files."""
    if path is None or not path.exists():
        return "unknown"
    digest = hashlib.sha256()
    base = path if path.is_dir() else path.parent
    for file in source_files(path):
        digest.update(f"{file.relative_to(base).as_posix()}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def module_code_hash(module_name: str) -> str:
    """The hash of the code unit that ``module_name`` belongs to."""
    return code_hash(code_path(code_unit(module_name)))


def strategy_code_hash(cls: type) -> str:
    """The hash of every file of the package that provides strategy class ``cls``."""
    return module_code_hash(cls.__module__)


@cache
def _resolved(path: Path) -> Path:
    return path.resolve()


def contains(root: Path, file: str | Path) -> bool:
    """True when ``file`` is ``root`` or lies inside the folder ``root``."""
    try:
        candidate = _resolved(Path(file))
    except OSError:
        return False
    root = _resolved(root)
    return candidate == root or root in candidate.parents
