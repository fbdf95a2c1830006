"""kvq.quant.histogram's grid against hand values and numpy; merging; quantiles within one bin of numpy's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvq.artifacts.stats import KVStats
from kvq.calibration.consumer import StatsConsumer
from kvq.capture import CapturedKV
from kvq.quant import histogram as grid


def numpy_bin(x: float) -> int:
    """The bin of one value, from the grid's definition in float64 (the oracle)."""
    a = abs(x)
    if a < 2.0**grid.EXP_LO:
        return grid.ZERO
    m = min(int(math.floor((math.log2(a) - grid.EXP_LO) * grid.BINS_PER_OCTAVE)), grid.MAGNITUDE_BINS - 1)
    return grid.ZERO + 1 + m if x > 0 else grid.ZERO - 1 - m


def test_hand_values():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0**-21, 1e30, -1e30, 1.5])
    got = grid.bin_index(x).tolist()
    one = (0 - grid.EXP_LO) * grid.BINS_PER_OCTAVE  # 1.0 starts magnitude bin 320
    assert got[:4] == [grid.ZERO, grid.ZERO, grid.ZERO + 1 + one, grid.ZERO - 1 - one]
    assert got[4] == grid.ZERO
    assert got[5:7] == [grid.NUM_BINS - 1, 0]  # beyond 2**EXP_HI: the outermost bins
    assert got[7] == grid.ZERO + 1 + one + 9  # log2(1.5) * 16 = 9.36


def test_bins_match_the_definition_and_are_ordered():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen, dtype=torch.float64) * torch.exp2(torch.randint(-24, 22, (20000,),
                                                                                         generator=gen))
    frac = (x.abs().log2() - grid.EXP_LO) * grid.BINS_PER_OCTAVE
    x = x[(frac - frac.round()).abs() > 1e-4].to(torch.float32)  # away from edges float32 log2 cannot place
    got = grid.bin_index(x)
    assert got.tolist() == [numpy_bin(float(v)) for v in x.to(torch.float64)]
    order = torch.argsort(x)
    assert bool((got[order].diff() >= 0).all())  # bin index increases with the value


def test_lower_edges_hold_their_bins():
    edges = grid.bin_edges()
    inside = edges[1:] * torch.where(edges[1:] > 0, 1.0001, 0.9999)  # just above each finite lower edge
    assert grid.bin_index(inside.to(torch.float32)).tolist() == list(range(1, grid.NUM_BINS))


def _captured(key: torch.Tensor, value: torch.Tensor, layer: int = 0) -> CapturedKV:
    return CapturedKV(layer_idx=layer, key=key, value=value, token_mask=None)


@pytest.mark.parametrize("level", ["head", "channel"])
def test_merge_equals_the_histogram_of_the_concatenation(level):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 50, 8, generator=gen) * 3
    v = torch.randn(1, 2, 50, 8, generator=gen)
    halves, whole = KVStats(), KVStats()
    observer = StatsConsumer(halves, level)
    observer.kv(_captured(k[:, :, :20], v[:, :, :20]))
    observer.kv(_captured(k[:, :, 20:], v[:, :, 20:]))
    StatsConsumer(whole, level).kv(_captured(k, v))
    a, b = halves.layers[0], whole.layers[0]
    assert torch.equal(a.k.hist, b.k.hist) and torch.equal(a.v.hist, b.v.hist)
    # the counts, as numpy counts the oracle bins
    expect = np.zeros((2, 8, grid.NUM_BINS), dtype=np.int64)
    for h in range(2):
        for t in range(50):
            for c in range(8):
                expect[h, c, numpy_bin(float(k[0, h, t, c]))] += 1
    got = b.k.hist if level == "channel" else b.k.hist.unsqueeze(1)
    assert np.array_equal(got.numpy(), expect if level == "channel" else expect.sum(1, keepdims=True))
    # saved and loaded, and merged again: counts add
    merged = halves.merge(whole)
    assert torch.equal(merged.layers[0].v.hist, 2 * b.v.hist)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.999])
def test_quantile_is_within_one_bin_above_numpys(q):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4000, generator=gen).abs() * torch.tensor([[0.01], [1.0], [300.0]])  # (3, 4000)
    counts = grid.histogram(x, 3)
    got = grid.quantile(counts, q).numpy()
    exact = np.quantile(x.numpy().astype(np.float64), q, axis=1, method="inverted_cdf")
    assert np.all(got >= exact) and np.all(got <= exact * 2 ** (1 / grid.BINS_PER_OCTAVE) * (1 + 1e-6))


def test_bin_points_lie_in_their_bins():
    points, weights = grid.bin_points()
    assert torch.allclose(weights.sum(1), torch.ones(grid.NUM_BINS, dtype=torch.float64))
    idx = grid.bin_index(points.to(torch.float32))
    assert bool((idx == torch.arange(grid.NUM_BINS).unsqueeze(1)).all())
