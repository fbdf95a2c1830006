"""Errors a user can act on.

Every error kvq raises on bad input is a :class:`KvqError` carrying a one-line message that names
the thing at fault and, where there is one, a hint saying what to do. The CLI prints these as one
line (two with the hint) and exits with ``exit_code``; ``KVQ_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2  # bad usage or bad input
EXIT_FAILURE = 1  # a failure while working
EXIT_INTERRUPTED = 130  # Ctrl-C


class KvqError(Exception):
    """A failure while doing the work (exit code 1): bad data, NaN activations, an unobserved layer."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"


class UsageError(KvqError):
    """The user asked for something that cannot be (exit code 2): a bad flag, recipe, or missing file."""

    exit_code = EXIT_USAGE


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's text (its type name if it has none), for one-line messages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
