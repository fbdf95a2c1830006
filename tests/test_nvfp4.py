"""NVFP4 against an independent numpy implementation: e2m1 and e4m3 values decoded from their bit fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernels.test_reference import fp8_round

from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.kernels import qdq_static, roundtrip_error_reference
from kvq.recipe.schema import parse_recipe
from kvq.solving.solver import solve_scales


def e2m1_grid() -> np.ndarray:
    """Every non-negative e2m1 value in code order: exponent 2 bits (bias 1), mantissa 1 bit, no inf / NaN."""
    values = []
    for e in range(4):
        for m in range(2):
            values.append(m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))
    return np.array(values)


def e2m1_round(y: np.ndarray) -> np.ndarray:
    """Nearest e2m1 value, ties to the even code, saturating at 6."""
    grid = e2m1_grid()
    a = np.minimum(np.abs(y.astype(np.float64)), 6.0)
    hi = np.clip(np.searchsorted(grid, a, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.sign(y) * np.where(pick_hi, grid[hi], grid[lo])


def oracle_qdq(x: np.ndarray, g: float) -> np.ndarray:
    """NVFP4 round trip of float32 x (..., d) with global scale g, block by block, in numpy."""
    out = np.empty_like(x, dtype=np.float32)
    flat, res = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
    g32 = np.float32(g)
    for r in range(flat.shape[0]):
        for b in range(0, flat.shape[1], 16):
            block = flat[r, b:b + 16].astype(np.float32)
            amax = np.float32(np.abs(block).max())
            sb = fp8_round(np.array([min(amax / (np.float32(6.0) * g32), np.float32(448.0))], dtype=np.float32),
                           "fp8_e4m3")[0]
            denom = np.float32(sb * g32)
            y = block / denom if denom > 0 else np.zeros_like(block)
            res[r, b:b + 16] = (e2m1_round(y).astype(np.float32) * sb) * g32
    return out


def test_e2m1_grid_by_hand():
    assert e2m1_grid().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, 100.0])
    assert e2m1_round(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -4.0, 6.0]


def test_round_e2m1_matches_the_bit_decoding():
    from kvq.quant.nvfp4 import round_e2m1

    grid = torch.tensor(e2m1_grid(), dtype=torch.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    base = torch.cat([grid, mids, torch.tensor([6.5, 7.0, 8.0, 1e6])])
    y = torch.cat([base, -base, torch.nextafter(base, torch.tensor(1e9)), torch.nextafter(base, torch.tensor(-1e9))])
    assert round_e2m1(y).tolist() == e2m1_round(y.numpy()).astype(np.float32).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_matches_numpy_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 7, 64, generator=gen) * torch.exp(torch.randn(2, 3, 7, 4, 1, generator=gen) * 2)
         .expand(-1, -1, -1, -1, 16).reshape(2, 3, 7, 64)).to(dtype)  # blocks of very different magnitudes
    g = torch.tensor(float(x.float().abs().max()) / 448)
    got = qdq_static(x, g, None, "nvfp4")
    want = torch.from_numpy(oracle_qdq(x.float().numpy(), float(g))).to(dtype)
    assert torch.equal(got, want)
    err = roundtrip_error_reference(x, g, None, "nvfp4")
    assert err.clipped.tolist() == [0, 0, 0]  # the calibrated absmax never saturates a block scale


def test_values_beyond_the_calibrated_range_saturate_and_count_as_clipped():
    x = torch.zeros(1, 1, 1, 32)
    x[..., :16] = torch.linspace(-1, 1, 16)
    x[..., 16:] = 10.0  # ten times the calibrated absmax 1: the block scale 10 / (6 g) = 747 saturates at 448
    x[..., 31] = 0.5
    g = torch.tensor(1.0 / 448)
    got = qdq_static(x, g, None, "nvfp4")
    want = torch.from_numpy(oracle_qdq(x.numpy(), float(g)))
    assert torch.equal(got, want)
    assert got[0, 0, 0, 16].item() == pytest.approx(6 * 448 * float(g))  # block scale 448, value 6: the top
    assert roundtrip_error_reference(x, g, None, "nvfp4").clipped.tolist() == [15]  # 10 / (448 g) = 10 >= 7


def test_a_block_of_tiny_values_stores_zeros():
    x = torch.full((1, 1, 2, 16), 1e-12)
    assert torch.equal(qdq_static(x, torch.tensor(1.0), None, "nvfp4"), torch.zeros_like(x))


def test_head_dim_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="head_dim 24 is not a multiple of 16"):
        qdq_static(torch.ones(1, 1, 2, 24), torch.tensor(1.0), None, "nvfp4")


def test_solver_global_scale_is_absmax_over_448():
    stats = KVStats()
    stats.observe(0, torch.tensor([[-5.0, 1.0]]), torch.tensor([[2.0, 3.0]]), torch.tensor([[0.0, -1.0]]),
                  torch.tensor([[448.0, 0.0]]), tokens=4)
    scales = solve_scales(stats, parse_recipe({"format": "nvfp4", "granularity": "tensor"}, "t", "nvfp4"))
    assert scales.layers[0].k_scale.item() == pytest.approx(5.0 / 448)  # ModelOpt >= 0.42, vLLM, TensorRT-LLM
    assert scales.layers[0].v_scale.item() == 1.0


@pytest.mark.parametrize("bad", [{"granularity": "head"}, {"granularity": "tensor", "symmetric": False}])
def test_recipe_takes_one_global_scale(bad):
    with pytest.raises(UsageError, match="format nvfp4 takes one static global scale per layer"):
        parse_recipe({"format": "nvfp4"} | bad, "r", "r")
