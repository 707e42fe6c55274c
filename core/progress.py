"""Progress bars for long work (rich), quiet when the output is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**figures)``; figures (loss, tokens/s) are shown beside the bar.
    ``total`` None: the work's size is not known beforehand (the bar pulses)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[figures]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    with progress:
        task = progress.add_task(desc, total=total, figures="")

        def advance(**figures: Any) -> None:
            text = "  ".join(
                f"{k.replace('_per_s', '/s').replace('_', ' ')} {v:,.4g}"
                for k, v in figures.items()
            )
            progress.update(task, advance=1, figures=text)

        yield advance


def track(items: Sequence[T], desc: str) -> Iterator[T]:
    """Iterate over ``items`` behind a progress bar (with an ETA) named ``desc``."""
    with progress_bar(desc, len(items)) as advance:
        for item in items:
            yield item
            advance()
