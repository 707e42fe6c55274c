"""The one piece of writing the benchmarks share: their section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path


def rewrite_section(path: Path, section: str, *, begin: str, end: str, heading: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``path`` with
    ``section`` (which carries the markers), or append it under ``heading`` when the
    markers are not there yet; atomically."""
    from unbottle.core.store.artifacts import write_text_atomic

    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{section}\n"
    write_text_atomic(path, text)
