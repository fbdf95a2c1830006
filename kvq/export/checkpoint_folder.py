"""A Hugging Face checkpoint folder with added KV-scale tensors (shared by the vllm and modelopt formats).

The model's files are hard-linked (copied where the filesystem cannot link) and left byte-identical;
the scales go into one new safetensors shard listed in ``model.safetensors.index.json``. A model
saved as a single ``model.safetensors`` is re-listed as ``model-00001-of-00001.safetensors`` plus an
index: transformers loads a ``model.safetensors`` and ignores any index beside it
(transformers/modeling_utils.py, ``_get_resolved_checkpoint_files``), so the file must not keep that
name or the scales would never be read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kvq import __version__
from kvq.artifacts.files import json_bytes, safetensors_bytes
from kvq.errors import UsageError
from kvq.export.model_check import WHICH, ModelFiles, Which
from kvq.export.request import ExportPlan, ExportRequest
from kvq.export.tensor_parallel import group_values, reduction_notes
from kvq.io.contained import files_outside
from kvq.io.parse import parse_json
from kvq.model.kv_config import kv_sharing_targets
from kvq.model.mla import is_mla

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
RENAMED_SINGLE = "model-00001-of-00001.safetensors"
SCALES_SHARD = "kvq-kv-scales.safetensors"
_K_PROJ = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<i>\d+)\.self_attn\.(?P<proj>k_proj|qkv_proj|kv_a_proj_with_mqa)\.weight$")
# Names under which checkpoints already carry KV-cache scales (compressed-tensors, ModelOpt, old FP8).
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale", ".k_proj.output_scale", ".v_proj.output_scale")
# Bytes per element of the safetensors dtypes (the format's spec); for the index's total_size.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class WeightIndex:
    weight_map: dict[str, str]  # tensor name -> file name (as the export lists it)
    metadata: dict  # the index's metadata (total_size updated on write)
    sources: dict[str, Path]  # file name in the export -> the model's file


def read_weights(files: ModelFiles) -> WeightIndex:
    """The model's tensor names and the files holding them (headers only, no weights read)."""
    folder = files.folder
    index_path = folder / INDEX
    single_path = folder / SINGLE
    if index_path.is_file():
        if single_path.exists():
            raise UsageError(
                f"model folder {folder} holds both {SINGLE} and {INDEX}; loaders disagree on which one counts",
                hint=f"remove the stale one from the model folder (transformers reads {SINGLE}, vLLM the index)",
            )
        try:
            index = parse_json(index_path.read_bytes(), str(index_path))
            weight_map = dict(index["weight_map"])
        except RecursionError as exc:
            raise UsageError(f"{index_path} does not parse as JSON: nested too deeply") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        outside = files_outside(weight_map)
        if outside:  # refused before any file is opened: a checkpoint is read only inside its folder
            raise UsageError(f"{index_path}: weight_map points to {outside[0]!r}, outside the model folder",
                             hint="kvq reads a checkpoint only inside its folder: fix the index or copy the weights in")
        metadata = dict(index.get("metadata") or {})
        sources = {}
        for name in sorted(set(weight_map.values())):
            path = folder / name
            if not path.is_file():
                raise UsageError(f"{index_path} lists {name}, which is not in {folder}")
            sources[name] = path
        return WeightIndex(weight_map, metadata, sources)
    if single_path.is_file():
        names, size = _names_and_size(single_path)
        metadata = {} if size is None else {"total_size": size}
        return WeightIndex({name: RENAMED_SINGLE for name in names}, metadata, {RENAMED_SINGLE: single_path})
    raise UsageError(
        f"model folder {folder} has no safetensors weights ({SINGLE} or {INDEX})",
        hint="save the model with safetensors (save_pretrained(..., safe_serialization=True))",
    )


