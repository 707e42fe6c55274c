"""Artifacts on disk: atomic writes, content hashes and the manifest every output carries.

A stage writes into a temporary sibling directory and renames it into place only when it
has finished, so a crash never leaves a half-written artifact that a later stage would
accept. Every artifact holds ``manifest.json``: the stage, its config, the strategies it
used with their versions, the hashes of its inputs and of its own files, and its metrics.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from unbottle.core.contract.errors import DataError, shorten_path

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path, *, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under root, by relative POSIX path, in sorted order."""
    out: dict[str, str] = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            out[rel] = sha256_file(path)
    return out


def tree_hash(path: Path) -> str:
    """One sha256 for a file, or for a directory's relative paths and file hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    digest = hashlib.sha256()
    for rel, h in file_hashes(path, exclude=()).items():
        digest.update(f"{rel}\0{h}\n".encode())
    return digest.hexdigest()


#: What the line saying a file does not exist adds: a fixed text, or one made from the path
#: (only when the file is missing).
MissingHint = str | Callable[[Path], str]


def path_kind(
    path: Path, what: str, error: type[Exception] = DataError
) -> Literal["file", "directory", "other"] | None:
    """What is at a path a user named: None when nothing is. ``Path.is_file()`` and
    ``exists()`` raise on a name the system refuses (too long) and call a looping link
    missing; here either is one line naming the path and the system's reason, raised as
    ``error``."""
    try:
        mode = Path(path).stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # a name too long, a folder not searchable, a link that loops
        raise error(f"{what}: {shorten_path(path)}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


@contextlib.contextmanager
def open_user_file(
    path: Path, what: str, error: type[Exception] = DataError, if_missing: MissingHint = ""
) -> Iterator[BinaryIO]:
    """A user's file, open for reading bytes; a file named ``*.gz`` is decompressed as it
    is read. A file that is missing (``if_missing`` says what to do then), a directory, a
    name or file the system refuses and a damaged gzip file become one line naming the
    file, raised as ``error``."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below, after the caller's reads)
    except FileNotFoundError:
        hint = if_missing(Path(path)) if callable(if_missing) else if_missing
        raise error(f"{what}: {shorten_path(path)} does not exist{hint}") from None
    except IsADirectoryError:
        raise error(f"{what}: {shorten_path(path)} is a directory; name a file") from None
    except OSError as e:  # a name too long, a file not readable by this user
        raise error(f"{what}: {shorten_path(path)}: {e.strerror}") from None
    with raw:
        try:
            yield gzip.GzipFile(fileobj=raw) if Path(path).suffix == ".gz" else raw
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            reason = "is not a gzip file" if isinstance(e, gzip.BadGzipFile) else "is damaged"
            raise error(f"{what}: {shorten_path(path)} {reason} ({e})") from None


def _not_utf8(what: str, path: Path, line: int, byte: int, offset: int) -> str:
    return (
        f"{what}: {path}:{line} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); "
        "save the file as UTF-8"
    )


def read_utf8(
    path: Path, what: str, error: type[Exception] = DataError, if_missing: MissingHint = ""
) -> str:
    """A text file's content (see :func:`open_user_file`); bytes that are not UTF-8 are
    one line naming the file, line and byte too."""
    with open_user_file(path, what, error, if_missing) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(_not_utf8(what, path, line, data[e.start], e.start)) from None


def read_lines(
    path: Path, what: str, error: type[Exception] = DataError, if_missing: MissingHint = ""
) -> Iterator[str]:
    """A text file's lines, each with its end, read as they come (see
    :func:`open_user_file`). Lines end at b"\\n" only (``str.splitlines()`` would also cut
    at U+2028 and U+0085, which a JSON string may hold unescaped); bytes that are not UTF-8
    are one line naming the file, line and byte."""
    offset = 0
    with open_user_file(path, what, error, if_missing) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(_not_utf8(what, path, lineno, raw[e.start], offset + e.start)) from None
            offset += len(raw)


