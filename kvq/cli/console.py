"""What every command shows on the terminal: progress bars on stderr and two-column summary tables."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


@contextmanager
def progress_bar(label: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (count, elapsed, ETA); yields ``advance(n)``."""
    columns: list[ProgressColumn] = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.update(task, advance=n)


class ProgressBar:
    """A progress callback ``(done, total)`` (:mod:`kvq.progress`) drawn as a rich bar on stderr: the bar opens
    at the first call and closes with ``stack``."""

    def __init__(self, stack: ExitStack, label: str, unit: str):
        self._stack, self._label, self._unit = stack, label, unit
        self._advance: Callable[[int], None] | None = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._advance is None:
            self._advance = self._stack.enter_context(progress_bar(self._label, total, self._unit))
        self._advance(done - self._done)
        self._done = done


def summary_table(title: str) -> Table:
    """A headerless two-column table (bold names, values) with a left-aligned title."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table


def link_note(out: str | Path, option: str = "--out") -> str | None:
    """A line saying where kvq wrote when ``out`` (or a folder above it) is a symbolic link; None otherwise.

    kvq writes into the folder the link points to (docs/artifacts.md), so the resolved path is printed.
    """
    resolved = os.path.realpath(out)
    if resolved == os.path.abspath(out):
        return None
    return f"{option} {out} is a symbolic link: written into {resolved}"
