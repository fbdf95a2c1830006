"""What every export shares: the model check, granularity reduction, TP head split, atomic output.

An exporter is a pure function from an :class:`ExportRequest` (the scales, the model's shape and,
where the format needs them, the model's files) to an :class:`ExportPlan` (bytes to write, files to
link, notes for the user). :func:`write_plan` then puts the plan on disk atomically.

Reduction (``--reduce max``): a format holding one scale where the artifact has several (per head
-> per tensor, per channel -> per head, several heads on one TP rank) takes their maximum. For a
symmetric scale this is exact: ``scale = max(absmax / qmax, floor)`` is monotone in absmax, so the
maximum of the scales is the scale of the merged range. An asymmetric (scale, zero point) pair
cannot be merged that way (the calibrated range is not recoverable from a rounded zero point), so
kvq refuses to reduce asymmetric parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from kvq.errors import KvqError, UsageError
from kvq.recipe import QuantSpec
from kvq.scales import KVScales

FORMATS: tuple[str, ...] = ("vllm", "modelopt", "sglang-json", "trtllm", "lmdeploy")
Which = Literal["k", "v"]
_WHICH: tuple[Which, Which] = ("k", "v")
_NAME = {"k": "K", "v": "V"}


# --- the model the scales are for ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The KV-cache shape the export is written for, and where it came from."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str | None
    config_hash: str | None
    source: str  # "model <id>" or "the artifact's metadata"


@dataclass(frozen=True)
class ModelFiles:
    """A local Hugging Face checkpoint folder and its parsed config.json."""

    folder: Path
    config: dict


@dataclass(frozen=True)
class ExportRequest:
    scales: KVScales
    shape: ModelShape
    files: ModelFiles | None
    tp: int
    reduce: str | None
    trtllm_checkpoint: Path | None = None


@dataclass
class ExportPlan:
    """What to write. ``content`` for a single-file output; ``files`` + ``links`` for a folder."""

    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes
    links: dict[str, Path] = field(default_factory=dict)  # relative path -> source file (hard link)
    notes: list[str] = field(default_factory=list)
    content: bytes | None = None


@dataclass(frozen=True)
class Exporter:
    """One engine format: its builder and what it needs."""

    build: Callable[[ExportRequest], ExportPlan]
    needs_model_files: bool  # writes a checkpoint folder around the model's own files
    uses_tp: bool  # holds one entry per tensor-parallel rank
    output: Literal["folder", "file"]


@dataclass
class ExportResult:
    out: Path
    format: str
    written: list[str]
    linked: int
    copied: int
    notes: list[str]


def _meta_int(scales: KVScales, key: str) -> int | None:
    raw = scales.metadata.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"the artifact's metadata {key}={raw!r} is not an integer") from None


def shape_from_metadata(scales: KVScales) -> ModelShape:
    """The shape the artifact records (what `kvq calibrate` measured)."""
    values = {key: _meta_int(scales, key) for key in ("num_layers", "num_kv_heads", "head_dim")}
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise UsageError(
            f"the artifact records no {', '.join(missing)} in its metadata, so its KV-cache shape is unknown",
            hint="pass --model with the model the scales were calibrated on",
        )
    return ModelShape(
        num_layers=values["num_layers"],
        num_kv_heads=values["num_kv_heads"],
        head_dim=values["head_dim"],
        model_type=scales.metadata.get("model_type") or None,
        config_hash=scales.metadata.get("config_hash") or None,
        source="the artifact's metadata",
    )


def model_shape_and_files(name: str | None, need_files: bool, fmt: str) -> tuple[ModelShape, ModelFiles | None]:
    """Shape (and files) of ``--model``: reads the config only, never the weights."""
    from transformers import AutoConfig

    from kvq.models import config_hash, kv_shape, resolve_model

    model_id, source, folder = resolve_model(name)
    if need_files and folder is None:
        raise UsageError(
            f"--format {fmt} writes a complete checkpoint around the model's files, and {model_id!r} "
            "is a hub id, not a local folder",
            hint="download the checkpoint (e.g. `huggingface-cli download`) and pass its folder with --model",
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model {model_id}: cannot read its config: {str(exc).splitlines()[0]}") from None
    num_layers, num_kv_heads, head_dim = kv_shape(config)
    shape = ModelShape(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        model_type=str(config.model_type),
        config_hash=config_hash(config),
        source=f"model {model_id}",
    )
    files = None
    if folder is not None and need_files:
        config_path = folder / "config.json"
        try:
            files = ModelFiles(folder=folder, config=json.loads(config_path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"model {model_id}: cannot read {config_path}: {exc}") from None
    return shape, files


def check_against_model(scales: KVScales, shape: ModelShape) -> list[str]:
    """Refuse an artifact calibrated on another model; return notes on what could not be checked."""
    recorded: dict[str, object] = {
        "num_layers": _meta_int(scales, "num_layers"),
        "num_kv_heads": _meta_int(scales, "num_kv_heads"),
        "head_dim": _meta_int(scales, "head_dim"),
        "model_type": scales.metadata.get("model_type") or None,
        "config_hash": scales.metadata.get("config_hash") or None,
    }
    actual: dict[str, object] = {
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "model_type": shape.model_type,
        "config_hash": shape.config_hash,
    }
    mismatches = [
        f"{key} {recorded[key]} (artifact) vs {actual[key]} ({shape.source})"
        for key in recorded
        if recorded[key] is not None and actual[key] is not None and recorded[key] != actual[key]
    ]
    if mismatches:
        raise UsageError(
            "the scales were calibrated on a different model: " + "; ".join(mismatches),
            hint="export with the model the scales were calibrated on (--model), or calibrate this one",
        )
    unchecked = [key for key in recorded if recorded[key] is None]
    if unchecked:
        return [f"the artifact records no {', '.join(unchecked)}: not checked against {shape.source}"]
    return []


def expected_shape(spec: QuantSpec, shape: ModelShape) -> tuple[int, ...]:
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "head":
        return (shape.num_kv_heads,)
    return (shape.num_kv_heads, shape.head_dim)


def check_tensors(scales: KVScales, shape: ModelShape) -> None:
    """Every layer present, every scale / zero point of the shape its granularity implies."""
    want = set(range(shape.num_layers))
    have = set(scales.layers)
    if have != want:
        missing = sorted(want - have)
        extra = sorted(have - want)
        parts = []
        if missing:
            parts.append(f"missing layers {_ranges(missing)}")
        if extra:
            parts.append(f"layers {_ranges(extra)} beyond the model's {shape.num_layers}")
        raise UsageError(
            f"the artifact's layers do not match {shape.source} ({shape.num_layers} layers): " + "; ".join(parts)
        )
    for i in sorted(scales.layers):
        layer = scales.layers[i]
        for which in _WHICH:
            spec = scales.recipe.spec(which)
            want_shape = expected_shape(spec, shape)
            for what, tensor in (("scale", layer.scale(which)), ("zero point", layer.zero_point(which))):
                if tensor is None:
                    continue
                if tuple(tensor.shape) != want_shape:
                    raise UsageError(
                        f"layer {i} {_NAME[which]} {what} has shape {tuple(tensor.shape)}, but granularity "
                        f"{spec.granularity} on {shape.source} needs {want_shape}"
                    )
            if not torch.isfinite(layer.scale(which)).all() or (layer.scale(which) <= 0).any():
                raise UsageError(f"layer {i} {_NAME[which]} scale holds a value that is not a positive number")


def _ranges(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values[:8]) + (f" ... ({len(values)} in all)" if len(values) > 8 else "")


# --- what a format can hold ----------------------------------------------------------------------


def spec_label(spec: QuantSpec) -> str:
    sym = "symmetric" if spec.symmetric else "asymmetric"
    return f"{spec.format} {sym} per {spec.granularity}"


def require_same_format(scales: KVScales, fmt: str) -> str:
    """The one number format of K and V (every engine format holds one for both)."""
    k, v = scales.recipe.key, scales.recipe.value
    if k.format != v.format:
        raise UsageError(
            f"--format {fmt} stores K and V in one cache dtype, but the recipe quantizes K as {k.format} "
            f"and V as {v.format}",
            hint="solve a recipe with the same format for keys and values",
        )
    return k.format


def refuse_format(scales: KVScales, fmt: str, allowed: Sequence[str], why: str, hint: str) -> None:
    number = require_same_format(scales, fmt)
    if number not in allowed:
        raise UsageError(f"--format {fmt} cannot hold {number} scales: {why}", hint=hint)


# --- TP ranks and reduction ----------------------------------------------------------------------


def heads_of_rank(num_kv_heads: int, tp: int, rank: int) -> list[int]:
    """The KV heads tensor-parallel rank ``rank`` holds: contiguous blocks, or one replicated head.

    With num_kv_heads >= tp the heads are split in equal contiguous blocks (vLLM, SGLang, LMDeploy
    and TensorRT-LLM all shard the K/V projection rows that way); with fewer heads than ranks each
    head is replicated on tp / num_kv_heads consecutive ranks. Call :func:`check_tp` first.
    """
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (tp // num_kv_heads)]


def check_tp(num_kv_heads: int, tp: int, fmt: str, allow_replication: bool) -> None:
    if tp < 1:
        raise UsageError(f"--tp {tp} must be at least 1")
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise UsageError(
                f"--format {fmt} splits the {num_kv_heads} KV heads across --tp {tp} ranks, "
                f"but {num_kv_heads} is not divisible by {tp}",
                hint="use a tensor-parallel size that divides the number of KV heads",
            )
        return
    if not allow_replication:
        raise UsageError(
            f"--format {fmt} splits the {num_kv_heads} KV heads across --tp {tp} ranks and cannot replicate "
            f"heads: --tp must not exceed {num_kv_heads}",
            hint="use a tensor-parallel size that divides the number of KV heads",
        )
    if tp % num_kv_heads:
        raise UsageError(
            f"--tp {tp} exceeds the {num_kv_heads} KV heads and is not a multiple of it, so the engine cannot "
            "replicate heads evenly",
            hint=f"use a tensor-parallel size that divides or is a multiple of {num_kv_heads}",
        )


@dataclass(frozen=True)
class Grouped:
    """One (scale, zero point) per target group, float32 / int32, shape (num_groups,)."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    reduced: bool  # several source values were merged into one


