"""What every command shows on the terminal: progress bars on stderr and two-column summary tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
from rich.text import Text


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        tokens = task.fields.get("tokens", 0)
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} tok/s", style="cyan")


@contextmanager
def progress_bar(label: str, total: int, unit: str, tokens_per_second: bool = False
                 ) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (count, elapsed, ETA, optionally tokens/s); yields ``advance(n, tokens=0)``."""
    columns: list[ProgressColumn] = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
    if tokens_per_second:
        columns.append(_TokensPerSecond())
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label, total=total, tokens=0)

        def advance(n: int, tokens: int = 0) -> None:
            progress.update(task, advance=n, tokens=progress.tasks[0].fields["tokens"] + tokens)

        yield advance


def summary_table(title: str) -> Table:
    """A headerless two-column table (bold names, values) with a left-aligned title."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table
