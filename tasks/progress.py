"""A process-wide rich progress display that long tasks report into (pages fetched, files written).

The CLI opens it around a command; tasks call :func:`track` and get a no-op when nothing is open
(inside a Prefect worker, in tests).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_lock = threading.Lock()
_progress: Progress | None = None


@contextlib.contextmanager
def progress_display() -> Iterator[None]:
    """Show progress bars on stderr while the block runs (only on a terminal)."""
    global _progress
    if not sys.stderr.isatty():
        yield
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        _progress = progress
        try:
            yield
        finally:
            _progress = None


def track(description: str, total: int | None = None) -> Callable[[int], None]:
    """Register a bar and return ``advance(n)``; a no-op when no display is open."""
    with _lock:
        progress = _progress
        if progress is None:
            return lambda n: None
        task_id = progress.add_task(description, total=total)

    def advance(n: int) -> None:
        progress.advance(task_id, n)

    return advance
