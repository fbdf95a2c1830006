"""The numbers the report's figures show, as (layer, KV head[, channel]) grids. Pure math, no plotting.

Every grid is a float64 numpy array with one row per layer that holds a KV cache (``Grids.layers``: all of
0..L-1 for most models, fewer for hybrid models), so a figure and a warning read the very same numbers. Layers
whose K or V are narrower or hold fewer heads than others (Gemma 4's sliding layers, MLA's rotary part) are
padded with NaN to the widest: a NaN is "no such head or channel", never a value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.quant import histogram as grid
from kvq.reporting.inputs import ReportInputs

E4M3_MIN_NORMAL = 2.0**-6  # fp8 e4m3's smallest normal value: below it, at scale 1.0, values are subnormal
TINY = 1e-30  # guards a ratio against a head whose channels are all 0


def padded(rows: list[np.ndarray]) -> np.ndarray:
    """Per-layer arrays of one rank stacked into (layers, *widest), NaN where a layer's array is smaller."""
    widest = tuple(max(sizes) for sizes in zip(*(r.shape for r in rows), strict=True))
    out = np.full((len(rows), *widest), np.nan)
    for n, r in enumerate(rows):
        out[(n, *(slice(0, size) for size in r.shape))] = r
    return out


def absmax_grid(stats: KVStats, which: str) -> np.ndarray:
    """max |x| of every (layer, KV head) over its channels: (layers, heads)."""
    return padded([_tensor(stats, i, which).absmax.amax(dim=1).double().numpy() for i in sorted(stats.layers)])


def channel_absmax(stats: KVStats, which: str) -> np.ndarray:
    """max |x| of every (layer, KV head, channel): (layers, heads, head_dim)."""
    return padded([_tensor(stats, i, which).absmax.double().numpy() for i in sorted(stats.layers)])


def channel_ratio(stats: KVStats, which: str) -> np.ndarray:
    """Every channel's absmax over the median channel absmax of its head: (layers, heads, head_dim).

    1 is a typical channel; an outlier channel stands far above 1. A head whose channels are all 0 gives 0.
    """
    rows = []
    for i in sorted(stats.layers):
        absmax = _tensor(stats, i, which).absmax.double().numpy()  # (heads, head_dim) of this layer
        median = np.median(absmax, axis=1, keepdims=True)  # (heads, 1)
        rows.append(absmax / np.maximum(median, TINY))
    return padded(rows)


def head_spread(absmax: np.ndarray) -> np.ndarray:
    """Per layer, the largest head absmax over the smallest: (layers,); inf when a head is all 0."""
    lo, hi = np.nanmin(absmax, axis=1), np.nanmax(absmax, axis=1)  # every layer has a head: no all-NaN row
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hi == 0, 1.0, hi / lo)


def subnormal_fraction(stats: KVStats, which: str) -> np.ndarray | None:
    """The share of values with |x| < 2**-6 (e4m3's subnormals and zero at scale 1.0) per (layer, head):
    (layers, heads), from the histograms; None when the statistics hold none.

    2**-6 is an edge of the histogram grid (16 bins per octave from 2**-20), so the share is exact.
    """
    if stats.histograms is None:
        return None
    lower = grid.bin_edges()  # (NUM_BINS,) lower edge of every bin
    upper = torch.cat([lower[1:], torch.tensor([math.inf], dtype=torch.float64)])  # (NUM_BINS,)
    small = (lower >= -E4M3_MIN_NORMAL) & (upper <= E4M3_MIN_NORMAL)  # (NUM_BINS,) bins inside (-2**-6, 2**-6)
    rows = []
    for i in sorted(stats.layers):
        counts = _tensor(stats, i, which).hist.to(torch.float64)  # (heads, [head_dim,] NUM_BINS)
        if counts.dim() == 3:
            counts = counts.sum(dim=1)  # per channel -> per head: (heads, NUM_BINS)
        total = counts.sum(dim=-1).clamp_min(1.0)  # (heads,)
        rows.append((counts[:, small].sum(dim=-1) / total).numpy())
    return padded(rows)


def scale_grid(scales: KVScales, stats: KVStats, which: str) -> np.ndarray:
    """Every (layer, KV head)'s scale: (layers, heads). Per tensor: the one scale in every head of the layer
    (its head count from the statistics); per channel: the largest channel scale of the head (what a per-head
    scale would have to be)."""
    rows = []
    for i in sorted(scales.layers):
        s = scales.layers[i].scale(which).double()
        if s.dim() == 2:
            s = s.amax(dim=1)  # (heads, head_dim) -> (heads,)
        heads = int(_tensor(stats, i, which).min.shape[0]) if i in stats.layers else 1
        rows.append(s.expand(heads).numpy() if s.dim() == 0 else s.numpy())
    return padded(rows)