def read_jsonl(
    path: Path, what: str, hint: str = "", if_missing: MissingHint = ""
) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file, read as it goes, so
    that only the values are ever held; a line that is not UTF-8 or not JSON is one line
    naming the file and line (``hint`` says what the file should hold)."""
    for lineno, line in enumerate(read_lines(path, what, DataError, if_missing), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{what}: {path}:{lineno} is not valid JSON{hint}") from None
        yield lineno, value


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def current_umask() -> int:
    umask = os.umask(0o077)  # reading the umask sets it: set it private for that instant
    os.umask(umask)
    return umask


def as_umask_allows(path: Path, umask: int | None = None) -> None:
    """Give a file, or a folder and everything in it, the mode a plain ``open()`` or
    ``mkdir()`` would have: ``mkstemp`` and ``mkdtemp`` make them private, and so does
    safetensors (0.8 and later write through a 0600 temporary file, safetensors issue
    #782). Renamed into place as they are, an artifact copied to a server that runs as
    another user could not be read there. Bits are only added, never taken away."""
    umask = current_umask() if umask is None else umask
    path = Path(path)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        wanted = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~umask
        if stat.S_IMODE(mode) | wanted != stat.S_IMODE(mode):
            entry.chmod(stat.S_IMODE(mode) | wanted)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        as_umask_allows(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_text(data: Any) -> str:
    """JSON as unbottle writes it: indented, keys sorted, one final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json_text(data))


@dataclass
class PendingSwap:
    """A finished artifact waiting under its temporary name (see :func:`swap_later`)."""

    final: Path
    tmp: Path | None = None

    def stamp(self, **fields: Any) -> None:
        """Add ``fields`` to the waiting artifact's manifest (its fingerprint, say)."""
        assert self.tmp is not None
        manifest = read_manifest(self.tmp)
        manifest.update(fields)
        write_json_atomic(self.tmp / MANIFEST, manifest)

    def commit(self) -> None:
        """Swap the waiting artifact into place."""
        assert self.tmp is not None
        _swap(self.tmp, self.final)
        self.tmp = None


_PENDING: contextvars.ContextVar[dict[Path, PendingSwap] | None] = contextvars.ContextVar(
    "unbottle_pending_swaps", default=None
)


@contextlib.contextmanager
def swap_later(final: Path) -> Iterator[PendingSwap]:
    """While the block runs, :func:`atomic_dir` leaves the artifact it would swap into
    ``final`` finished under its temporary name: the caller stamps its manifest (the
    fingerprint, the metrics it goes with) and then commits the swap. A kill at any moment
    then leaves either the old artifact or a whole, stamped new one, never a new one
    without its fingerprint. On an exception the waiting artifact is removed."""
    pending = PendingSwap(Path(final))
    token = _PENDING.set({**(_PENDING.get() or {}), pending.final.resolve(): pending})
    try:
        yield pending
    except BaseException:
        if pending.tmp is not None:
            shutil.rmtree(pending.tmp, ignore_errors=True)
        raise
    finally:
        _PENDING.reset(token)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` when the block succeeds.

    On an exception the temporary directory is removed and ``final`` is left as it was.
    The temporary names carry this process's pid, so a later run can tell a dead
    writer's leftovers (``core/store/locking.py``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}-", suffix=".tmp")
    )
    try:
        yield tmp
        as_umask_allows(tmp)  # what the block wrote, and mkdtemp's private folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pending = (_PENDING.get() or {}).get(final.resolve())
    if pending is not None:
        pending.tmp = tmp
        return
    _swap(tmp, final)


def _swap(tmp: Path, final: Path) -> None:
    """Replace ``final`` with ``tmp``: two renames (the old one out, the new one in)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    out_dir: Path,
    *,
    stage: str,
    config: Any,
    strategies: dict[str, dict[str, str]],
    inputs: dict[str, str],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` into an artifact directory whose files are complete."""
    from unbottle.core.store.provenance import provenance

    manifest = {
        "stage": stage,
        "config": config,
        "strategies": strategies,
        "inputs": inputs,
        "files": file_hashes(out_dir),
        "metrics": metrics,
        # The final directory's parent: the temporary directory is created beside it.
        "environment": provenance(Path(out_dir).parent),
        **(extra or {}),
    }
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST
    if path_kind(artifact, "artifact") is None or path_kind(path, "artifact") != "file":
        raise DataError(
            f"{artifact}: not an unbottle artifact (no {MANIFEST}); run the stage that makes it"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
        raise DataError(
            f"{path}: damaged manifest ({reason}); rerun the stage that makes {artifact}"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise DataError(
            f"{path}: damaged manifest (a JSON {type(manifest).__name__} where an object with "
            f"the artifact's files is expected); rerun the stage that makes {artifact}"
        )
    return manifest


def verify_artifact(artifact: Path) -> dict[str, Any]:
    """Read a manifest and check that the files on disk still match its hashes."""
    manifest = read_manifest(artifact)
    actual = file_hashes(artifact)
    expected = manifest.get("files", {})
    if actual != expected:
        changed = sorted(set(actual) ^ set(expected)) or sorted(
            k for k in actual if actual[k] != expected.get(k)
        )
        raise DataError(
            f"{artifact}: files do not match its manifest ({', '.join(changed[:3])}); "
            "rerun the stage that makes it"
        )
    return manifest
