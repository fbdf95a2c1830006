"""The one writer of every file kvq writes: atomic replacement of a folder or a file, after the policy.

The policy for an existing output is :mod:`kvq.io.out_policy`'s. A folder is written complete into a
temporary sibling and put in place with one rename: on Linux the two folders are swapped with
renameat2(RENAME_EXCHANGE), so at every instant the output path holds the complete old set or the
complete new set; the old set (now at the temporary name) is deleted afterwards. A single file is
written to a temporary name beside it, fsynced and renamed over it. Temporaries are named
``.NAME.HOST.PID.TOKEN.new.kvq-tmp``; a later write removes those whose process is dead (on this
host), so a killed run leaves nothing behind for long. A NAME too long for that to stay within the
file system's 255-byte limit is cut (on a character boundary) and followed by ``~`` and 8 hex digits
of its hash, the same for every run, so that any legal output name works and its temporaries are
still found. Files of the kind that the new set does not
write (``carry``) are carried over into it (hard link, copy where the filesystem cannot link).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvq.errors import KvqError, UsageError
from kvq.io.out_policy import check_file_out, check_folder_out, check_reads, present

TMP_SUFFIX = ".kvq-tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_NAME_MAX = 255  # bytes of one file name (ext4, xfs, btrfs, tmpfs, ...)
_NAME_BUDGET = _NAME_MAX - len(f"..{_HOST}.{9 ** 10}.{'f' * 8}.new{TMP_SUFFIX}")  # what NAME may take
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


@dataclass(frozen=True)
class Written:
    """What a write put in place: the files written (not the carried or linked ones), links, copies."""

    paths: list[Path]
    linked: int = 0
    copied: int = 0


# --- temporaries ---------------------------------------------------------------------------------


def temp_stem(name: str) -> str:
    """``name`` as the temporaries of an output called ``name`` start: itself, or, where it is too long for
    the file system's name limit with the rest of the temporary name, its first characters (up to a byte
    budget, never a character cut in two) + ``~`` + 8 hex digits of the whole name's sha256."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_BUDGET:
        return name
    kept, size = [], 0
    for ch in name:
        size += len(os.fsencode(ch))  # 1 to 4 bytes (a byte that is not UTF-8 is one escaped character)
        if size > _NAME_BUDGET - 9:
            break
        kept.append(ch)
    return "".join(kept) + "~" + hashlib.sha256(raw).hexdigest()[:8]


def _temp_path(target: Path, role: str = "new") -> Path:
    """A temporary sibling of ``target``: ``new`` holds a set being written, ``old`` one moved aside."""
    stem = temp_stem(target.name)
    return target.parent / f".{stem}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.{role}{TMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> None:
    """Remove the temporaries a killed kvq run left beside ``target`` (their process, on this host, is dead).

    A set moved aside (``old``) by a run killed before it put the new set in place is moved back.
    """
    pattern = re.compile(
        rf"^\.{re.escape(temp_stem(target.name))}\.{re.escape(_HOST)}\.(?P<pid>\d+)\.[0-9a-f]+\.(?P<role>new|old)"
        rf"{re.escape(TMP_SUFFIX)}$"
    )
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None or _pid_alive(int(match.group("pid"))):
            continue
        if match.group("role") == "old" and not os.path.lexists(target):
            os.rename(target.parent / name, target)
        else:
            _remove(target.parent / name)


def _clean_beside(out: str | Path, option: str) -> None:
    target = Path(os.path.realpath(out))
    try:
        remove_stale_temporaries(target)
    except OSError as exc:
        raise _write_error(target, exc, option) from exc


