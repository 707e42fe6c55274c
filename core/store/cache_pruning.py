"""What the workspace cache holds, and pruning it by last use or size.

``.cache/unbottle/`` grows with every corpus, tokenizer, variant and evaluated model: a
token file is 2 bytes a token, a variant as large as the model. Nothing in it is needed,
only work saved, so it may be pruned at any time but while a stage or sweep is using it.

Each kind of entry is one thing a cache lookup takes or leaves whole:

- ``tokens``: a trained tokenizer (``<key>.tokenizer.json``) or a corpus's token ids
  (``<key>.tokens`` and its record ``<key>.json``), each with its lock file;
- ``variants``: a compressed variant's directory;
- ``evaluations``: one model's evaluation row;
- ``prefixes``: a float model after the first steps of a sweep's recipe.

An entry's last use is the newest modification time of its files: a lookup that reuses
an entry touches its record (:func:`mark_used`), so pruning by age removes what no run
has used lately. A variant's files are hard links to the compress artifact's where the
file system allows, so removing the entry frees only what no artifact also holds:
:class:`CacheEntry` counts those bytes apart (``shared``).

Every stage and sweep task holds a shared lock on ``.cache/unbottle/.in-use`` while it
runs (:func:`using_cache`); pruning takes it exclusively, so it never removes an entry
under a run that is reading it, and is refused in one line while one runs.

The training checkpoints a workspace holds (``artifacts/.checkpoints/<stage>/<run key>/``)
are listed and pruned with its cache, as one more kind, :data:`CHECKPOINTS`: a stage
deletes its run's once the artifact is written, so those left are of runs stopped,
refused or told to keep them (``clear_checkpoints: false``), each as large as the model
and its optimizer state. They too are only saved work: a rerun of the same run resumes
from them, any other trains from its start. Their last use is their last write, and the
same lock keeps pruning away from a stage that is writing or resuming them. The runs in a
``train.checkpoint_dir`` that params name are listed as :data:`CHECKPOINT_DIR`, and never
pruned: that lock covers this workspace's stages only, and such a folder may be shared.

The cache that every workspace shares (``$UNBOTTLE_CACHE_DIR``, default
``~/.cache/unbottle``) holds one kind, :data:`SHARED_KINDS`: ``gguf``, the float
conversion of a GGUF ``pretrain.source`` (a folder named by the file's sha256, as large
as the model in float32). It is listed and pruned the same way, with its own lock, which
the pretrain stage holds while it reads a conversion.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from unbottle.core.contract.errors import ConfigError, LockedError
from unbottle.core.store.locking import lock_alone_or_not_at_all

#: The kinds of entry, each a folder of the workspace cache.
KINDS = ("tokens", "variants", "evaluations", "prefixes")
#: A workspace's training checkpoints, one entry per run, kept outside the cache folder.
CHECKPOINTS = "checkpoints"
#: The runs in a folder that params name as a ``train.checkpoint_dir``: listed, never
#: pruned (another workspace, or another node's, may be writing there).
CHECKPOINT_DIR = "checkpoint_dir"
#: The kinds of entry of the cache every workspace shares.
SHARED_KINDS = ("gguf",)
IN_USE = ".in-use"
_KEY = re.compile(r"\.?([0-9a-f]{64})")
_RUN_KEY = re.compile(r"[0-9a-f]{16}")  # a run's folder: its run key's first 16 digits
_STEP = re.compile(r"\.?step-\d{6,}(\.partial)?")
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    key: str
    paths: tuple[Path, ...]
    size: int  # bytes of its files
    shared: int  # of those, bytes also linked from outside the entry (an artifact's)
    last_used: float  # seconds since the epoch
    #: Whose checkpoints these are, where the path does not say (a checkpoint_dir's runs).
    owner: str = ""

    @property
    def what(self) -> str:
        """The entry in words: a tokens entry is a tokenizer or a corpus's token ids."""
        if self.kind == "tokens":
            names = [p.name for p in self.paths]
            return "tokenizer" if any(n.endswith(".tokenizer.json") for n in names) else "token ids"
        if self.kind == CHECKPOINTS:  # the folder of a run is <stage>/<run key>
            return f"{self.paths[0].parent.name} checkpoints"
        if self.kind == CHECKPOINT_DIR:
            return f"{self.owner} checkpoints"
        names = {"variants": "variant", "evaluations": "evaluation row", "gguf": "GGUF conversion"}
        return names.get(self.kind, "prefix")

    @property
    def frees(self) -> int:
        """Bytes that removing the entry gives back to the disk."""
        return self.size - self.shared

    def remove(self) -> None:
        for path in self.paths:
            if path.is_dir() and not path.is_symlink():
                # Renamed first, so that the entry disappears at once and whole.
                doomed = path.with_name(f".{path.name}.pruned-{os.getpid()}")
                os.replace(path, doomed)
                shutil.rmtree(doomed)
            else:
                path.unlink(missing_ok=True)


