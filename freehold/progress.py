"""Rich progress bars for long work, as the callbacks the library takes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

Advance = Callable[[int], None]


@contextmanager
def byte_progress(console: Console | None = None) -> Iterator[Callable[[str, int], Advance]]:
    """Yields `start(description, total_bytes) -> advance(n)`; bars go to stderr."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    console = console or Console(stderr=True)
    # Bars are for people watching; logs and pipes get no redraw noise.
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as progress:

        def start(description: str, total: int) -> Advance:
            task = progress.add_task(description, total=total or None)
            return lambda n: progress.advance(task, n)

        yield start
