"""The one policy for an existing output (``--out``, ``--json``): what kvq may replace, and what it refuses.

The same for calibrate, solve, export-scales and the JSON reports (docs/artifacts.md, "Writing"):

a. an output that is, or would delete, a file the command reads, that overlaps a folder an export
   links from, or that holds the current folder, is refused, even with --force;
b. an absent output, or an empty folder, is written;
c. a folder holding only files of the kind this output writes (``kind``: names relative to the
   folder), or a single JSON file holding the same top-level keys as the new one, is replaced;
d. anything else (other files, a file where a folder goes, a folder where a file goes) is refused
   with a hint to pass --force; with ``force`` it is replaced.

:mod:`kvq.io.atomic` applies it before every write.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

from kvq.errors import UsageError
from kvq.io.parse import parse_json

_MAX_JSON = 64 << 20  # an existing file larger than this is not compared as JSON


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _force_hint(option: str) -> str:
    if option == "--out":
        return "pass --force to replace it, or choose another --out"
    if option == "ARTIFACT":  # kvq plan, which writes plan.json into the artifact it reads
        return "pass --force to write into it anyway, or pass another ARTIFACT"
    return f"remove it, or choose another {option} path"


def check_reads(out: str | Path, inputs: Sequence[Path] = (), sources: Sequence[Path] = (),
                carried: Collection[str] = (), option: str = "--out") -> None:
    """(a): ``out`` is not an input, does not hold an input it would drop, does not overlap a source.

    ``inputs`` are the files (or folders) the command reads; ``sources`` the folders an export links from.
    """
    out = Path(os.path.realpath(out))
    for source in sources:
        src = Path(os.path.realpath(source))
        if _within(out, src) or _within(src, out):
            raise UsageError(f"{option} {out} overlaps {source}, which this command reads from",
                             hint=f"choose an {option} outside {source}")
    for read in inputs:
        path = Path(os.path.realpath(read))
        if path == out:
            raise UsageError(f"{option} {out} is a file this command reads", hint=f"choose another {option}")
        if out in path.parents and path.relative_to(out).as_posix() not in carried:
            raise UsageError(f"{option} {out} would replace {read}, which this command reads",
                             hint=f"choose another {option}")


def _entries(folder: Path) -> list[str]:
    """Every entry below ``folder`` (files, links, folders), as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _check_folder_state(out: Path, kind: Collection[str], force: bool, option: str) -> None:
    """(b), (c), (d) for a folder output."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        if not force:
            raise UsageError(f"{option} {out} is a file, but this command writes a folder", hint=_force_hint(option))
        return
    allowed = set(kind) | {parent.as_posix() for name in kind for parent in Path(name).parents}
    other = [name for name in _entries(out) if name not in allowed]
    if other and not force:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UsageError(f"{option} {out} holds files this command does not write ({shown})", hint=_force_hint(option))


def _json_keys(data: bytes) -> set[str] | None:
    try:
        parsed = parse_json(data, "the file")
    except UsageError:  # not JSON: no keys to compare
        return None
    return set(parsed) if isinstance(parsed, dict) else None


def check_file_out(path: Path, data: bytes, force: bool, option: str) -> None:
    """(b), (c), (d) for a single-file output."""
    if not os.path.lexists(path) or force:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder, but this command writes one file", hint=_force_hint(option))
    new_keys = _json_keys(data)
    try:
        old_keys = _json_keys(path.read_bytes()) if path.stat().st_size <= _MAX_JSON else None
    except OSError as exc:
        raise UsageError(f"{option} {path} exists but cannot be read: {exc.strerror or exc}",
                         hint=_force_hint(option)) from exc
    if new_keys is None or not _same_kind(old_keys, new_keys):
        raise UsageError(f"{option} {path} is an existing file of another kind", hint=_force_hint(option))


def _same_kind(old: set[str] | None, new: set[str]) -> bool:
    """The same top-level keys, or both kvq reports (``kvq_version``: validate / eval / inspect JSON)."""
    return old is not None and (old == new or {KVQ_REPORT_KEY} <= old & new)


KVQ_REPORT_KEY = "kvq_version"


def check_report_target(path: str | Path, option: str = "--json") -> None:
    """Before any work: a report file may replace only an earlier kvq report (or nothing)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder, but this command writes one file", hint=_force_hint(option))
    try:
        keys = _json_keys(path.read_bytes()) if path.stat().st_size <= _MAX_JSON else None
    except OSError as exc:
        raise UsageError(f"{option} {path} exists but cannot be read: {exc.strerror or exc}",
                         hint=_force_hint(option)) from exc
    if keys is None or KVQ_REPORT_KEY not in keys:
        raise UsageError(f"{option} {path} is an existing file of another kind", hint=_force_hint(option))


def check_folder_out(
    out: str | Path,
    kind: Collection[str],
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    sources: Sequence[Path] = (),
    carry: Collection[str] = (),
    option: str = "--out",
) -> Path:
    """Apply the policy to a folder output before any work is done; return the path written.

    ``out`` is resolved through symbolic links: the set is replaced where the link points.
    """
    target = Path(os.path.realpath(out))
    check_reads(target, inputs, sources, present(target, carry), option)
    if os.path.lexists(target) and _within(Path(os.path.realpath(os.getcwd())), target):
        raise UsageError(f"{option} {out} holds the current folder, and kvq replaces {option} as a whole",
                         hint=f"run kvq from another folder, or choose another {option}")
    _check_folder_state(target, kind, force, option)
    return target


def present(out: Path, names: Collection[str]) -> set[str]:
    return {name for name in names if out.is_dir() and (out / name).is_file()}
