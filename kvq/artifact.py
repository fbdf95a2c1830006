"""Atomic file output and the metadata every artifact carries.

Nothing kvq writes is ever left half-written: each file goes to a temporary name in its final
folder and is renamed into place only once every file of the artifact is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from kvq.errors import UsageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files_atomically(files: Mapping[Path, bytes]) -> None:
    """Write every file under a temporary name, then rename all of them into place.

    If anything fails before the renames, no target file is touched and the temporaries are removed.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((Path(tmp), path))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialize tensors (made contiguous, on CPU) with string metadata."""
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=dict(sorted(metadata.items())))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a UsageError naming ``what`` if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{what} {path} is not a readable safetensors file: {exc}") from None


def require_file(path: str | Path, what: str, hint: str | None = None) -> Path:
    """``path`` as a Path if it is an existing file, else a UsageError naming ``what``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {p} does not exist", hint=hint)
    if not p.is_file():
        raise UsageError(f"{what} {p} is not a file", hint=hint)
    return p
