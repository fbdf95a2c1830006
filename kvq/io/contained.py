"""A checkpoint is read only inside its own folder: the file names its index lists are checked first.

A ``model.safetensors.index.json`` names each weight file relative to the folder it sits in. A name
that is absolute, or that climbs above the folder with ``..``, points at a file the checkpoint does
not hold (``/etc/passwd``, a sibling's secrets); kvq reports or refuses such a name and never opens
it. The check is on the name, not on where links lead: a Hugging Face cache snapshot's files are
links into ``../../blobs`` and are the checkpoint's own.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath


def leaves_folder(name: str) -> bool:
    """Whether the relative file name ``name`` (as an index lists it) points outside the folder it is read in."""
    if not name or "\x00" in name or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return True
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute():
        return True
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def files_outside(weight_map: dict) -> list[str]:
    """The distinct file names of an index's ``weight_map`` that leave the checkpoint folder, sorted."""
    return sorted({str(file) for file in weight_map.values() if leaves_folder(str(file))})