def group_values(
    scales: KVScales,
    layer: int,
    which: Which,
    groups: Sequence[Sequence[int]],
    reduce: str | None,
    fmt: str,
    target: str,
) -> Grouped:
    """The layer's K or V parameters, one per group of KV heads (``target`` names the groups).

    A per-tensor scale fills every group; a per-head scale whose groups hold one head each is
    selected as is; anything else merges several values and needs ``reduce == "max"`` and a
    symmetric spec.
    """
    spec = scales.recipe.spec(which)
    scale = scales.layers[layer].scale(which).to(torch.float32)
    zp = scales.layers[layer].zero_point(which)
    n = len(groups)
    if spec.granularity == "tensor":
        out_zp = None if zp is None else zp.to(torch.int32).reshape(1).expand(n).clone()  # () -> (n,)
        return Grouped(scale.reshape(1).expand(n).clone(), out_zp, reduced=False)  # () -> (n,)
    if spec.granularity == "head" and all(len(g) == 1 for g in groups):
        index = torch.tensor([g[0] for g in groups], dtype=torch.long)
        out_zp = None if zp is None else zp.to(torch.int32)[index]
        return Grouped(scale[index], out_zp, reduced=False)
    if not spec.symmetric:
        raise UsageError(
            f"--format {fmt} holds one {_NAME[which]} (scale, zero point) {target}, but the artifact's {_NAME[which]} "
            f"parameters are {spec_label(spec)}: merging asymmetric parameters is not exact, so kvq does not do it",
            hint=f"solve a recipe whose {_NAME[which]} granularity is tensor (or one head {target})",
        )
    if reduce != "max":
        raise UsageError(
            f"--format {fmt} holds one {_NAME[which]} scale {target}, but the artifact's {_NAME[which]} scales are "
            f"{spec_label(spec)}",
            hint="pass --reduce max to take their maximum (exact for symmetric scales), "
            "or solve a coarser recipe with `kvq solve`",
        )
    per_head = scale if spec.granularity == "head" else scale.amax(dim=-1)  # (H, D) -> (H,)
    values = torch.stack([per_head[list(g)].amax() for g in groups])  # (n,)
    return Grouped(values, None, reduced=True)


