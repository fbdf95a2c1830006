"""With ``--stats``: how far the observed K/V ranges reach beyond what each scale can represent.

For every layer and K / V, each observed (KV head, channel) range [min, max] of ``stats.safetensors``
is compared with the range the layer's scale represents: ``[qmin * scale + offset, qmax * scale +
offset]`` (``qmin`` / ``qmax`` of the number format, :func:`kvq.quant.qparams.qrange`; offset 0 for symmetric
scales). The figures are the share of ranges that reach beyond it and the worst overshoot ratio
(observed / representable, 1.0 = exactly at the edge). These are ranges, not values: the share of
*values* that would be clipped needs value histograms, which statistics files do not hold yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.export.tensor_parallel import heads_of_rank
from kvq.inspection.defects import Defect, inferred_granularity
from kvq.inspection.found import ROLE_NAME, DeclaredShape, Found, ScaleEntry
from kvq.quant.qparams import qrange

CLIP_TOLERANCE = 1e-5  # relative: a calibrated absmax lands on the edge up to float32 rounding
CLIP_DEFECT_RATIO = 2.0  # observed ranges twice what the scale represents: scales not for this data


@dataclass(frozen=True)
class Clipping:
    layer: int
    role: str  # k or v
    share: float  # of (head, channel) ranges reaching beyond the representable range
    worst: float  # largest observed / representable ratio


def _limits(entry: ScaleEntry, number: str, heads: int, head_dim: int, ranks: int | None,
            shape: DeclaredShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest representable value per (head, channel), each of shape (heads, head_dim)."""
    qmin, qmax = qrange(number)
    scale = entry.values.to(torch.float32)
    offset = entry.offset if entry.offset is not None else torch.zeros_like(scale)
    lo, hi = qmin * scale + offset, qmax * scale + offset
    full = torch.full((heads, head_dim), float("nan"))
    lo_full, hi_full = full.clone(), full.clone()
    if entry.rank is not None and ranks is not None:
        splits = (heads % ranks == 0 or ranks % heads == 0) and 0 <= entry.rank < ranks  # a rank beyond: a defect
        rows = heads_of_rank(heads, ranks, entry.rank) if splits else []
        lo_full[rows], hi_full[rows] = lo.reshape(()), hi.reshape(())  # (1,) or () -> (): one value, the rank's heads
        return lo_full, hi_full
    granularity = inferred_granularity(entry, shape)
    if granularity == "tensor":
        return lo_full.fill_(lo.reshape(()).item()), hi_full.fill_(hi.reshape(()).item())  # any 1-value shape -> ()
    if granularity == "head":
        # (H,), (H, 1) or (H, 1, 1) -> (H, 1) -> (H, D)
        return lo.reshape(heads, 1).expand(heads, head_dim), hi.reshape(heads, 1).expand(heads, head_dim)
    return lo.reshape(heads, head_dim), hi.reshape(heads, head_dim)  # any (H*D)-value layout -> (H, D)


def clipping(found: Found, stats: KVStats, shape: DeclaredShape) -> tuple[list[Clipping], list[Defect]]:
    for i, layer in sorted(stats.layers.items()):  # each layer's K and V at its own (heads, head_dim)
        for role, ts in (("k", layer.k), ("v", layer.v)):
            heads, head_dim = (int(x) for x in ts.min.shape)
            if shape.kv_of(i, role) not in ((heads, head_dim), (None, None)):
                declared = shape.kv_of(i, role)
                raise UsageError(f"--stats holds {heads} KV heads x head_dim {head_dim} in layer {i} "
                                 f"{ROLE_NAME[role]}, but the scales are for {declared[0]} x {declared[1]} "
                                 f"({shape.source})", hint="pass the stats.safetensors of a calibration of the same model")
    rows, defects = [], []
    by_slot: dict[tuple[int, str], list[ScaleEntry]] = {}
    for e in found.entries:
        for role in ("k", "v") if e.role == "kv" else (e.role,):
            if role in ("k", "v"):
                by_slot.setdefault((e.layer, role), []).append(e)
    for (layer, role), entries in sorted(by_slot.items()):
        number, _ = found.spec(entries[0].role)
        if number is None or layer not in stats.layers:
            continue
        ts = stats.layers[layer].k if role == "k" else stats.layers[layer].v
        heads, head_dim = (int(x) for x in ts.min.shape)
        stat_shape = replace(shape, num_kv_heads=heads, head_dim=head_dim, layers_key="", layers=None)
        lo, hi = torch.full((heads, head_dim), float("nan")), torch.full((heads, head_dim), float("nan"))
        for e in entries:
            if e.rank is None and inferred_granularity(e, stat_shape) is None:
                continue  # a shape defect, reported already
            e_lo, e_hi = _limits(e, number, heads, head_dim, found.ranks, stat_shape)
            lo, hi = torch.where(torch.isnan(lo), e_lo, lo), torch.where(torch.isnan(hi), e_hi, hi)
        known = ~(torch.isnan(lo) | torch.isnan(hi)) & (hi > 0) & (lo < 0)
        if not known.any():
            continue
        over_hi = torch.where(ts.max > 0, ts.max / hi, torch.zeros_like(hi))
        over_lo = torch.where(ts.min < 0, ts.min / lo, torch.zeros_like(lo))
        ratio = torch.maximum(over_hi, over_lo)[known]  # (known ranges,)
        row = Clipping(layer, role, float((ratio > 1 + CLIP_TOLERANCE).float().mean()), float(ratio.max()))
        rows.append(row)
        if row.worst > CLIP_DEFECT_RATIO:
            e = entries[0]
            defects.append(Defect("clipping", layer, e.name, f"layer {layer} {ROLE_NAME[role]}: observed ranges reach "
                                  f"{row.worst:.3g}x what {e.name} represents ({row.share:.1%} of (head, channel) "
                                  "ranges beyond it)"))
    return rows, defects
