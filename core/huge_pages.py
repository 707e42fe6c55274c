"""Transparent huge pages for the weights a decode step streams.

At batch 1 a decode step reads every weight once. With 4 KiB pages, SmolLM2-135M's 77 MB
of int4 weights span about 19,000 pages, six times what the data TLB covers (an AMD EPYC's
3,072 second-level entries reach 12 MB), so a step also pays a page-table walk for
almost every page it reads. Backed by 2 MiB pages the same weights are 40 TLB entries.
On that model's genai bundle, two threads, huge pages gave 1.11x the tokens/s, faster in
8 of 8 pairs of processes (BENCHMARKS.md, "Huge pages").

glibc's malloc asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)`` on
the memory it maps) when the tunable ``glibc.malloc.hugetlb=1`` is set: glibc 2.35 or
later, on a Linux kernel whose transparent huge pages are in mode ``always`` or
``madvise``. ONNX Runtime, onnxruntime-genai and torch allocate their weights through
malloc, so nothing else has to change. Tunables are read once, when a process starts:
:func:`reexec_with_huge_pages` runs the process again, same PID and arguments, with the
tunable set; the ``unbottle`` command does it first thing. Anywhere else (macOS, musl,
a kernel without transparent huge pages, ``UNBOTTLE_HUGE_PAGES=0``) it does nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: glibc's tunable: back malloc's mappings with transparent huge pages.
TUNABLE = "glibc.malloc.hugetlb=1"
#: Set to 0 to leave the process's pages as they are.
SWITCH = "UNBOTTLE_HUGE_PAGES"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or
    None where the kernel has none (not Linux, or built without them)."""
    try:
        modes = _THP_MODE.read_text(encoding="ascii").split()
    except OSError:
        return None
    chosen = [m for m in modes if m.startswith("[")]  # "always [madvise] never"
    return chosen[0].strip("[]") if chosen else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, or None when it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor, *_ = (int(part) for part in version.split("."))
    return major, minor


def _other_tunables(environ: Mapping[str, str]) -> tuple[list[str], bool]:
    """``GLIBC_TUNABLES``' entries other than ``glibc.malloc.hugetlb``, and whether it
    had one."""
    name = TUNABLE.split("=")[0]
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    others = [t for t in tunables if t.split("=")[0] != name]
    return others, len(others) < len(tunables)


def huge_page_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with the tunable added to ``GLIBC_TUNABLES``, or None when there is
    nothing to change: the tunable (or another ``glibc.malloc.hugetlb``) is already set,
    ``UNBOTTLE_HUGE_PAGES=0``, or this machine cannot give malloc huge pages."""
    if environ.get(SWITCH, "1") == "0":
        return None
    others, chosen = _other_tunables(environ)
    if chosen:
        return None  # the user chose a value: theirs stands
    if (glibc_version() or (0, 0)) < (2, 35):
        return None
    if transparent_huge_pages_mode() not in ("always", "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join([*others, TUNABLE])}


def small_page_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with ``glibc.malloc.hugetlb`` taken out of ``GLIBC_TUNABLES`` and
    ``UNBOTTLE_HUGE_PAGES=0``: a process started with it runs on 4 KiB pages (what the
    benchmarks compare against)."""
    others, _ = _other_tunables(environ)
    kept = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    return {**kept, **({"GLIBC_TUNABLES": ":".join(others)} if others else {}), SWITCH: "0"}


def run_again_with(environ: Mapping[str, str]) -> None:
    """Run this process again, same PID, arguments and open files, with ``environ``.
    Whatever the process did so far is done again, so call it before any work."""
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the interpreter's own command line (its options, `-m module` or the
    # script); exec'ing it with the new environment starts the same program again.
    os.execve(sys.executable, sys.orig_argv, dict(environ))


def reexec_with_huge_pages() -> None:
    """Run this process again with malloc on huge pages (see the module docstring), or
    return at once when :func:`huge_page_environment` has nothing to change.

    ``exec`` keeps the PID and the open files, so a service manager and pipes see one
    process.
    """
    environ = huge_page_environment(os.environ)
    if environ is not None:
        run_again_with(environ)


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory that huge pages back (Linux; 0 elsewhere)."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024  # "AnonHugePages:  314368 kB"
    return 0
