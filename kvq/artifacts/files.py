"""The calibration artifact set: its file names, how it is written as a set, and how its files are read.

A kvq artifact folder (``kvq calibrate --out``, ``kvq solve --out``) holds some of ``stats.safetensors``,
``scales.safetensors``, ``scales.json``, ``validate.json`` and ``plan.json`` (``kvq plan``). It is written as a set through
:func:`write_artifact` (atomic, with the --out policy of :mod:`kvq.io.atomic`); files of the set that a
write does not replace are carried over, unless they were computed from a file the write replaces
(scales from statistics, the validation report from scales): a stale file never sits beside new ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from kvq.errors import KvqError, UsageError
from kvq.io.atomic import remove_stale_temporaries, write_folder
from kvq.io.out_policy import check_folder_out
from kvq.model.model_spec import KVShape, LayerKV, parse_layer_shapes, parse_layers

STATS_FILE = "stats.safetensors"
SCALES_FILE = "scales.safetensors"
SCALES_JSON = "scales.json"
VALIDATE_JSON = "validate.json"
PLAN_JSON = "plan.json"  # the layers kept unquantized (kvq plan), for these scales
TRANSFORMS_FILE = "transforms.safetensors"  # the transforms folded into the model before calibration (if any)
PARTIAL_FILE = "stats.partial.safetensors"  # an interrupted calibration's statistics so far (--resume)
# ``kvq report`` writes OUT/report/ (kvq/reporting/): part of the artifact folder, drawn from its scales
REPORT_DIR = "report"
REPORT_NAMES: tuple[str, ...] = ("absmax.png", "channels.png", "subnormal.png", "scales.png", "sqnr.png",
                                 "eval_ppl.png", "attention_error.png", "figures.json", "report.md", "report.html")
REPORT_FILES: tuple[str, ...] = tuple(f"{REPORT_DIR}/{name}" for name in REPORT_NAMES)
ARTIFACT_FILES: tuple[str, ...] = (STATS_FILE, SCALES_FILE, SCALES_JSON, VALIDATE_JSON, PLAN_JSON, TRANSFORMS_FILE,
                                   PARTIAL_FILE, *REPORT_FILES)
# Which file each one is computed from: replacing the source drops the derived file from the set. The
# transforms belong to the statistics calibrated on them: a new calibration without transforms drops them.
DERIVED_FROM: dict[str, str] = {SCALES_FILE: STATS_FILE, SCALES_JSON: SCALES_FILE, VALIDATE_JSON: SCALES_FILE,
                                PLAN_JSON: SCALES_FILE, TRANSFORMS_FILE: STATS_FILE, PARTIAL_FILE: STATS_FILE,
                                **{name: SCALES_FILE for name in REPORT_FILES}}  # a new calibration drops the report


def carried_over(written: Collection[str]) -> set[str]:
    """The artifact files a write of ``written`` keeps from the existing set: those not (indirectly) recomputed."""

    def stale(name: str) -> bool:
        source = DERIVED_FROM.get(name)
        return source is not None and (source in written or stale(source))

    return {name for name in ARTIFACT_FILES if name not in written and not stale(name)}


def _artifact_names(names: Collection[str]) -> None:
    unknown = sorted(set(names) - set(ARTIFACT_FILES))
    if unknown:
        raise ValueError(f"{unknown} are not kvq artifact files ({', '.join(ARTIFACT_FILES)})")


def check_artifact_out(out_dir: str | Path, names: Collection[str], *, force: bool = False,
                       inputs: Sequence[Path] = ()) -> Path:
    """The --out policy for an artifact set of ``names``, checked before any work; returns the folder.

    Temporaries a killed kvq run left inside the folder (a partial save cut by SIGKILL, say) are removed
    first: they are kvq's own, not a user's files."""
    _artifact_names(names)
    for name in ARTIFACT_FILES if Path(out_dir).is_dir() else ():  # a file or nothing: the policy says what
        try:
            remove_stale_temporaries(Path(out_dir) / name)
        except OSError as exc:
            raise KvqError(f"--out {out_dir}: cannot remove a killed run's temporary beside {name}: "
                           f"{exc.strerror or exc}") from exc
    return check_folder_out(out_dir, ARTIFACT_FILES, force=force, inputs=inputs, carry=carried_over(names))


def write_artifact(out_dir: Path, files: Mapping[str, bytes], *, force: bool = False,
                   inputs: Sequence[Path] = ()) -> list[Path]:
    """Replace the artifact set in ``out_dir`` by ``files`` (name -> bytes) atomically; the paths written.

    ``inputs`` are the files the command read (refused as --out, and never deleted by the write).
    """
    _artifact_names(files)
    written = write_folder(out_dir, files, kind=ARTIFACT_FILES, carry=carried_over(files), force=force,
                           inputs=inputs)
    return written.paths


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Serialize tensors (made contiguous, on CPU) with string metadata.

    A tensor sharing memory with an earlier one (one zero-point tensor used for K and V, say) is
    copied: safetensors refuses shared storage.
    """
    storages: set[int] = set()
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        plain[name] = t
    return _sorted_metadata(save(plain, metadata=dict(metadata)))


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` keys in sorted order.

    safetensors serializes the metadata from a hash map, so two saves of the same metadata can list
    it in different orders: re-ordering it here makes equal artifacts byte-identical. Hand-written
    because safetensors has no option for it; the header keeps its length (the same keys and values
    re-ordered), so no tensor offset moves.
    """
    (length,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + length]
    header = json.loads(raw, object_pairs_hook=dict)
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:  # cannot happen for a re-ordering; keep the library's bytes rather than guess
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length :]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")


# --- reading -------------------------------------------------------------------------------------


def require_file(path: str | Path, what: str, hint: str | None = None) -> Path:
    """``path`` as a Path if it is an existing file, else a UsageError naming ``what``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {p} does not exist", hint=hint)
    if not p.is_file():
        raise UsageError(f"{what} {p} is not a file", hint=hint)
    return p


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def read_safetensors(path: Path, what: str, hint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a UsageError naming ``what`` if it is not one."""
    path = require_file(path, what, hint)
    if path.stat().st_size == 0:
        raise UsageError(f"{what} {path} is empty", hint=hint)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{what} {path} is not a complete safetensors file ({_first_line(exc)})", hint=hint) from exc


def metadata_int(meta: Mapping[str, str], key: str, where: str) -> int | None:
    """The integer metadata ``key`` (None when absent or empty); a UsageError naming ``where`` if malformed.

    Kept for kvq.inspection's artifact reader; every other reader of an artifact's counts uses
    :class:`StatedShape`, which also bounds them."""
    raw = meta.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise UsageError(f"{where}: metadata {key}={raw[:40]!r} is not an integer") from exc


MAX_COUNT = 1 << 16  # layers, KV heads, head_dim: no model comes near; a file stating more is refused


@dataclass(frozen=True)
class StatedShape:
    """The KV-cache shape an artifact's metadata states (each None where it records none): the one reader of
    these str -> str metadata. :meth:`parse` refuses anything but a count in 1..MAX_COUNT, so no number
    written in a file makes kvq allocate or loop beyond that; :meth:`check` holds them against the tensors.

    ``layers``: each cached layer's K and V (heads, dim), when the metadata states them per layer (``kv_shapes``,
    written for models whose layers differ: :meth:`kvq.model.model_spec.KVShape.to_metadata`)."""

    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    cached_layers: tuple[int, ...] | None = None
    layers: dict[int, LayerKV] | None = None

    @classmethod
    def parse(cls, meta: Mapping[str, str], where: str) -> StatedShape:
        counts = {key: _count(meta.get(key), key, where) for key in ("num_layers", "num_kv_heads", "head_dim")}
        n = counts["num_layers"]
        cached = meta.get("cached_layers")
        cached_layers = parse_layers(cached, n, where) if cached is not None and n is not None else None
        shapes = meta.get("kv_shapes")
        if shapes is None:
            return cls(**counts, cached_layers=cached_layers)
        if n is None:
            raise UsageError(f"{where}: metadata kv_shapes without num_layers", hint="pass the file as kvq wrote it")
        kv = tuple(range(n)) if cached_layers is None else cached_layers
        layers = parse_layer_shapes(shapes, kv, MAX_COUNT, where)
        first = layers[kv[0]].k if kv else None
        if first is not None and (counts["num_kv_heads"], counts["head_dim"]) not in ((None, None), first):
            raise UsageError(f"{where}: metadata num_kv_heads={counts['num_kv_heads']} / head_dim={counts['head_dim']}"
                             f" are not the first cached layer's K shape {first} that kv_shapes states",
                             hint="pass the file as kvq wrote it")
        return cls(**counts, cached_layers=cached_layers, layers=layers)

    def of(self, layer: int) -> LayerKV | None:
        """Layer ``layer``'s K and V (heads, dim) as stated: per layer, else the one num_kv_heads x head_dim
        (None where either is not stated)."""
        if self.layers is not None:
            return self.layers.get(layer)
        if self.num_kv_heads is None or self.head_dim is None:
            return None
        return LayerKV((self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim))

    def kv_shape(self) -> KVShape | None:
        """The stated shape as a :class:`KVShape` (None when num_layers, num_kv_heads or head_dim is not stated)."""
        if self.num_layers is None or self.num_kv_heads is None or self.head_dim is None:
            return None
        if self.layers is None:
            return KVShape(self.num_layers, self.num_kv_heads, self.head_dim, self.cached_layers)
        return KVShape.from_layers(self.num_layers, self.layers, self.cached_layers)

    def check(self, layer: int, which: str, shape: tuple[int, ...], tensor: str, where: str) -> None:
        """A tensor of (heads[, dim]) ``shape`` holding layer ``layer``'s ``which`` ("k" / "v") against the stated
        shape of that layer (per layer, else num_kv_heads and head_dim)."""
        stated = self.of(layer)
        want = stated.of(which) if stated is not None else (self.num_kv_heads, self.head_dim)
        keys = ("heads", "dim") if self.layers is not None else ("num_kv_heads", "head_dim")
        for key, value, held in zip(keys, want, shape, strict=False):
            if value is not None and value != held:
                said = f"kv_shapes gives layer {layer} {which.upper()} {key} {value}" if self.layers is not None \
                    else f"{key}={value}"
                raise UsageError(f"{where}: metadata {said}, but {tensor} is {tuple(shape)} "
                                 "(heads, dim)", hint="pass the file as kvq wrote it")


def _count(raw: str | None, key: str, where: str) -> int | None:
    if raw is None or raw == "":
        return None
    if not re.fullmatch(r"[0-9]{1,18}", raw) or not 1 <= int(raw) <= MAX_COUNT:
        raise UsageError(f"{where}: metadata {key}={raw[:40]!r} is not a count in 1..{MAX_COUNT}",
                         hint="pass the file as kvq wrote it")
    return int(raw)


def read_layers(
    path: Path, what: str, key: re.Pattern[str], required: Sequence[str], hint: str
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, str]]:
    """The per-layer tensors of an artifact file, keyed by layer and part, and its metadata.

    ``key`` matches a tensor name with groups (layer, part). Refuses unknown tensors, a layer lacking
    a ``required`` part, and any gap in layers 0..n-1 (n: the ``num_layers`` metadata, else the
    highest layer + 1).
    """
    raw, meta = read_safetensors(path, what, hint)
    where = f"{what} {path}"
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        match = key.match(name)
        if match is None:
            raise UsageError(f"{where}: unexpected tensor {name!r}", hint=hint)
        parts.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not parts:
        raise UsageError(f"{where} holds no layers", hint=hint)
    stated = StatedShape.parse(meta, where).num_layers
    n = max(parts) + 1 if stated is None else stated
    cached = meta.get("cached_layers") if stated is not None else None
    if cached is None:
        missing, absent = first_missing(parts, n)
        every = f"layers 0..{n - 1} must all be present"
        want: Collection[int] = range(n)
    else:  # a hybrid model: its KV-cache layers only
        want = parse_layers(cached, n, where)
        missing = [i for i in want if i not in parts]
        absent = len(missing)
        every = f"its KV-cache layers {listed(list(want))} must all be present"
    if missing:
        said = "" if stated is None else f" by its metadata num_layers={stated}"
        raise UsageError(f"{where}: layer(s) {listed(missing, absent)} missing ({every}){said}", hint=hint)
    kept = set(want) if cached is not None else None
    extra = sorted(i for i in parts if i >= n or (kept is not None and i not in kept))
    if extra:
        why = f"beyond its num_layers {n}" if cached is None else f"outside its KV-cache layers {listed(list(want))}"
        raise UsageError(f"{where}: layer(s) {listed(extra)} {why}", hint=hint)
    for i in sorted(parts):
        lacking = [part for part in required if part not in parts[i]]
        if lacking:
            raise UsageError(f"{where}: layer {i} lacks {', '.join(lacking)}", hint=hint)
    return parts, meta


def first_missing(present: Collection[int], n: int, show: int = 8) -> tuple[list[int], int]:
    """The first ``show`` of 0..n-1 not in ``present`` and how many are missing in all; the work is bounded by
    ``len(present) + show``, never by ``n`` (a number a file may state)."""
    found = set(present)
    absent = n - sum(1 for i in found if 0 <= i < n)
    shown: list[int] = []
    i = 0
    while len(shown) < min(show, absent):
        if i not in found:
            shown.append(i)
        i += 1
    return shown, absent


def listed(values: Sequence[int], total: int | None = None) -> str:
    """The first 8 of ``values`` (``total`` of them in all, default their number), for one line."""
    total = len(values) if total is None else total
    return ", ".join(map(str, values[:8])) + (f" ... ({total} in all)" if total > 8 else "")
