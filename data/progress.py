"""A rich progress bar for byte-counted work (indexing), as a progress callback.

`build_index(progress=...)` takes a plain `(done_bytes, total_bytes)` callable; the CLI
wraps it in this bar so the library never prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

ProgressCallback = Callable[[int, int], None]


@contextlib.contextmanager
def byte_progress(description: str = "indexing", console: Console | None = None) -> Iterator[ProgressCallback]:
    """Show a bar while the block runs; yield the callback that moves it."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
