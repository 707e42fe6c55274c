"""One writer per stage and workspace, and the sweep of what dead writers left behind.

A stage holds ``artifacts/.<stage>.lock`` while it runs: an advisory ``flock`` on a file
that holds the holder's pid. The kernel drops the lock when its holder dies, however it
dies, so a lock file left by a killed run never blocks the next one (the stale pid in it
is simply overwritten). A second invocation of the same stage is refused in one line
naming the pid that holds it.

Writers name their temporary files after their pid (``atomic_dir``, the compress prefix
cache), so at the start of a stage, with the lock held, everything of that stage whose pid
is no longer alive is a dead writer's leftover: :func:`sweep_leftovers` removes it. A
dead writer that finished its artifact but was killed between the two renames of the
swap (old out, new in) left the new artifact whole under its temporary name, with its
manifest and fingerprint: the sweep finishes that swap instead of throwing the work away.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from unbottle.core.contract.errors import DataError, LockedError

log = logging.getLogger("unbottle.pipeline")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_alone_or_not_at_all(fd: int) -> bool:
    """Take an exclusive ``flock`` on the open file ``fd`` without waiting; False when
    another process holds it (shared or exclusive)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


@contextlib.contextmanager
def stage_lock(artifacts: Path, stage: str) -> Iterator[Path]:
    """Hold ``artifacts/.<stage>.lock`` for the block; refuse when another process holds it."""
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f".{stage}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_alone_or_not_at_all(fd):
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(
                f"stage {stage} is already running in this workspace (pid {holder} holds "
                f"{path}); wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing drops the flock; the file stays, holding the last pid


@contextlib.contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Hold an advisory lock on ``path`` for the block, waiting for whoever holds it.

    Processes that share a cache (the ranks of a torchrun, the parallel tasks of a sweep)
    build one entry at a time: the first builds it, the others wait here and then find it
    in the cache instead of doing the same work at the same time. The kernel drops the
    lock when its holder dies.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# The names writers give their temporary files, each with the writer's pid:
# atomic_dir's `.<name>.<pid>-<random>.tmp` and `.<name>.old-<pid>`, the compress prefix
# cache's `.<name>.prefixes.<pid>-<random>`.
# Names without a pid come from versions before pids were added: with the stage's lock
# held, no live writer of the stage can own them (pid 0: never alive).
def _leftover_pid(entry: str, stage: str) -> int | None:
    name = re.escape(stage)
    for pattern in (
        rf"\.{name}\.(\d+)-[^.]+\.tmp",
        rf"\.{name}\.old-(\d+)",
        rf"\.{name}\.prefixes\.(\d+)-.+",
        rf"\.{name}\.()[a-z0-9_]+\.tmp",
        rf"\.{name}\.prefixes\.()[a-z0-9_]+",
    ):
        match = re.fullmatch(pattern, entry)
        if match:
            return int(match.group(1) or 0)
    return None


def sweep_leftovers(artifacts: Path, stage: str) -> list[str]:
    """Remove what dead writers of ``stage`` left in ``artifacts``; finish a swap a dead
    writer was killed in the middle of. Returns the names removed."""
    if not artifacts.is_dir():
        return []
    final = artifacts / stage
    removed: list[str] = []
    for entry in sorted(artifacts.iterdir()):
        pid = _leftover_pid(entry.name, stage)
        if pid is None or pid_alive(pid):
            continue
        if not final.exists() and entry.name.endswith(".tmp") and _is_whole(entry):
            os.replace(entry, final)
            log.info("%s: finished the swap of %s, left by a run that was stopped", stage, final)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry.name)
    if removed:
        log.info("%s: removed %d leftover(s) of stopped runs: %s", stage, len(removed), removed)
    return removed


def _is_whole(candidate: Path) -> bool:
    """A finished artifact: a fingerprinted manifest whose files are all there, intact."""
    from unbottle.core.store.artifacts import verify_artifact

    try:
        return bool(verify_artifact(candidate).get("fingerprint"))
    except DataError:
        return False
