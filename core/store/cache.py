"""Content-addressed caches of single results: one compressed variant, one evaluation row.

A stage's fingerprint (:mod:`unbottle.core.store.fingerprint`) decides whether the whole
stage reruns; once it does, these caches decide what inside it is redone. Each compressed
variant and each model's evaluation row is stored under a key that hashes everything it
depends on, so changing one variant's option recomputes that variant alone, and a sweep
of ten variants that changes one does not redo nine.

- :class:`VariantCache`: a variant's directory, under the sha256 of its recipe (every
  step's strategy, validated options, distribution version and source), the finetuned
  model, the training text and pairs the calibration windows come from, the calibration
  settings, the seed and the code of the compress stage; a float variant (no quantize
  step) also serves a later recipe that starts with its steps. Entries are filled by
  hard links where the file system allows (files are only ever replaced, never written
  in place, so a link is never changed under the other name) and by copies elsewhere.
- :class:`RowCache`: one model's evaluation row and samples, under the sha256 of the
  model directory's content, the metric configs, the held-out data, the seed, the device,
  the prompt format and the metric and stage code.

Every entry records the hashes of what it holds, checked before use: a damaged entry is
logged and ignored, never reused. Entries live under ``.cache/unbottle/`` in the workspace
(beside the sweep's prefix cache); deleting that folder only costs recomputation, and
`unbottle cache prune` removes entries by last use or size (:mod:`.cache_pruning`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from unbottle.core.store.artifacts import (
    atomic_dir,
    file_hashes,
    write_json_atomic,
)
from unbottle.core.store.cache_pruning import mark_used

log = logging.getLogger("unbottle.cache")

#: The workspace's cache folder (the sweep flow keeps its prefixes there too).
CACHE_DIR = Path(".cache") / "unbottle"
ENTRY_RECORD = "cache-entry.json"


def cache_root(workspace: Path) -> Path:
    return Path(workspace) / CACHE_DIR


def digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def code_hashes(modules: tuple[str, ...]) -> dict[str, str]:
    """Code hashes of modules or subpackages given as dotted names under ``unbottle``
    (a subpackage: every file in it), as the stage fingerprints hash them."""
    from unbottle.core.store.code import module_code_hash

    return {name: module_code_hash(f"unbottle.{name}") for name in modules}


def strategy_identity(info: Any, options: Any) -> dict[str, Any]:
    """What a strategy contributes to a key: its name, validated options, the distribution
    that provides it and the hash of its whole package's code (a change in a helper
    module of the plugin invalidates the entry, as it reruns the stage)."""
    from unbottle.core.store.code import strategy_code_hash

    return {
        "name": info.name,
        "options": options,
        "distribution": f"{info.distribution} {info.version}",
        "source": strategy_code_hash(info.cls),
    }


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into the (existing, empty) ``dst``; copy where the
    file system refuses links (another device, no link support)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


class VariantCache:
    """Compressed variants' directories by key: ``<root>/<key>/`` holds the variant's
    files and ``cache-entry.json`` (the key, the stage metrics the variant reported and the
    sha256 of every file)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, key: str, *, quiet: bool = False) -> dict[str, Any] | None:
        """The entry's record when it is intact, else None (a damaged one is logged,
        unless ``quiet``)."""
        entry = self.root / key
        record_file = entry / ENTRY_RECORD
        if not record_file.is_file():
            return None
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        if record.get("key") != key or record.get("files") != file_hashes(
            entry, exclude=(ENTRY_RECORD,)
        ):
            if not quiet:
                log.warning("cache: variant entry %s is damaged; not reusing it", key[:12])
            return None
        mark_used(record_file)
        return record

    def restore(self, key: str, dst: Path) -> None:
        """Fill the empty directory ``dst`` with the entry's files (links or copies)."""
        entry = self.root / key
        dst.mkdir(parents=True, exist_ok=True)
        _link_tree(entry, dst)
        (dst / ENTRY_RECORD).unlink()

    def put(
        self,
        key: str,
        variant_dir: Path,
        metrics: dict[str, Any],
        float_prefix: str | None = None,
    ) -> None:
        """Store a finished variant directory; a failure to cache never fails the stage.
        ``float_prefix``: for a float variant (no quantize step), the prefix key of its
        whole recipe, under which a later recipe that starts with it finds it
        (:meth:`find_float`)."""
        try:
            with atomic_dir(self.root / key) as tmp:
                _link_tree(variant_dir, tmp)
                record = {
                    "key": key,
                    "metrics": metrics,
                    "files": file_hashes(tmp, exclude=(ENTRY_RECORD,)),
                }
                if float_prefix is not None:
                    record["float_prefix"] = float_prefix
                write_json_atomic(tmp / ENTRY_RECORD, record)
        except OSError as e:
            log.warning("cache: could not store variant %s: %s", key[:12], e)

    def find_float(self, prefix_key: str) -> Path | None:
        """The intact entry of a float variant whose recipe is the prefix ``prefix_key``,
        or None. The records are scanned (a few hundred small files at most) rather than
        indexed, so no index can outlive an entry that `unbottle cache prune` removed."""
        if not self.root.is_dir():
            return None
        for record_file in sorted(self.root.glob(f"*/{ENTRY_RECORD}")):
            try:
                record = json.loads(record_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            key = record.get("key")
            # A damaged entry is no prefix; its own variant's lookup says it is damaged.
            if (
                record.get("float_prefix") == prefix_key
                and key
                and self.get(key, quiet=True) is not None
            ):
                return self.root / key
        return None


class RowCache:
    """Evaluation rows by key: ``<root>/<key>.json`` holds the row, the samples and the
    sha256 of both."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            body = {"row": record["row"], "samples": record["samples"]}
            intact = record.get("key") == key and record.get("sha256") == digest(body)
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            log.warning("cache: evaluation row %s is damaged; measuring again", key[:12])
            return None
        mark_used(path)
        return record["row"], record["samples"]

    def put(self, key: str, row: dict[str, Any], samples: dict[str, Any]) -> None:
        body = {"row": row, "samples": samples}
        try:
            write_json_atomic(
                self.root / f"{key}.json", {"key": key, "sha256": digest(body), **body}
            )
        except OSError as e:
            log.warning("cache: could not store evaluation row %s: %s", key[:12], e)
