"""kvq's one way to parse JSON that a file (or a file's metadata) holds: whatever is wrong with it is bad input.

A JSON text can fail to parse as a syntax error, as bytes that are not UTF-8, or as valid JSON nested
deeper than the parser's recursion limit (``"[" * 100000`` in a few hundred KB): every one of these is
the user's file, not a failure of kvq, so each is a :class:`~kvq.errors.UsageError` (exit 2) naming
what was read. kvq.inspection reports such files as defects instead of refusing them.
"""

from __future__ import annotations

import json

from kvq.errors import UsageError


def parse_json(text: str | bytes, what: str, hint: str | None = None) -> object:
    """``text`` parsed as JSON; a UsageError naming ``what`` (a file, or a file's metadata key) otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                         hint=hint) from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not JSON (not UTF-8 text)", hint=hint) from exc
    except RecursionError as exc:
        raise UsageError(f"{what} does not parse: its JSON is nested too deeply", hint=hint) from exc
