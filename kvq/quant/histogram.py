"""Signed log-spaced histograms of K / V values: what the clipping observers read. Pure math, no model.

Every histogram shares one fixed grid, so histograms of different batches, ranks or resumed runs merge by
adding counts (exactly: integer counts), and no range has to be known before the first batch. The grid is
log-spaced in |x| (fp8's own spacing; fine enough for int4's few levels too):

* ``BINS_PER_OCTAVE`` bins per power of two for |x| in [2**EXP_LO, 2**EXP_HI): ``MAGNITUDE_BINS`` per sign,
  relative bin width 2**(1/16) - 1 = 4.4%;
* one "zero" bin for |x| < 2**EXP_LO (exact zeros included; such values round to 0 in every recipe that
  matters, with an error below 1e-6), and |x| >= 2**EXP_HI is counted in the outermost bin;
* bin index increases with x: ``NUM_BINS - 1 - ZERO`` negative bins (largest magnitude first), ``ZERO``,
  then the positive bins (smallest magnitude first).

Hand-written: torch.histogram needs a known range and float counts, numpy's as well; neither merges
across runs without one.
"""

from __future__ import annotations

import torch

BINS_PER_OCTAVE = 16
EXP_LO = -20
EXP_HI = 20
MAGNITUDE_BINS = (EXP_HI - EXP_LO) * BINS_PER_OCTAVE  # per sign
ZERO = MAGNITUDE_BINS  # index of the zero bin
NUM_BINS = 2 * MAGNITUDE_BINS + 1
SCHEMA = f"signed-log2/{BINS_PER_OCTAVE}/{EXP_LO}/{EXP_HI}"  # recorded in stats.safetensors; loads refuse others
POINTS_PER_BIN = 4  # a bin's mass is spread over this many log-spaced points when errors are estimated


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """The bin of every element of ``x`` (any shape, any float dtype), int64, same shape."""
    a = x.detach().to(torch.float32).abs()
    mantissa, exponent = torch.frexp(a)  # a = mantissa * 2**exponent, mantissa in [0.5, 1) (0 for a == 0)
    octave = exponent.to(torch.int64) - 1 - EXP_LO  # a in [2**(EXP_LO + octave), 2**(EXP_LO + octave + 1))
    within = torch.floor(torch.log2(2.0 * mantissa.clamp_min(0.5)) * BINS_PER_OCTAVE).to(torch.int64)
    magnitude = (octave * BINS_PER_OCTAVE + within.clamp(0, BINS_PER_OCTAVE - 1)).clamp(max=MAGNITUDE_BINS - 1)
    idx = torch.where(x > 0, ZERO + 1 + magnitude, ZERO - 1 - magnitude)
    return torch.where(a < 2.0**EXP_LO, torch.full_like(idx, ZERO), idx)  # zeros and |x| < 2**EXP_LO


def histogram(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Counts of ``x`` (groups, n) per group: int64 (groups, NUM_BINS)."""
    idx = bin_index(x) + NUM_BINS * torch.arange(groups, device=x.device).unsqueeze(1)  # (groups, n)
    return torch.bincount(idx.flatten(), minlength=groups * NUM_BINS).view(groups, NUM_BINS)


def head_histogram(real: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Histogram of ``real`` (1, heads, n, dim) per head (heads, NUM_BINS) or per channel (heads, dim, NUM_BINS)."""
    _, heads, n, dim = real.shape
    if per_channel:
        rows = real[0].permute(0, 2, 1).reshape(heads * dim, n)  # (heads * dim, n)
        return histogram(rows, heads * dim).view(heads, dim, NUM_BINS)
    return histogram(real[0].reshape(heads, n * dim), heads)  # (heads, n * dim) -> (heads, NUM_BINS)


def bin_points() -> tuple[torch.Tensor, torch.Tensor]:
    """Representative values of every bin: (NUM_BINS, POINTS_PER_BIN) float64, and their weights (sum 1 per bin).

    A magnitude bin [2**(e), 2**(e + 1/16)) is represented by POINTS_PER_BIN log-spaced points at the centres
    of equal sub-bins; the zero bin by 0.
    """
    j = torch.arange(MAGNITUDE_BINS, dtype=torch.float64).unsqueeze(1)  # (MAGNITUDE_BINS, 1)
    sub = (torch.arange(POINTS_PER_BIN, dtype=torch.float64) + 0.5) / POINTS_PER_BIN  # (POINTS_PER_BIN,)
    magnitude = torch.exp2(EXP_LO + (j + sub) / BINS_PER_OCTAVE)  # (MAGNITUDE_BINS, POINTS_PER_BIN)
    zero = torch.zeros(1, POINTS_PER_BIN, dtype=torch.float64)
    points = torch.cat([-magnitude.flip(0), zero, magnitude])  # (NUM_BINS, POINTS_PER_BIN), increasing
    weights = torch.full((NUM_BINS, POINTS_PER_BIN), 1.0 / POINTS_PER_BIN, dtype=torch.float64)
    return points, weights


def bin_edges() -> torch.Tensor:
    """The lower edge of every bin, float64 (NUM_BINS,): the smallest value the bin can hold (-inf for the
    outermost negative bin, which also counts everything beyond it; 0's bin starts at -2**EXP_LO)."""
    magnitude = torch.exp2(EXP_LO + torch.arange(MAGNITUDE_BINS + 1, dtype=torch.float64) / BINS_PER_OCTAVE)
    negative = -magnitude.flip(0)[:-1]  # lower edges of the negative bins: -2**EXP_HI ... -2**(EXP_LO + 1/16)
    negative[0] = float("-inf")
    return torch.cat([negative, -magnitude[:1], magnitude[:-1]])


def quantile(counts: torch.Tensor, q: float) -> torch.Tensor:
    """The value below which a fraction ``q`` of the counted values lie, per row of ``counts`` (..., NUM_BINS):
    the upper edge of the bin where the cumulative count reaches q (an upper bound, within one bin's width)."""
    upper = torch.cat([bin_edges()[1:], torch.tensor([float("inf")], dtype=torch.float64)])  # (NUM_BINS,)
    cum = counts.to(torch.float64).cumsum(-1)
    target = q * cum[..., -1:]
    idx = torch.searchsorted(cum, target.clamp_min(1e-300)).clamp(max=NUM_BINS - 1)  # first bin with cum >= target
    return upper[idx.squeeze(-1)]