# --- putting a new set in place ------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux renameat2 with RENAME_EXCHANGE).

    Returns False where the kernel, libc or filesystem does not support it. Hand-written with ctypes:
    the standard library binds only rename / replace, and the one PyPI wrapper (``renameat2``, last
    released 2022) is an unmaintained single-purpose package outside kvq's stack.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_in_place(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new`` in one step; ``new`` is left holding the old content (or gone)."""
    if not os.path.lexists(target):
        os.rename(new, target)
    elif not new.is_dir() and not target.is_dir():
        os.replace(new, target)
    elif not _exchange(new, target):
        # Without RENAME_EXCHANGE: two renames; between them the target is briefly absent (never mixed).
        aside = _temp_path(target, "old")
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(aside, target)  # the old set back: a failure leaves the target as it was
            raise
        os.rename(aside, new)
    _fsync_dir(target.parent)


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode the umask allows
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target``; copy where the filesystem cannot link. True if linked."""
    real = Path(os.path.realpath(source))
    try:
        os.link(real, target)
        return True
    except OSError:
        shutil.copy2(real, target)
        return False


def _write_error(path: Path, exc: OSError, option: str) -> KvqError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENAMETOOLONG:
        return UsageError(f"cannot write {option} {path}: {reason}", hint=f"choose a shorter {option} name "
                          "(at most 255 bytes a name)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        hint = (f"choose a writable {option} path" if option.startswith("--")
                else f"make {option} writable, or copy it to a writable place and pass the copy")
        return UsageError(f"cannot write {option} {path}: {reason}", hint=hint)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return KvqError(f"cannot write {option} {path}: {reason}", hint="free some space, or choose another "
                        f"{option} on a disk with room; the previous output is unchanged")
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return KvqError(f"cannot write {option} {path}{where}: {reason}")


@contextmanager
def _staging(target: Path, option: str) -> Iterator[Path]:
    """A fresh temporary path beside ``target``; gone afterwards, whatever happens; OSError -> one clear error."""
    tmp = _temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
    except OSError as exc:
        raise _write_error(target, exc, option) from exc
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _check_relative(name: str) -> None:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"output file name {name!r} is not a relative path inside the output")


def write_folder(
    out: str | Path,
    files: Mapping[str, bytes],
    *,
    links: Mapping[str, Path] | None = None,
    kind: Collection[str] | None = None,
    carry: Collection[str] = (),
    force: bool = False,
    inputs: Sequence[Path] = (),
    sources: Sequence[Path] = (),
    option: str = "--out",
) -> Written:
    """Put the folder ``out`` in place holding ``files`` (bytes), ``links`` (hard links) and ``carry``.

    ``kind`` (default: the names written and linked) is what (c) accepts in an existing folder;
    ``carry`` names the files of an existing folder that go into the new set when it does not write
    them. On any failure ``out`` holds what it held before and no temporary is left.
    """
    links = dict(links or {})
    for name in (*files, *links):
        _check_relative(name)
    kind = set(files) | set(links) if kind is None else set(kind)
    _clean_beside(out, option)
    target = check_folder_out(out, kind, force=force, inputs=inputs, sources=sources, carry=carry, option=option)
    carried = sorted(present(target, carry) - set(files) - set(links))
    linked = copied = 0
    with _staging(target, option) as tmp:
        os.mkdir(tmp, 0o777)
        sources_of = {**{name: target / name for name in carried}, **links}
        for name, source in sorted(sources_of.items()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                if link_or_copy(source, tmp / name):
                    linked += name in links
                else:
                    copied += name in links
            except OSError as exc:
                raise KvqError(f"cannot link or copy {source} into {option} {target}: {exc.strerror or exc}") from exc
        for name, data in sorted(files.items()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _write_bytes(tmp / name, data)
        for folder in sorted({(tmp / name).parent for name in (*files, *sources_of)}, reverse=True):
            _fsync_dir(folder)
        _put_in_place(tmp, target)
    return Written([Path(out) / name for name in files], linked, copied)


def write_file(
    path: str | Path,
    data: bytes,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    option: str = "--out",
) -> Path:
    """Write one file atomically (temporary beside it, fsync, rename over it); return its path."""
    target = Path(os.path.realpath(path))
    _clean_beside(target, option)
    check_reads(target, inputs, (), (), option)
    check_file_out(target, data, force, option)
    with _staging(target, option) as tmp:
        _write_bytes(tmp, data)
        _put_in_place(tmp, target)
    return Path(path)


@contextmanager
def staged_folder(out: str | Path, *, kind: Collection[str] = (), force: bool = False,
                  option: str = "--out") -> Iterator[Path]:
    """A temporary folder for a library to fill (``save_pretrained``, say), put in place at ``out`` as one
    set when the block ends without an error; removed otherwise. The policy is that of :func:`write_folder`.
    """
    _clean_beside(out, option)
    target = check_folder_out(out, kind, force=force, option=option)
    with _staging(target, option) as tmp:
        os.mkdir(tmp, 0o777)
        yield tmp
        for folder, _, names in os.walk(tmp):
            for name in names:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(folder))
        _put_in_place(tmp, target)

