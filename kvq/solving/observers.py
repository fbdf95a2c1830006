"""Observers: the range a recipe quantizes, chosen from the statistics. Pure math: no model, no files.

* ``minmax``: the observed range, exact (every real token of every batch).
* ``percentile``: clip at the recipe's percentile of |x| (symmetric) or of x at both ends (asymmetric),
  read off the histogram (the upper edge of the bin where the fraction is reached, so within one bin,
  4.4%, above the exact quantile); never beyond the observed range.
* ``mse``: the clipping range that minimises the expected squared round-trip error of the recipe's own
  quantizer (:func:`kvq.quant.qparams.choose_qparams`, ``quantize``, ``dequantize``: fp8 casts, integer rounding,
  zero-points, saturation) over the histogram, each bin's mass spread over log-spaced points and held
  inside the observed range. The observed range is one of the candidates and wins ties, so by
  construction the choice is never worse than min/max on that error.

* ``attention``: starts at min/max; :mod:`kvq.solving.attention` then searches on the Q/K/V rows.
* ``loss``: starts at min/max; :mod:`kvq.solving.loss` then picks, per layer, among the other observers' ranges
  the one of least model loss (it runs the model).

:data:`OBSERVERS` is the one table from name to function. Each returns ``(lo, hi)`` at the recipe's granularity (shape (), (heads,) or (heads, dim)); the solver hands
them to ``choose_qparams`` as it does min/max.
"""

from __future__ import annotations

import torch

from kvq.artifacts.stats import TensorStats
from kvq.errors import UsageError
from kvq.quant import histogram as grid
from kvq.quant.qparams import choose_qparams, dequantize, quantize
from kvq.recipe.schema import QuantSpec

COARSE = torch.arange(100, 1, -4, dtype=torch.float64) / 100  # fractions of the range tried first: 1.00 .. 0.04
FINE = torch.tensor([-0.03, -0.02, -0.01, 0.01, 0.02, 0.03], dtype=torch.float64)  # then around the best
TINY_OCTAVES = 12
_CHUNK = 1 << 22  # elements of (groups, candidates, points) evaluated at once


def reduce_to_granularity(
    min_val: torch.Tensor, max_val: torch.Tensor, granularity: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_kv_heads, head_dim) ranges -> the recipe's granularity."""
    if granularity == "tensor":
        return min_val.amin(), max_val.amax()  # () each
    if granularity == "head":
        return min_val.amin(dim=-1), max_val.amax(dim=-1)  # (num_kv_heads,) each
    if granularity == "channel":
        return min_val, max_val  # (num_kv_heads, head_dim) each
    raise ValueError(f"unknown granularity {granularity!r}")


def counts_at_granularity(ts: TensorStats, granularity: str) -> torch.Tensor:
    """The histogram at the recipe's granularity: (NUM_BINS,), (heads, NUM_BINS) or (heads, dim, NUM_BINS)."""
    if ts.hist is None:
        raise UsageError("the statistics hold no histograms, which clipping observers (percentile, mse) read",
                         hint="calibrate again with a recipe that uses the observer, or with --histograms head")
    per_channel = ts.hist.dim() == 3
    if granularity == "tensor":
        return ts.hist.flatten(0, -2).sum(0)  # (heads[, dim], NUM_BINS) -> (NUM_BINS,)
    if granularity == "head":
        return ts.hist.sum(1) if per_channel else ts.hist  # (heads, NUM_BINS)
    if not per_channel:
        raise UsageError("the statistics hold per-head histograms; a per-channel clipping observer needs per-channel "
                         "ones", hint="calibrate again with this recipe, or with --histograms channel")
    return ts.hist


