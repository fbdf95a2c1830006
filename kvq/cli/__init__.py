"""The ``kvq`` command line (typer): ``main(argv) -> exit code``, the one place errors are printed.

Every failure, whether a bad flag caught by typer, a :class:`~kvq.errors.KvqError` from the library,
an ``OSError``, out of memory or Ctrl-C, is turned into one line (``kvq: error: ...``) plus an
optional hint line by :mod:`kvq.cli.error_map`, with exit code 2 for bad usage or input, 1 for a
failure while working and 130 for Ctrl-C. ``KVQ_DEBUG=1`` prints the traceback first.
The commands themselves are in :mod:`kvq.cli.commands`.
"""

from __future__ import annotations

import sys

from kvq.cli.interrupt import interrupts_after_imports
from kvq.errors import (  # kvq.cli.error_map is imported only when a command fails
    EXIT_FAILURE,
    EXIT_USAGE,
    UsageError,
)


def main(argv: list[str] | None = None) -> int:
    """Run ``kvq ARGV`` (default: ``sys.argv[1:]``) and return the exit code; never raises."""
    try:
        with interrupts_after_imports():
            import typer.main

            from kvq.cli.commands import app

            command = typer.main.get_command(app)
            args = list(sys.argv[1:] if argv is None else argv)
            # Not command.main(): typer's own handlers would print a usage box or swallow
            # Ctrl-C; every exception goes to kvq.cli.error_map instead.
            with command.make_context("kvq", args) as ctx:
                result = command.invoke(ctx)
        return result if isinstance(result, int) else 0
    except SystemExit as exc:  # raised by code kvq calls, not by typer (it raises typer.Exit)
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        sys.stderr.write(f"kvq: error: {exc.code}\n")
        return EXIT_FAILURE
    except BaseException as exc:  # noqa: B036 - the one place every failure becomes the one-line contract
        import typer

        from kvq.cli.error_map import handle

        if isinstance(exc, typer.Exit):  # --help, --version
            return exc.exit_code
        return handle(exc)


__all__ = ["main", "UsageError", "EXIT_USAGE", "EXIT_FAILURE"]
