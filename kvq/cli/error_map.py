"""The one error contract: every exception that reaches the top of ``kvq`` becomes one line.

:func:`report_for` maps an exception to a :class:`Report` (a one-line message, an optional hint
line and an exit code) through :data:`ERROR_MAP`, an ordered table of exception class -> formatter
in the style of ``huggingface_hub``'s CLI error mappings; the first class the exception is an
instance of wins, so subclasses come before their bases. :func:`print_report` writes it as

    kvq: error: <message>
      hint: <what to do>

Exit codes: 2 for bad usage or bad input (a flag, a recipe, a path the user named, a file that does
not parse), 1 for a failure while working (no space left, out of memory, an internal error), 130
for Ctrl-C (``kvq: interrupted``). Anything not in the table is an internal error, reported as one
line naming its type. ``KVQ_DEBUG=1`` prints the traceback (with its cause chain) before the line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import pydantic
import typer
import yaml
from safetensors import SafetensorError

from kvq.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, KvqError, first_line

MAX_LINE = 400  # characters of one printed line, prefix included
_ELLIPSIS = " ..."
DEBUG_HINT = "rerun with KVQ_DEBUG=1 to see the traceback"
OOM_HINT = "use a smaller --batch-size (default 1) or --seqlen, or a smaller --dtype (bfloat16, float16)"


@dataclass(frozen=True)
class Report:
    """What the user sees: ``kvq: error: <message>`` (or ``kvq: interrupted``), a hint, an exit code."""

    message: str
    hint: str | None
    exit_code: int
    interrupted: bool = False
    quiet: bool = False  # nothing to print: the reader of kvq's output went away


_LONG_WORD = re.compile(r"[^\s'\"(),]*/[^\s'\"(),]*|[^\s'\"(),]{60,}")  # a path, or any 60+ character word
_MIDDLE = "..."
_KEPT = 40  # characters a shortened path keeps at least (its start and its end, the file name)


def _shorter_paths(line: str, limit: int) -> str:
    """``line`` with its longest paths (and long words) cut in the middle until it fits ``limit``, if it can."""
    for word in sorted(set(_LONG_WORD.findall(line)), key=len, reverse=True):
        excess = len(line) - limit
        if excess <= 0:
            break
        keep = max(len(word) - excess - len(_MIDDLE), _KEPT)
        if keep + len(_MIDDLE) >= len(word):
            continue
        head = keep // 3  # the end of a path names the file: keep more of it
        line = line.replace(word, word[:head] + _MIDDLE + word[len(word) - (keep - head):])
    return line


def one_line(text: object, limit: int = MAX_LINE) -> str:
    """``text`` as one line of at most ``limit`` characters: lines joined, whitespace collapsed.

    A line too long has its paths shortened in the middle first (the message around them is what says
    what is wrong); only what still does not fit is cut at the end.
    """
    line = " ".join(str(text).split())
    if len(line) > limit:
        line = _shorter_paths(line, limit)
    return line if len(line) <= limit else line[: limit - len(_ELLIPSIS)] + _ELLIPSIS


# --- formatters: one per exception class ------------------------------------------------------


def _kvq_error(exc: KvqError) -> Report:
    return Report(exc.message, exc.hint, exc.exit_code)


def _command_line(exc: typer.TyperException) -> Report:
    """A bad command line, caught by typer (its vendored click): a flag's value, a missing or unknown flag."""
    message = exc.format_message().replace("Value error, ", "")
    cause = exc.__cause__  # typer checks values with pydantic, whose error keeps the value typed
    if isinstance(cause, pydantic.ValidationError) and cause.errors():
        got = repr(cause.errors()[0].get("input"))
        if got not in message:
            message = f"{message.rstrip('.')} (got {got})"
    if exc.exit_code != EXIT_USAGE:
        return Report(message, None, exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "kvq"
    return Report(message, f"run `{path} --help` for the {'commands' if path == 'kvq' else 'flags'}", EXIT_USAGE)


def _interrupted(exc: BaseException) -> Report:
    return Report("interrupted", None, EXIT_INTERRUPTED, interrupted=True)


def _broken_pipe(exc: BrokenPipeError) -> Report:
    """``kvq ... | head``: the reader closed the pipe; say nothing, as other command-line tools do."""
    return Report("broken pipe", None, EXIT_FAILURE, quiet=True)


def _os_error(exc: OSError) -> Report:
    """A file-system failure, naming the path (``exc.filename``) and what to do about it."""
    path = exc.filename if exc.filename is not None else None
    where = f" {path}" if path is not None else ""
    reason = exc.strerror or first_line(exc)
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return Report(f"no space left on the device writing{where}", "free some space, or pass --out on another disk",
                      EXIT_FAILURE)
    if code == errno.ENAMETOOLONG:  # a name the user chose: bad usage, whichever call met it first
        return Report(f"{reason}:{where}", "choose a shorter name (at most 255 bytes a name)", EXIT_USAGE)
    if code == errno.EROFS:
        return Report(f"read-only file system:{where}", "pass an --out on a writable disk", EXIT_USAGE)
    if isinstance(exc, FileNotFoundError):
        return Report(f"no such file or folder:{where}", "check the path", EXIT_USAGE)
    if isinstance(exc, IsADirectoryError):
        return Report(f"{path or 'the path'} is a folder where a file is expected",
                      "pass the file inside it, or another path", EXIT_USAGE)
    if isinstance(exc, NotADirectoryError):
        return Report(f"a part of{where or ' the path'} is a file where a folder is expected",
                      "check each folder of the path; --out must be (or become) a folder", EXIT_USAGE)
    if isinstance(exc, PermissionError):
        return Report(f"permission denied:{where}", "check the permissions, or choose another path", EXIT_USAGE)
    if isinstance(exc, FileExistsError):
        return Report(f"{path or 'the path'} already exists", "remove it, or choose another path", EXIT_USAGE)
    return Report(f"{reason}:{where}" if path is not None else f"{reason}", DEBUG_HINT, EXIT_FAILURE)


def _json_error(exc: json.JSONDecodeError) -> Report:
    return Report(f"a JSON file does not parse (line {exc.lineno}, column {exc.colno}): {exc.msg}",
                  "the file is damaged or not JSON; " + DEBUG_HINT + " and see which file", EXIT_USAGE)


def _yaml_error(exc: yaml.YAMLError) -> Report:
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    source = f" {mark.name}" if mark is not None and mark.name and not mark.name.startswith("<") else ""
    problem = getattr(exc, "problem", None) or first_line(exc)
    return Report(f"YAML file{source} does not parse{where}: {problem}", "fix the YAML syntax", EXIT_USAGE)


def _safetensors_error(exc: SafetensorError) -> Report:
    return Report(f"a safetensors file cannot be read: {first_line(exc)}",
                  "the file is truncated or not safetensors: write it again; " + DEBUG_HINT, EXIT_USAGE)


def _validation_error(exc: pydantic.ValidationError) -> Report:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
    return Report(f"invalid {exc.title}: {problems}", None, EXIT_USAGE)


def _unicode_error(exc: UnicodeDecodeError) -> Report:
    return Report(f"a text file is not valid {exc.encoding}: {exc.reason} at byte {exc.start}",
                  "convert the file to UTF-8 text; " + DEBUG_HINT + " and see which file", EXIT_USAGE)


def _out_of_memory(exc: BaseException) -> Report:
    gpu_oom = _torch_out_of_memory()
    where = "on the GPU" if gpu_oom is not None and isinstance(exc, gpu_oom) else "in main memory (CPU)"
    return Report(f"out of memory {where}", OOM_HINT, EXIT_FAILURE)


def _internal(exc: BaseException) -> Report:
    detail = f": {first_line(exc)}" if str(exc).strip() else ""
    return Report(f"internal error: {type(exc).__name__}{detail}", DEBUG_HINT, EXIT_FAILURE)


def _torch_out_of_memory() -> type[BaseException] | None:
    """torch.OutOfMemoryError (CUDA) if torch is loaded; never imports torch (``kvq --help`` stays fast,
    and an exception raised by torch means torch is already imported)."""
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    return oom if isinstance(oom, type) else None


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's CUDA out-of-memory error, or torch's CPU allocator failing.

    torch reports a failed CPU allocation as a plain RuntimeError from c10's DefaultCPUAllocator, so
    that one is recognized by its text: there is no class to test.
    """
    gpu_oom = _torch_out_of_memory()
    if isinstance(exc, MemoryError) or (gpu_oom is not None and isinstance(exc, gpu_oom)):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


# Ordered: a subclass comes before its base (JSONDecodeError and UnicodeDecodeError are ValueErrors,
# typer's usage errors are TyperExceptions, KeyboardInterrupt is not an Exception).
# An entry's key is a class, or a predicate where a class alone does not tell (out of memory).
ERROR_MAP: list[tuple[type[BaseException] | Callable[[BaseException], bool], Callable[..., Report]]] = [
    (KeyboardInterrupt, _interrupted),
    (typer.Abort, _interrupted),
    (KvqError, _kvq_error),
    (typer.TyperException, _command_line),
    (_is_out_of_memory, _out_of_memory),
    (BrokenPipeError, _broken_pipe),
    (OSError, _os_error),
    (json.JSONDecodeError, _json_error),
    (UnicodeDecodeError, _unicode_error),
    (yaml.YAMLError, _yaml_error),
    (SafetensorError, _safetensors_error),
    (pydantic.ValidationError, _validation_error),
    (BaseException, _internal),
]


def report_for(exc: BaseException) -> Report:
    """The user-facing report of ``exc``: the first matching entry of :data:`ERROR_MAP`."""
    for match, formatter in ERROR_MAP:
        if isinstance(exc, match) if isinstance(match, type) else match(exc):
            return formatter(exc)
    return _internal(exc)  # unreachable: BaseException matches everything


def print_report(report: Report, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if report.quiet:
        return
    if report.interrupted:
        stream.write("kvq: interrupted\n")
        return
    prefix = "kvq: error: "
    stream.write(prefix + one_line(report.message, MAX_LINE - len(prefix)) + "\n")
    if report.hint:
        stream.write("  hint: " + one_line(report.hint, MAX_LINE - len("  hint: ")) + "\n")


def handle(exc: BaseException) -> int:
    """Print ``exc`` as the one-line contract (traceback first with ``KVQ_DEBUG=1``); return the exit code."""
    report = report_for(exc)
    if os.environ.get("KVQ_DEBUG"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if report.quiet:
        _drop_stdout()
    else:
        sys.stdout.flush()
    print_report(report)
    sys.stderr.flush()
    return report.exit_code


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests): nothing to do
        pass