def reduction_note(which: str, spec: QuantSpec, target: str) -> str:
    return (
        f"--reduce max: {which} scales reduced from per {spec.granularity} to one {target} "
        f"(maximum; exact for symmetric scales)"
    )


# --- safetensors headers -------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets); no data read."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path} is not a safetensors file (its header is not a mapping)")
    return header


def tensor_bytes(header: dict) -> int:
    return sum(end - start for key, entry in header.items() if key != "__metadata__"
               for start, end in [entry["data_offsets"]])


# --- writing -------------------------------------------------------------------------------------


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_out(out: Path, force: bool, sources: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Refuse an output that would overwrite data without --force, or that overlaps what is read.

    ``sources`` (the model and checkpoint folders the export links from) may neither hold nor be
    inside ``out``; ``inputs`` (the artifact) may not be inside ``out`` (or be ``out``).
    """
    for source in sources:
        if _is_within(out, source) or _is_within(source, out):
            raise UsageError(
                f"--out {out} overlaps {source}, which the export reads from",
                hint="write the export to a new path outside the model folder",
            )
    for source in inputs:
        if _is_within(source, out):
            raise UsageError(f"--out {out} would replace the artifact {source}", hint="choose another --out")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        what = "folder" if out.is_dir() else "file"
        raise UsageError(f"--out {out} is an existing non-empty {what}", hint="pass --force to replace it")


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target``; copy where the filesystem cannot link. True if linked."""
    real = source.resolve(strict=True)
    try:
        os.link(real, target)
        return True
    except OSError:
        shutil.copy2(real, target)
        return False


def write_plan(plan: ExportPlan, out: Path, kind: Literal["folder", "file"], force: bool) -> tuple[int, int]:
    """Write the plan at ``out`` atomically; return (files linked, files copied).

    A folder is built complete in a temporary sibling folder and renamed into place; a replaced
    output (``--force``) is moved aside first and deleted only once the new one is in place. A
    failure at any point leaves ``out`` as it was and no temporary behind.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; this format writes one file", hint="give a file path")
        assert plan.content is not None
        from kvq.artifact import write_files_atomically

        write_files_atomically({out: plan.content})
        return 0, 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".kvq-tmp", dir=out.parent))
    old: Path | None = None
    linked = copied = 0
    try:
        for rel, source in sorted(plan.links.items()):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if _link_or_copy(source, target):
                    linked += 1
                else:
                    copied += 1
            except OSError as exc:
                raise KvqError(f"cannot link or copy {source} into the export: {exc}") from None
        for rel, data in sorted(plan.files.items()):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                out.rmdir()
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".kvq-old", dir=out.parent))
                os.replace(out, old / "previous")
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / "previous", out)  # put the replaced output back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return linked, copied


def float_list(values: torch.Tensor) -> list[float]:
    """float32 values as Python floats (exact: every float32 is a float64)."""
    return [float(v) for v in values.to(torch.float32).tolist()]