def sqnr_grid(validation: dict, which: str, layers: tuple[int, ...], heads: int) -> np.ndarray:
    """Round-trip SQNR in dB per (layer, KV head) from a validate.json: (layers, heads), a row per layer of
    ``layers``; +inf where the round trip was exact (JSON null), NaN where the report has no row."""
    row_of = {layer: n for n, layer in enumerate(layers)}
    out = np.full((len(layers), heads), np.nan)
    for n, row in enumerate(validation["heads"]):
        try:
            layer, head, tensor, sqnr = int(row["layer"]), int(row["kv_head"]), row["tensor"], row["sqnr_db"]
            if layer not in row_of or not 0 <= head < heads or tensor not in ("k", "v"):
                raise ValueError(f"layer {layer} head {head} {tensor!r} is outside the model's KV cache")
            value = math.inf if sqnr is None else float(sqnr)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"validation report: heads[{n}] is not a (layer, kv_head, tensor, sqnr_db) row ({exc})",
                             hint="pass the validate.json written by `kvq validate`") from exc
        if tensor == which:
            out[row_of[layer], head] = value
    return out


def layer_sqnr(validation: dict, which: str, layers: tuple[int, ...]) -> np.ndarray:
    """Per-layer round-trip SQNR in dB from a validate.json's ``layers``: (layers,), a value per layer of
    ``layers``; +inf where exact."""
    row_of = {layer: n for n, layer in enumerate(layers)}
    out = np.full(len(layers), np.nan)
    for n, row in enumerate(validation["layers"]):
        try:
            layer, sqnr = int(row["layer"]), row[which]["sqnr_db"]
            out[row_of[layer]] = math.inf if sqnr is None else float(sqnr)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UsageError(f"validation report: layers[{n}] is not a per-layer total ({exc})",
                             hint="pass the validate.json written by `kvq validate`") from exc
    return out


def quantized_eval_rows(evaluation: dict) -> list[dict]:
    """The quantized rows of an eval.json (the baseline left out), each checked for what the figures read."""
    rows = []
    for n, row in enumerate(evaluation["rows"]):
        try:
            if row["kind"] == "baseline":
                continue
            entry = {"name": str(row["name"]), "delta_pct": float(row["delta_pct"]),
                     "stderr": None if row.get("delta_pct_stderr") is None else float(row["delta_pct_stderr"]),
                     "memory_saved": float(row.get("memory_saved") or 0.0), "per_layer": {}}
            attention = row.get("attention_error")
            if attention is not None:
                entry["per_layer"] = {int(k): float(v) for k, v in attention["per_layer"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"eval report: rows[{n}] is not a row of `kvq eval --json` ({exc})",
                             hint="pass the JSON written by `kvq eval --json FILE`") from exc
        rows.append(entry)
    return rows


def _tensor(stats: KVStats, layer: int, which: str):
    return stats.layers[layer].k if which == "k" else stats.layers[layer].v


@dataclass
class Grids:
    """Every grid one report shows, computed once; a figure and a warning read the same arrays.

    Dictionaries are keyed by "k" / "v"; a member is None when its input is absent. Row n of every grid is layer
    ``layers[n]`` (the layers with a KV cache, ascending).
    """

    layers: tuple[int, ...]

    absmax: dict[str, np.ndarray]  # (layers, heads)
    ratio: dict[str, np.ndarray]  # (layers, heads, head_dim)
    subnormal: dict[str, np.ndarray] | None  # (layers, heads)
    scales: dict[str, np.ndarray] | None  # (layers, heads)
    raw_scales: KVScales | None
    sqnr: dict[str, np.ndarray] | None  # (layers, heads)
    layer_sqnr: dict[str, np.ndarray] | None  # (layers,)
    eval_rows: list[dict] | None

    @property
    def num_layers(self) -> int:
        """The layers with a KV cache (rows of every grid)."""
        return len(self.layers)

    def layer_ids(self, mask: np.ndarray) -> tuple[int, ...]:
        """The layer numbers of the rows where ``mask`` (layers,) is true."""
        return tuple(self.layers[int(n)] for n in np.flatnonzero(mask))

    @property
    def num_heads(self) -> int:
        return self.absmax["k"].shape[1]


def compute_grids(inputs: ReportInputs) -> Grids:
    stats, kv = inputs.stats, ("k", "v")
    layers = tuple(sorted(stats.layers))
    heads = max(int(_tensor(stats, i, w).min.shape[0]) for i in layers for w in kv)
    sub = {w: subnormal_fraction(stats, w) for w in kv}
    val = inputs.validation
    return Grids(
        layers=layers,
        absmax={w: absmax_grid(stats, w) for w in kv},
        ratio={w: channel_ratio(stats, w) for w in kv},
        subnormal=None if sub["k"] is None else sub,
        scales=None if inputs.scales is None else {w: scale_grid(inputs.scales, stats, w) for w in kv},
        raw_scales=inputs.scales,
        sqnr=None if val is None else {w: sqnr_grid(val, w, layers, heads) for w in kv},
        layer_sqnr=None if val is None else {w: layer_sqnr(val, w, layers) for w in kv},
        eval_rows=None if inputs.evaluation is None else quantized_eval_rows(inputs.evaluation),
    )