def mark_used(record: Path) -> None:
    """Record a reuse of the entry whose record file is ``record`` (its last use)."""
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(record)


@contextlib.contextmanager
def using_cache(cache: Path) -> Iterator[None]:
    """Hold a shared lock on the cache for the block: pruning waits for no one and is
    refused while any holder runs. Many runs may hold it at once.

    A cache this process cannot write (a read-only mount of conversions made elsewhere)
    still serves: the lock is then taken on the lock file opened read-only, or not at all
    where there is no lock file."""
    import fcntl

    fd = _open_lock_file(cache)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _open_lock_file(cache: Path) -> int | None:
    """The cache's lock file, made if need be; opened read-only where the cache cannot be
    written; None where it can neither be made nor found."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return os.open(cache / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        pass
    try:
        return os.open(cache / IN_USE, os.O_RDONLY)
    except OSError:
        return None


@contextlib.contextmanager
def _alone(cache: Path, user: str) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_alone_or_not_at_all(fd):
            raise LockedError(
                f"cache: a {user} is using {cache}; prune it when the run has finished"
            )
        yield
    finally:
        os.close(fd)


def cache_entries(
    cache: Path, kinds: tuple[str, ...] = KINDS, checkpoints: Path | None = None
) -> list[CacheEntry]:
    """Every entry of the cache ``cache`` (a workspace's, or with :data:`SHARED_KINDS` the
    shared one), by kind, then oldest use first; then, given a workspace's
    ``artifacts/.checkpoints`` as ``checkpoints``, its runs' checkpoints."""
    entries: list[CacheEntry] = []
    for kind in kinds:
        folder = cache / kind
        if not folder.is_dir():
            continue
        groups: dict[str, list[Path]] = {}
        for path in folder.iterdir():
            # An entry's files and folders are named by its key (a tokens entry has
            # several: the ids, their record, the lock, a dead writer's leftover).
            match = _KEY.match(path.name)
            key = match.group(1) if match else path.name
            groups.setdefault(key, []).append(path)
        entries += sorted(
            (_entry(kind, key, paths) for key, paths in groups.items()),
            key=lambda e: e.last_used,
        )
    if checkpoints is not None:
        entries += checkpoint_entries(checkpoints)
    return entries


def checkpoint_entries(root: Path) -> list[CacheEntry]:
    """The checkpoints under ``root``, one entry per run (``<stage>/<run key>/``, keyed by
    the run key's 16 hex digits), oldest write first."""
    runs = (folder for folder in Path(root).glob("*/*") if folder.is_dir())
    return sorted((_entry(CHECKPOINTS, f.name, [f]) for f in runs), key=lambda e: e.last_used)