def minmax_observer(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed range, exact."""
    return reduce_to_granularity(ts.min, ts.max, spec.granularity)


def percentile_observer(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's percentile of the histogram, inside the observed range."""
    lo, hi = minmax_observer(ts, spec)
    return percentile_range(counts_at_granularity(ts, spec.granularity), lo, hi, spec.clip_quantile, spec.symmetric)


def mse_observer(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range of least expected round-trip error over the histogram."""
    lo, hi = minmax_observer(ts, spec)
    counts = counts_at_granularity(ts, spec.granularity)
    if spec.format == "nvfp4":
        raise UsageError("observer mse cannot model nvfp4 from a histogram: its block scales depend on which values "
                         "share a block", hint="use observer attention (it quantizes real rows), or minmax / percentile")
    return mse_range(counts, lo, hi, spec)


def attention_observer(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max: where :func:`kvq.solving.attention.attention_ranges` starts its search on the Q/K/V rows."""
    return minmax_observer(ts, spec)


def loss_observer(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max: what a solve without the model would start from; :func:`kvq.solving.loss.solve_by_loss` chooses
    among the other observers' ranges by the model's loss."""
    return minmax_observer(ts, spec)


# The one name -> function table of observers: a recipe's ``observer:`` is one of its keys (kvq.recipe.schema
# validates against it), and each function maps one of K or V of one layer to its (lo, hi).
OBSERVERS = {
    "minmax": minmax_observer,
    "percentile": percentile_observer,
    "mse": mse_observer,
    "attention": attention_observer,
    "loss": loss_observer,
}


def observed_range(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The (lo, hi) the recipe's observer chooses for one of K or V of one layer, at its granularity."""
    return OBSERVERS[spec.observer](ts, spec)


def percentile_range(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, q: float,
                     symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip at the ``q`` quantile of |x| (symmetric) or at the (1 - q) and q quantiles of x, inside [lo, hi]."""
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    if symmetric:
        absmax = torch.maximum(-lo64, hi64)
        # counts + counts.flip is the histogram of x and -x together: its (1 + q) / 2 quantile is |x|'s q quantile
        a = torch.minimum(grid.quantile(counts + counts.flip(-1), (1.0 + q) / 2.0), absmax)
        return (-a).to(torch.float32), a.to(torch.float32)
    top = torch.minimum(grid.quantile(counts, q), hi64)
    bottom = torch.maximum(-grid.quantile(counts.flip(-1), q), lo64)  # the flipped histogram is that of -x
    return bottom.to(torch.float32), top.to(torch.float32)


def mse_range(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range of least expected round-trip error (see the module docstring), same shapes as ``lo``."""
    shape = lo.shape
    counts = counts.reshape(-1, grid.NUM_BINS)  # (groups, NUM_BINS)
    lo = lo.reshape(-1).to(torch.float64)  # (groups,)
    hi = hi.reshape(-1).to(torch.float64)
    x, w = _compact(counts, lo, hi)  # (groups, points) each
    if spec.symmetric:
        a = torch.maximum(-lo, hi).unsqueeze(1)  # (groups, 1)
        best = _best_shrink(x, w, lambda t: (-a * t, a * t), spec)  # (groups,)
        a = a.squeeze(1) * best
        return (-a).to(torch.float32).reshape(shape), a.to(torch.float32).reshape(shape)
    # Asymmetric: both ends shrink together first, then each end alone with the other held (coordinate descent;
    # each step keeps the current range among its candidates, so the error never rises).
    low, high = lo.unsqueeze(1), hi.unsqueeze(1)  # (groups, 1)
    both = _best_shrink(x, w, lambda t: (low * t, high * t), spec).unsqueeze(1)
    low, high = low * both, high * both
    low = low * _best_shrink(x, w, lambda t: (low * t, high.expand_as(t)), spec).unsqueeze(1)
    high = high * _best_shrink(x, w, lambda t: (low.expand_as(t), high * t), spec).unsqueeze(1)
    return low.squeeze(1).to(torch.float32).reshape(shape), high.squeeze(1).to(torch.float32).reshape(shape)


def _compact(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's non-empty bins as points and weights: (groups, points) each, padded with weight 0; the
    points held inside the group's observed [lo, hi] (a bin's upper part may lie beyond the maximum).

    Values below 2**-TINY_OCTAVES of the group's largest |x| count as 0 (exact in every format): each would
    add less than (2**-TINY_OCTAVES * absmax)**2 to the error, and skipping them keeps the search fast."""
    points, weights = grid.bin_points()  # (NUM_BINS, S) each
    absmax = torch.maximum(-lo, hi).unsqueeze(1)  # (groups, 1)
    tiny = points.abs().amax(1) < absmax * 2.0**-TINY_OCTAVES  # (groups, NUM_BINS)
    moved = torch.where(tiny, counts, 0).sum(1)  # (groups,)
    counts = torch.where(tiny, 0, counts)
    counts[:, grid.ZERO] += moved
    used = counts > 0  # (groups, NUM_BINS)
    width = max(1, int(used.sum(1).max()))
    idx = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, :width]  # (groups, width): used bins first
    w = torch.gather(counts, 1, idx).to(torch.float64).unsqueeze(-1) * weights[idx]  # (groups, width, S)
    x = points[idx].flatten(1)  # (groups, width * S)
    x = torch.maximum(torch.minimum(x, hi.unsqueeze(1)), lo.unsqueeze(1))
    return x.to(torch.float32), w.flatten(1).to(torch.float32)


def _best_shrink(x: torch.Tensor, w: torch.Tensor, ranges, spec: QuantSpec) -> torch.Tensor:
    """The fraction t of least expected error per group, where ``ranges(t)`` -> (lo, hi) maps fractions
    (groups, candidates) to ranges of that shape: COARSE first (1.0 first, kept on ties), then FINE steps
    around the best (the best first again), so the result is never worse than t = 1."""
    groups = x.shape[0]
    best = _argmin_fraction(x, w, ranges, COARSE.expand(groups, -1), spec)
    fine = torch.cat([best.unsqueeze(1), (best.unsqueeze(1) + FINE).clamp(COARSE[-1].item(), 1.0)], dim=1)
    return _argmin_fraction(x, w, ranges, fine, spec)


def _argmin_fraction(x: torch.Tensor, w: torch.Tensor, ranges, t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    err = expected_error(x, w, *ranges(t), spec)  # (groups, candidates)
    return torch.gather(t, 1, torch.argmin(err, dim=1, keepdim=True)).squeeze(1)  # first minimum: ties keep wider


def expected_error(x: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   spec: QuantSpec) -> torch.Tensor:
    """Sum over points of w * (x - dequantize(quantize(x)))**2 with the scales of every candidate range.

    ``x``, ``w``: (groups, points) float32; ``lo``, ``hi``: (groups, candidates). Returns (groups, candidates),
    summed in float64.
    """
    groups, n = x.shape
    candidates = lo.shape[1]
    step = max(1, _CHUNK // max(1, candidates * n))
    out = []
    for g in range(0, groups, step):
        scale, zp = choose_qparams(lo[g:g + step], hi[g:g + step], spec)  # (g, candidates) each
        scale, zp = scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1)  # (g, candidates, 1)
        xs = x[g:g + step].unsqueeze(1)  # (g, 1, points)
        back = dequantize(quantize(xs, scale, zp, spec.format), scale, zp, spec.format)  # (g, candidates, points)
        out.append(((back - xs) ** 2 * w[g:g + step].unsqueeze(1)).sum(-1, dtype=torch.float64))
    return torch.cat(out)
