"""The one progress-callback convention of kvq's Python API and CLI.

A progress callback is any ``Callable[[int, int], None]`` called as ``progress(done, total)`` in the
unit of the function that takes it (samples for calibrate and validate, windows for evaluate):
once with ``done = 0`` (or the work a resumed run already did) when the work is counted and about
to start, then after every batch with the running count, last with ``done == total``. It runs in the
computing thread: keep it cheap. The CLI's progress bars are such callbacks
(:class:`kvq.cli.console.ProgressBar`).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]


def counter(progress: Progress | None, total: int, done: int = 0) -> Callable[[int], None] | None:
    """Report ``(done, total)`` to ``progress`` now, and return ``advance(n)``, which adds ``n`` and reports
    again (None without a callback)."""
    if progress is None:
        return None
    count = [done]
    progress(done, total)

    def advance(n: int) -> None:
        count[0] += n
        progress(count[0], total)

    return advance