def checkpoint_dir_entries(root: Path, owner: str) -> list[CacheEntry]:
    """The runs in a ``train.checkpoint_dir`` (``<dir>/<run key>/``, the stages that name
    it being ``owner``), oldest write first. Only folders named like a run key that hold
    a checkpoint count: the folder may hold other things of the user's."""
    runs = [
        folder
        for folder in (Path(root).iterdir() if Path(root).is_dir() else ())
        if folder.is_dir()
        and _RUN_KEY.fullmatch(folder.name)
        and any(_STEP.fullmatch(step.name) and step.is_dir() for step in folder.iterdir())
    ]
    entries = [replace(_entry(CHECKPOINT_DIR, f.name, [f]), owner=owner) for f in runs]
    return sorted(entries, key=lambda e: e.last_used)


def _entry(kind: str, key: str, paths: list[Path]) -> CacheEntry:
    size = shared = 0
    last_used = 0.0
    for path in paths:
        for file in _files(path):
            try:
                stat = file.stat()
            except FileNotFoundError:  # removed meanwhile (a lookup replacing a damaged one)
                continue
            size += stat.st_size
            if stat.st_nlink > 1:
                shared += stat.st_size
            if not file.name.endswith(".lock"):  # opening a lock is no use of the entry
                last_used = max(last_used, stat.st_mtime)
    return CacheEntry(kind, key, tuple(sorted(paths)), size, shared, last_used)


def _files(path: Path) -> Iterable[Path]:
    if path.is_dir() and not path.is_symlink():
        return (p for p in path.rglob("*") if not p.is_dir())
    return (path,)


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``2w``, ``90m``, ``45s`` in seconds."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(
            f"--older-than: {text!r} is not an age; give a number and a unit, s, m, h, d "
            "or w (e.g. 30d)"
        )
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_size(text: str) -> int:
    """``20GB``, ``500MiB``, ``0`` in bytes (pydantic's ``ByteSize``)."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise ConfigError(
            f"--max-size: {text!r} is not a size; give bytes or a number and a unit, "
            "e.g. 20GB, 500MiB"
        ) from None


def to_prune(
    entries: list[CacheEntry],
    *,
    older_than: float | None = None,
    max_size: int | None = None,
    now: float | None = None,
) -> list[CacheEntry]:
    """The entries to remove: those unused for more than ``older_than`` seconds, then the
    least recently used of the rest until what remains holds at most ``max_size`` bytes
    of its own (bytes shared with artifacts are not the cache's to give back)."""
    now = time.time() if now is None else now
    doomed = [e for e in entries if older_than is not None and now - e.last_used > older_than]
    if max_size is not None:
        kept = sorted((e for e in entries if e not in doomed), key=lambda e: e.last_used)
        held = sum(e.frees for e in kept)
        for entry in kept:
            if held <= max_size:
                break
            doomed.append(entry)
            held -= entry.frees
    return doomed


def prune_cache(
    cache: Path,
    *,
    older_than: float | None = None,
    max_size: int | None = None,
    dry_run: bool = False,
    kinds: tuple[str, ...] = KINDS,
    checkpoints: Path | None = None,
) -> list[CacheEntry]:
    """Remove the entries of ``kinds`` (and the runs' checkpoints under ``checkpoints``,
    a workspace's ``artifacts/.checkpoints``) that :func:`to_prune` picks, unless
    ``dry_run``; return them. Refused (:class:`LockedError`) while a run uses the cache."""
    if older_than is None and max_size is None:
        raise ConfigError("cache prune: give --older-than AGE, --max-size SIZE or both")
    runs = checkpoints is not None and any(f.is_dir() for f in Path(checkpoints).glob("*/*"))
    if not cache.is_dir() and not runs:
        return []  # nothing cached; and no folder made where no run made one
    user = "pretrain stage" if kinds == SHARED_KINDS else "stage or sweep of this workspace"
    with _alone(cache, user):
        entries = cache_entries(cache, kinds, checkpoints)
        doomed = to_prune(entries, older_than=older_than, max_size=max_size)
        if not dry_run:
            for entry in doomed:
                entry.remove()
    return doomed
