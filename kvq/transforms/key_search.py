"""Key smoothing factors searched against the recipe's own key quantizer (``SmoothKeys(search=True)``).

SmoothAttention's formula balances ranges; it does not look at the quantizer. The search starts from its
factors s and changes them, one RoPE pair (or unpaired channel) at a time, to lower the expected squared
error of the attention logits that the quantized keys cause:

    objective(s) = sum over KV heads g of  mean over sampled keys k of  e(k)ᵀ C_g e(k),
    e(k) = s * dequantize(quantize(k / s)) - k      (the key's round-trip error, unsmoothed),
    C_g = mean q qᵀ over every real query token of the KV head's query heads,

so that for a query q the logit error is q · e(k) (smoothing multiplies q by s and divides k by s). The
quantizer is the recipe's: its format, symmetry and granularity, with the range min/max (the default
observer) of the calibration keys divided by s. Moves multiply a pair's factor by 2^(j/4), j = -4..4;
the current factor is the first candidate and a move is taken only when it lowers the objective, so the
result is never worse on it than the formula's factors. A pair's two channels keep one factor (it must
commute with RoPE); a q/k norm shared by all heads keeps one factor per channel for all heads.

Per-channel granularity gives every channel its own scale, which absorbs any factor: the formula's
factors are kept. nvfp4 (block scales chosen at run time) is not modelled and is refused.
"""

from __future__ import annotations

import torch

from kvq.errors import UsageError
from kvq.quant.qparams import choose_qparams, dequantize, quantize
from kvq.recipe.schema import QuantSpec
from kvq.transforms.layout import LayerAttention
from kvq.transforms.measure import QKAbsMax
from kvq.transforms.spec import MAX_FACTOR

STEPS = 2.0 ** (torch.tensor([0, -4, -3, -2, -1, 1, 2, 3, 4], dtype=torch.float64) / 4)  # the current factor first
SWEEPS = 3
SEARCH_ROWS = 2048  # sampled keys per KV head (the first real tokens of the calibration samples)


def check_searchable(key: QuantSpec) -> None:
    if key.format == "nvfp4":
        raise UsageError("smooth-keys search cannot model nvfp4 keys: their block scales are chosen at run time",
                         hint="drop search: true (the alpha factors still apply)")


def logit_error(stats: QKAbsMax, factors: torch.Tensor, key: QuantSpec) -> torch.Tensor:
    """The objective of the module docstring for candidate ``factors`` (candidates, kv_heads, head_dim), per
    candidate and KV head: (candidates, kv_heads) float64."""
    s = factors.to(torch.float32)  # (c, kv, d)
    lo, hi = stats.key_min.to(torch.float32) / s, stats.key_max.to(torch.float32) / s  # (c, kv, d)
    if key.granularity == "tensor":
        lo, hi = lo.amin(dim=(1, 2), keepdim=True), hi.amax(dim=(1, 2), keepdim=True)  # (c, 1, 1)
    elif key.granularity == "head":
        lo, hi = lo.amin(dim=2, keepdim=True), hi.amax(dim=2, keepdim=True)  # (c, kv, 1)
    scale, zp = choose_qparams(lo, hi, key)
    scale, zp = scale.unsqueeze(2), None if zp is None else zp.unsqueeze(2)  # (c, kv | 1, 1, d | 1)
    x = stats.key_rows.unsqueeze(0) / s.unsqueeze(2)  # (kv, n, d) -> (c, kv, n, d)
    err = ((dequantize(quantize(x, scale, zp, key.format), scale, zp, key.format) - x) * s.unsqueeze(2)).double()
    weighted = err @ stats.query_moment.unsqueeze(0)  # (c, kv, n, d) @ (1, kv, d, d)
    return (weighted * err).sum(dim=-1).mean(dim=-1)  # (c, kv)


def _coordinates(layer: LayerAttention) -> list[list[int]]:
    """The channel sets that share a factor: RoPE pairs, then every unpaired channel alone."""
    pairs = [[i, j] for i, j in layer.rope.pairs()]
    paired = {c for pair in pairs for c in pair}
    return pairs + [[c] for c in range(layer.head_dim) if c not in paired]


def search_factors(layer: LayerAttention, stats: QKAbsMax, start: torch.Tensor, key: QuantSpec,
                   shared: bool) -> torch.Tensor:
    """Factors (kv_heads, head_dim) float64 of no greater objective than ``start`` (see the module docstring);
    ``shared``: one factor per channel for every head (a q/k norm weight shared by all heads)."""
    check_searchable(key)
    if key.granularity == "channel":
        return start
    if stats.key_rows is None or stats.query_moment is None:
        raise UsageError(f"layer {layer.layer_idx}: a smooth-keys search needs key rows and query moments",
                         hint="measure them with measure_qk_absmax(..., search_rows=SEARCH_ROWS)")
    kv_heads = start.shape[0]
    independent = key.granularity == "head" and not shared  # each head's error depends on its factors only
    head_sets = [list(range(kv_heads))] if independent or shared else [[g] for g in range(kv_heads)]
    s = start.clone()
    for _ in range(SWEEPS):
        for channels in _coordinates(layer):
            for heads in head_sets:
                cand = s.unsqueeze(0).repeat(len(STEPS), 1, 1)  # (steps, kv, d)
                rows = torch.tensor(heads).view(1, -1, 1)
                cols = torch.tensor(channels).view(1, 1, -1)
                picked = cand[:, rows[0], cols[0]] * STEPS.view(-1, 1, 1)  # (steps, heads, channels)
                cand[:, rows[0], cols[0]] = picked.clamp(1 / MAX_FACTOR, MAX_FACTOR)
                err = logit_error(stats, cand, key)  # (steps, kv)
                if independent:  # argmin takes the first minimum: the current factor wins ties
                    best = torch.argmin(err, dim=0)  # (kv,)
                    s = cand[best, torch.arange(kv_heads)]
                else:
                    s = cand[int(torch.argmin(err.sum(dim=1)))]
    return s
