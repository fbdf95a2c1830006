"""The ``attention`` observer: per layer and KV head, the K / V ranges whose quantization least disturbs the
attention output on the reservoir's rows (kvq.artifacts.reservoir). Pure math: no model, no files.

Objective: sum over kept chunks, query heads and tokens of |o_q - o|^2, where o is causal softmax attention of
the chunk's queries over its keys and values (the layer's own softmax scale, GQA groups as the model forms them)
and o_q the same with K and V through the recipe's quantizers (kvq.quant.qparams: the engine's casts, rounding,
zero-points, saturation). The candidates shrink the min/max range of each scale (COARSE, 1.0 first, then FINE
steps of 0.01 around the best):

1. K: the fraction per KV head (one per layer for per-tensor scales; per-channel scales shrink together per head)
   with V unquantized;
2. V: the same with K quantized at step 1's choice;
3. the result is kept only where its objective, with both quantized, is no worse than min/max's; so by
   construction never worse than min/max on that objective.

A KV head's error depends only on its own K / V scales (each query head reads one KV head), so the heads of a
layer are searched at once.
"""

from __future__ import annotations

import math

import torch

from kvq.artifacts.stats import LayerStats, TensorStats
from kvq.quant.qparams import choose_qparams, dequantize, quantize
from kvq.recipe.schema import QuantSpec
from kvq.solving.observers import reduce_to_granularity

COARSE = torch.arange(100, 1, -4, dtype=torch.float32) / 100  # 1.00, 0.96, ..., 0.04
FINE = torch.tensor([-0.03, -0.02, -0.01, 0.01, 0.02, 0.03])  # then around the best


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of q (chunks, heads, n, d) over k, v (chunks, kv_heads, n, d): (chunks, heads, n, d)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (chunks, heads, n, d): query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=1)
    n = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scaling  # (chunks, heads, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def per_kv_head_error(out: torch.Tensor, ref: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Squared error summed per KV head: out, ref (chunks, heads, n, d) -> (kv_heads,) float64."""
    chunks, heads, n, d = out.shape
    diff = (out.to(torch.float64) - ref.to(torch.float64)) ** 2
    return diff.view(chunks, kv_heads, heads // kv_heads, n, d).sum(dim=(0, 2, 3, 4))  # (kv_heads,)


def _broadcast(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """A scale / zero-point at a granularity -> broadcastable against (chunks, kv_heads, n, d)."""
    if granularity == "tensor":
        return t.reshape(1, 1, 1, 1)
    if granularity == "head":
        return t.reshape(1, -1, 1, 1)  # (kv_heads,) -> (1, kv_heads, 1, 1)
    return t.unsqueeze(1).unsqueeze(0)  # (kv_heads, d) -> (1, kv_heads, 1, d)


def fake_quantize_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x (chunks, kv_heads, n, d) through the recipe's quantizer with the scales of range [lo, hi]."""
    scale, zp = choose_qparams(lo, hi, spec)
    s = _broadcast(scale, spec.granularity)
    z = None if zp is None else _broadcast(zp, spec.granularity)
    return dequantize(quantize(x, s, z, spec.format), s, z, spec.format)


def _shrunk(lo: torch.Tensor, hi: torch.Tensor, t: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] scaled by a fraction per KV head (t: (kv_heads,)), or one fraction (t: ()) for per-tensor."""
    if granularity == "channel":
        t = t.unsqueeze(1)  # (kv_heads, 1): every channel of a head takes its head's fraction
    return lo * t, hi * t


def _search(ts: TensorStats, spec: QuantSpec, error_of) -> torch.Tensor:
    """The fraction per KV head (or one, per-tensor) whose range ``error_of(lo, hi)`` -> (kv_heads,) rates best:
    COARSE fractions first (1.0 first), then FINE steps around each head's best."""
    lo, hi = reduce_to_granularity(ts.min, ts.max, spec.granularity)
    heads = ts.min.shape[0]
    best_err, best_t = None, None

    def consider(frac: torch.Tensor) -> None:  # frac: (kv_heads,), or () per tensor
        nonlocal best_err, best_t
        err = error_of(*_shrunk(lo, hi, frac, spec.granularity))  # (kv_heads,)
        if spec.granularity == "tensor":
            err = err.sum().expand(heads)
        frac = frac.expand(heads)
        if best_err is None:
            best_err, best_t = err.clone(), frac.clone()
            return
        better = err < best_err  # strict: ties keep the wider range found first
        best_err = torch.where(better, err, best_err)
        best_t = torch.where(better, frac, best_t)

    for t in COARSE:
        consider(t.reshape(()) if spec.granularity == "tensor" else t.expand(heads))
    centre = best_t.clone()
    for step in FINE:
        frac = (centre + step).clamp(float(COARSE[-1]), 1.0)
        consider(frac[:1].reshape(()) if spec.granularity == "tensor" else frac)
    return best_t[:1].reshape(()) if spec.granularity == "tensor" else best_t


def attention_ranges(layer: LayerStats, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scaling: float | None,
                     key: QuantSpec, value: QuantSpec, key_range, value_range):
    """((k_lo, k_hi), (v_lo, v_hi)) for a layer whose recipe uses the attention observer for K and / or V.

    ``key_range`` / ``value_range`` are the (lo, hi) the other observers chose (min/max for an attention one);
    only the tensors whose spec's observer is ``attention`` are searched.
    """
    q, k, v = rows
    kv_heads, d = k.shape[1], k.shape[3]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    ref = attention_output(q, k, v, scale)
    kq = fake_quantize_range(k, *key_range, key)
    if key.observer == "attention":
        t_k = _search(layer.k, key, lambda lo, hi: per_kv_head_error(
            attention_output(q, fake_quantize_range(k, lo, hi, key), v, scale), ref, kv_heads))
        candidate = _shrunk(*reduce_to_granularity(layer.k.min, layer.k.max, key.granularity), t_k, key.granularity)
        kq_candidate = fake_quantize_range(k, *candidate, key)
    else:
        candidate, kq_candidate = key_range, kq
    if value.observer == "attention":
        t_v = _search(layer.v, value, lambda lo, hi: per_kv_head_error(
            attention_output(q, kq_candidate, fake_quantize_range(v, lo, hi, value), scale), ref, kv_heads))
        v_candidate = _shrunk(*reduce_to_granularity(layer.v.min, layer.v.max, value.granularity), t_v,
                              value.granularity)
    else:
        v_candidate = value_range
    # 3. keep the search's choice only where it does no worse than min/max (both quantized)
    err_search = per_kv_head_error(attention_output(q, kq_candidate, fake_quantize_range(v, *v_candidate, value), scale),
                                   ref, kv_heads)
    err_minmax = per_kv_head_error(attention_output(q, kq, fake_quantize_range(v, *value_range, value), scale),
                                   ref, kv_heads)
    keep = err_search <= err_minmax  # (kv_heads,)
    if key.granularity == "tensor" or value.granularity == "tensor":
        keep = keep.all().expand(kv_heads)
    return _pick(keep, candidate, key_range, key.granularity), _pick(keep, v_candidate, value_range, value.granularity)


def _pick(keep: torch.Tensor, chosen, fallback, granularity: str):
    """Per KV head: the chosen (lo, hi) where ``keep``, else the fallback."""
    if granularity == "tensor":
        return chosen if bool(keep.all()) else fallback
    mask = keep if granularity == "head" else keep.unsqueeze(1)  # (kv_heads,) or (kv_heads, 1)
    return tuple(torch.where(mask, c, f) for c, f in zip(chosen, fallback, strict=True))