def _names_and_size(path: Path) -> tuple[list[str], int | None]:
    """The tensor names of a safetensors file and their total bytes (None for a dtype kvq does not know).

    Reads the header only (safe_open does not load tensors until asked).
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
            slices = [fh.get_slice(name) for name in names]
            dtypes = [s.get_dtype() for s in slices]
            if not all(d in _DTYPE_BYTES for d in dtypes):
                return names, None
            return names, sum(math.prod(s.get_shape()) * _DTYPE_BYTES[d] for s, d in zip(slices, dtypes, strict=True))
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc


def attention_module_names(index: WeightIndex, layers: Sequence[int], export_format: str,
                           fused_qkv: bool = False, mla: bool = False) -> dict[int, str]:
    """Layer index -> the attention module's name (``model.layers.{i}.self_attn``) of every layer in ``layers``
    (those with a KV cache), from its k_proj weight, or with ``fused_qkv`` also its fused qkv_proj (Phi-3); with
    ``mla`` from its kv_a_proj_with_mqa weight (MLA's latent projection: DeepSeek-V2 / V3), ignoring the layers
    past the decoder's (DeepSeek-V3's multi-token-prediction layer ``model.layers.{num_hidden_layers}``, which
    vLLM's DeepSeek loader skips: deepseek_v2.py:1650-1652@0.34.0)."""
    projections = ("kv_a_proj_with_mqa",) if mla else ("k_proj", "qkv_proj") if fused_qkv else ("k_proj",)
    matches = [m for m in map(_K_PROJ.match, index.weight_map) if m is not None]
    if mla:
        matches = [m for m in matches if int(m.group("i")) <= max(layers, default=0)]
    by_prefix: dict[str, dict[int, str]] = {}
    for m in matches:
        if m.group("proj") in projections:
            i = int(m.group("i"))
            by_prefix.setdefault(m.group("prefix"), {})[i] = f"{m.group('prefix')}.{i}.self_attn"
    candidates = [mods for mods in by_prefix.values() if set(mods) == set(layers)]
    if len(candidates) != 1:
        found = ", ".join(sorted(by_prefix)) or "none"
        which = " or ".join(f"`*.layers.N.self_attn.{p}.weight`" for p in projections)
        fused = fused_qkv or all(m.group("proj") != "qkv_proj" for m in matches)
        raise UsageError(
            f"--format {export_format} names scales after the attention modules, but the model's weights have no "
            f"single set of {which} tensors for its {len(layers)} layers with a KV cache (found: {found})",
            hint="this format supports models with k_proj / v_proj projections (Llama, Qwen2, Mistral, Gemma, ...)"
            + ("" if fused else "; for a fused-QKV model (qkv_proj) export --format vllm"),
        )
    return {i: candidates[0][i] for i in layers}


def refuse_existing_scales(index: WeightIndex, folder: Path) -> None:
    existing = sorted(name for name in index.weight_map if name.endswith(_KV_SCALE_SUFFIXES))
    if existing:
        raise UsageError(
            f"model {folder} already carries KV-cache scales ({existing[0]}"
            + (f" and {len(existing) - 1} more" if len(existing) > 1 else "")
            + "); adding kvq's beside them would leave two values per attention layer",
            hint="export from the checkpoint without KV-cache scales",
        )


def model_file_links(folder: Path, index: WeightIndex, rewritten: set[str]) -> dict[str, Path]:
    """Every file of the model folder (recursively, hidden entries skipped) to link into the export.

    Weight files are linked under the names the index lists; files the export rewrites are left out.
    """
    weight_files = {path.resolve() for path in index.sources.values()}
    links: dict[str, Path] = {name: path for name, path in index.sources.items()}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        name = rel.as_posix()
        if name in rewritten or name in (INDEX, SINGLE) or path.resolve() in weight_files:
            continue
        links[name] = path
    return links


def rewritten_shards(index: WeightIndex, modified: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The weight files holding a ``modified`` tensor, rewritten with it (every other tensor and the file's
    metadata as they were): only the shards a transform touched are rewritten, the rest stay linked."""
    unknown = sorted(set(modified) - set(index.weight_map))
    if unknown:
        raise UsageError(f"the transformed weights name {unknown[0]}, which the model's checkpoint does not hold",
                         hint="export with the model the transforms were calibrated on")
    shards: dict[str, bytes] = {}
    for shard in sorted({index.weight_map[name] for name in modified}):
        path = index.sources[shard]
        try:
            with safe_open(str(path), framework="pt") as fh:
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
                metadata = dict(fh.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc
        for name in [n for n in modified if index.weight_map[n] == shard]:
            new, old = modified[name], tensors[name]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise UsageError(f"transformed {name} has shape {tuple(new.shape)} {new.dtype}, the checkpoint's "
                                 f"{tuple(old.shape)} {old.dtype}")
            tensors[name] = new
        shards[shard] = safetensors_bytes(tensors, metadata)
    return shards


def checkpoint_plan(
    files: ModelFiles,
    index: WeightIndex,
    scale_tensors: dict[str, torch.Tensor],
    rewritten: dict[str, bytes],
    modified: dict[str, torch.Tensor] | None = None,
) -> ExportPlan:
    """Model files linked, ``scale_tensors`` in a new shard, the index updated, ``rewritten`` written;
    the weight files holding a ``modified`` tensor (folded transforms) rewritten with it."""
    clash = sorted(set(scale_tensors) & set(index.weight_map))
    if clash:
        raise UsageError(f"model {files.folder} already has a tensor named {clash[0]}")
    if SCALES_SHARD in index.sources or (files.folder / SCALES_SHARD).exists():
        raise UsageError(f"model {files.folder} already has a file named {SCALES_SHARD}",
                         hint="export from the model's original folder, not from a kvq export")
    weight_map = dict(index.weight_map)
    for name in scale_tensors:
        weight_map[name] = SCALES_SHARD
    metadata = dict(index.metadata)
    added = sum(t.numel() * t.element_size() for t in scale_tensors.values())
    if isinstance(metadata.get("total_size"), int):
        metadata["total_size"] = metadata["total_size"] + added
    new_index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    plan = ExportPlan()
    shards = rewritten_shards(index, modified) if modified else {}
    plan.links = model_file_links(files.folder, index, set(rewritten) | {SCALES_SHARD})
    for shard in shards:
        plan.links.pop(shard, None)
    plan.files = {**rewritten, **shards}
    plan.files[INDEX] = json_bytes(new_index)
    plan.files[SCALES_SHARD] = safetensors_bytes(
        scale_tensors, {"format": "pt", "producer": f"kvq {__version__}"}
    )
    if SINGLE in {p.name for p in index.sources.values()} and RENAMED_SINGLE in index.sources:
        plan.notes.append(
            f"the model's single {SINGLE} is listed as {RENAMED_SINGLE} with a new {INDEX} "
            "(transformers ignores an index beside a model.safetensors)"
        )
    return plan


@dataclass(frozen=True)
class CheckpointScales:
    """The KV scales of a checkpoint export, named after the model's attention modules."""

    files: ModelFiles
    index: WeightIndex
    tensors: dict[str, torch.Tensor]
    notes: list[str]


def checkpoint_scales(
    req: ExportRequest,
    export_format: str,
    groups: Callable[[int], list[list[int]]],
    target: str,
    place: Callable[[str, Which, torch.Tensor], tuple[str, torch.Tensor]],
    fused_qkv: bool = False,
) -> CheckpointScales:
    """Every KV-cache layer's K and V scale, one per group of KV heads (``groups(heads)`` of the layer's K or V
    heads), as ``place(module, which, scales)`` names and shapes it (``scales``: shape (number of groups,)); refuses a model that already has KV scales. ``fused_qkv``:
    the format also names the attention module of a fused qkv_proj (its loader maps ``self_attn.k_scale``).
    A KV-sharing layer (Gemma 4's last ``num_kv_shared_layers``) has no cache of its own but reads an earlier
    layer's with its own attention layer's scales (vLLM 0.34.0 gemma4.py:495-540, attention.py:816-820,
    v1/attention/backends/flash_attn.py:1328; 1.0 when none is loaded, quantization/kv_cache.py:118-122):
    it is named too, with the scales of the layer it reads."""
    files = req.model_files(export_format)
    index = read_weights(files)
    refuse_existing_scales(index, files.folder)
    modules = attention_module_names(index, req.shape.kv_layers, export_format, fused_qkv, is_mla(req.scales.metadata))
    # KV sharing (Gemma 4): a layer that reads an earlier layer's cache gets that layer's scales, under its own name
    shared = {i: j for i, j in kv_sharing_targets(files.config).items()
              if j in req.shape.kv_layers and i not in req.shape.kv_layers}
    tensors: dict[str, torch.Tensor] = {}
    reduced: set[str] = set()
    for i in req.shape.kv_layers:
        for which in WHICH:
            heads = req.shape.kv.of(i).of(which)[0]
            grouped = group_values(req.scales, i, which, groups(heads), req.reduce, export_format, target)
            if grouped.reduced:
                reduced.add(which)
            readers = [_sibling(modules[i], i, k) for k, j in sorted(shared.items()) if j == i]
            for module in (modules[i], *readers):  # the layer, and the KV-sharing layers reading its cache
                name, value = place(module, which, grouped.scale)
                tensors[name] = value.to(torch.float32).contiguous()
    notes = reduction_notes(req.scales, reduced, target)
    if shared:
        notes.append("KV-sharing layers " + ", ".join(f"{i} (reads layer {j})" for i, j in sorted(shared.items()))
                     + ": vLLM dequantizes the cache they read with their own attn.k_scale / v_scale (1.0 when "
                     "none is given), so they get the scales of the layer whose cache they read")
    return CheckpointScales(files, index, tensors, notes)


def _sibling(module: str, layer: int, other: int) -> str:
    """``module`` (``model.layers.{layer}.self_attn``) of layer ``other`` instead."""
    return module.removesuffix(f".{layer}.self_attn") + f".{other}.self_attn"
