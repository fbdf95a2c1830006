"""Tensor-parallel ranks and granularity reduction: which KV heads each engine entry covers, and its value.

Reduction (``--reduce max``): a format holding one scale where the artifact has several (per head
-> per tensor, per channel -> per head, several heads on one TP rank) takes their maximum. For a
symmetric scale this is exact: ``scale = max(absmax / qmax, floor)`` is monotone in absmax, so the
maximum of the scales is the scale of the merged range. An asymmetric (scale, zero point) pair
cannot be merged that way (the calibrated range is not recoverable from a rounded zero point), so
kvq refuses to reduce asymmetric parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvq.artifacts.scales import KVScales
from kvq.errors import UsageError
from kvq.export.model_check import KV_NAME, Which, spec_label
from kvq.export.request import ExportRequest


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


def check_tp(num_kv_heads: int, tp: int, export_format: str, allow_replication: bool) -> None:
    if tp < 1:
        raise UsageError(f"--tp {tp} must be at least 1")
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise UsageError(
                f"--format {export_format} splits the {num_kv_heads} KV heads across --tp {tp} ranks, "
                f"but {num_kv_heads} is not divisible by {tp}",
                hint="use a tensor-parallel size that divides the number of KV heads",
            )
        return
    if not allow_replication:
        raise UsageError(
            f"--format {export_format} splits the {num_kv_heads} KV heads across --tp {tp} ranks and cannot replicate "
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
    export_format: str,
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
            f"--format {export_format} holds one {KV_NAME[which]} (scale, zero point) {target}, but the artifact's {KV_NAME[which]} "
            f"parameters are {spec_label(spec)}: merging asymmetric parameters is not exact, so kvq does not do it",
            hint=f"solve a recipe whose {KV_NAME[which]} granularity is tensor (or one head {target})",
        )
    if reduce != "max":
        raise UsageError(
            f"--format {export_format} holds one {KV_NAME[which]} scale {target}, but the artifact's {KV_NAME[which]} scales are "
            f"{spec_label(spec)}",
            hint="pass --reduce max to take their maximum (exact for symmetric scales), "
            "or solve a coarser recipe with `kvq solve`",
        )
    per_head = scale if spec.granularity == "head" else scale.amax(dim=-1)  # (H, D) -> (H,)
    values = torch.stack([per_head[list(g)].amax() for g in groups])  # (n,)
    return Grouped(values, None, reduced=True)


def reduction_notes(scales: KVScales, reduced: set[str], target: str) -> list[str]:
    """One note per tensor (K, V) whose scales ``--reduce max`` merged to one per ``target`` ("per tensor", ...)."""
    return [
        f"--reduce max: {which.upper()} scales reduced from per {scales.recipe.spec(which).granularity} to one "
        f"{target.removeprefix('per ')} (maximum; exact for symmetric scales)"
        for which in sorted(reduced)
    ]


def float_list(values: torch.Tensor) -> list[float]:
    """float32 values as Python floats (exact: every float32 is a float64)."""
    return [float(v) for v in values.to(torch.float32).tolist()]


@dataclass(frozen=True)
class RankValues:
    """Per layer, the K and V parameters of each tensor-parallel rank (each of shape (tp,)), and notes."""

    layers: list[tuple[Grouped, Grouped]]
    notes: list[str]


def rank_values(req: ExportRequest, export_format: str, allow_replication: bool) -> RankValues:
    """The K and V parameters every rank holds in every layer (one value per rank, ``--reduce max`` applied)."""
    if not req.shape.kv.uniform:
        raise UsageError(
            f"--format {export_format} splits one number of KV heads across ranks in every layer, but the model's "
            f"layers cache K/V of different shapes ({req.shape.kv.text()}); kvq has not checked how this engine "
            "loads such a model", hint="export --format vllm, which names each attention layer's scales")
    check_tp(req.shape.num_kv_heads, req.tp, export_format, allow_replication)
    if not req.shape.kv.all_layers_cached:
        raise UsageError(
            f"--format {export_format} lists one scale per decoder layer, but only layers "
            f"{', '.join(map(str, req.shape.kv_layers))} of the model's {req.shape.num_layers} hold a KV cache "
            "(the others are linear attention / Mamba); kvq has not checked how this engine loads such a model",
            hint="export --format vllm, which names each attention layer's scales",
        )
    groups = [heads_of_rank(req.shape.num_kv_heads, req.tp, r) for r in range(req.tp)]
    target = "per TP rank" if req.tp > 1 else "per tensor"
    layers: list[tuple[Grouped, Grouped]] = []
    reduced: set[str] = set()
    for i in range(req.shape.num_layers):
        k = group_values(req.scales, i, "k", groups, req.reduce, export_format, target)
        v = group_values(req.scales, i, "v", groups, req.reduce, export_format, target)
        reduced |= {which for which, g in (("k", k), ("v", v)) if g.reduced}
        layers.append((k, v))
    return RankValues(layers, reduction_notes(req.scales, reduced, target))
