"""The torch reference round trip against hand values and an independent numpy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvq.kernels import fake_quantize, roundtrip_error
from kvq.kernels.reference import (
    RoundTripError,
    expand_qparams,
    qdq_dynamic_per_token_head,
    qdq_static,
    roundtrip_error_reference,
)

INT_FORMATS = {"int8": (-128, 127), "int4": (-8, 7)}
FP8_FORMATS = {"fp8_e4m3": (4, 3), "fp8_e5m2": (5, 2), "fp8_e4m3fnuz": (4, 3)}  # (exponent bits, mantissa bits)
FP8_BIAS = {"fp8_e4m3": 7, "fp8_e5m2": 15, "fp8_e4m3fnuz": 8}  # fnuz: AMD's e4m3, exponent bias 8
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp8_e4m3fnuz": 224.0}  # fnuz: the engines' clamp


# ---------------------------------------------------------------------------------------------
# An independent implementation: numpy float32 arithmetic, fp8 values decoded from their bit fields.
# ---------------------------------------------------------------------------------------------


def fp8_positive_grid(fmt: str) -> np.ndarray:
    """Every finite non-negative value of the fp8 format, in code order (= value order), as float64."""
    ebits, mbits = FP8_FORMATS[fmt]
    bias = FP8_BIAS[fmt]
    values = []
    for e in range(2**ebits):
        for m in range(2**mbits):
            if fmt == "fp8_e4m3" and e == 15 and m == 7:  # e4m3fn: the only NaN code, no inf
                continue
            if fmt == "fp8_e5m2" and e == 31:  # e5m2: inf and NaNs
                continue
            # e4m3fnuz: every positive code is finite (its only NaN is 0x80, the negative zero of the others)
            if e == 0:
                values.append(m / 2**mbits * 2.0 ** (1 - bias))
            else:
                values.append((1 + m / 2**mbits) * 2.0 ** (e - bias))
    return np.array(values, dtype=np.float64)


def fp8_round(y: np.ndarray, fmt: str, extended: bool = False) -> np.ndarray:
    """Round float32 values to the nearest fp8 value, ties to the even code.

    ``extended`` continues the grid one step past the largest value (480 for e4m3, 65536 for e5m2,
    codes of odd and even parity) to see which values overflow; without it, y must be inside +-fmax.
    """
    grid = fp8_positive_grid(fmt)
    if extended:
        grid = np.append(grid, {"fp8_e4m3": 480.0, "fp8_e5m2": 65536.0, "fp8_e4m3fnuz": 256.0}[fmt])
    a = np.abs(y.astype(np.float64))
    hi = np.clip(np.searchsorted(grid, a, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    d_lo = a - grid[lo]
    d_hi = grid[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    out = np.where(pick_hi, grid[hi], grid[lo])
    return (np.sign(y) * out).astype(np.float32)


def oracle_qdq(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, fmt: str
) -> tuple[np.ndarray, np.ndarray]:
    """(x_hat, clipped) for float32 x and scale / zp already broadcast to x's shape."""
    x = x.astype(np.float32)
    s = scale.astype(np.float32)
    y = x / s
    if fmt in FP8_MAX:
        fmax = np.float32(FP8_MAX[fmt])
        clipped = np.abs(fp8_round(np.minimum(np.abs(y), np.float32(1e6)), fmt, extended=True)) > fmax
        q = fp8_round(np.minimum(np.maximum(y, -fmax), fmax), fmt)
        return (q * s).astype(np.float32), clipped
    qmin, qmax = INT_FORMATS[fmt]
    r = np.rint(y)  # round half to even
    z = np.zeros_like(r) if zp is None else zp.astype(np.float32)
    r = r + z
    clipped = (r < qmin) | (r > qmax)
    q = np.minimum(np.maximum(r, np.float32(qmin)), np.float32(qmax))
    return ((q - z) * s).astype(np.float32), clipped


def broadcast_qparam(t: torch.Tensor, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Scale / zero point of shape (), (h,) or (h, d) to a full (b, h, t, d) numpy array, by loops."""
    b, h, n, d = shape
    src = t.numpy()
    out = np.empty(shape, dtype=src.dtype)
    for hi in range(h):
        for di in range(d):
            if src.ndim == 0:
                v = src[()]
            elif src.ndim == 1:
                v = src[hi]
            else:
                v = src[hi, di]
            out[:, hi, :, di] = v
    return out


def oracle_dynamic(x: np.ndarray, fmt: str, symmetric: bool) -> np.ndarray:
    """Per-(batch, head, token) round trip, one row at a time."""
    out = np.empty_like(x, dtype=np.float32)
    b, h, n, _ = x.shape
    floor = np.float32(2.0**-23)
    for bi in range(b):
        for hi in range(h):
            for ti in range(n):
                row = x[bi, hi, ti].astype(np.float32)
                if symmetric:
                    top = np.float32(FP8_MAX[fmt] if fmt in FP8_MAX else INT_FORMATS[fmt][1])
                    scale = max(np.max(np.abs(row)) / top, floor)
                    out[bi, hi, ti] = oracle_qdq(row, np.full_like(row, scale), None, fmt)[0]
                else:
                    qmin, qmax = INT_FORMATS[fmt]
                    lo, hi_ = np.min(row), np.max(row)
                    scale = max((hi_ - lo) / np.float32(qmax - qmin), floor)
                    u = np.clip(np.rint((row - lo) / scale), 0, qmax - qmin)
                    out[bi, hi, ti] = u * scale + lo
    return out


def make_qparams(
    fmt: str, granularity: str, symmetric: bool, h: int, d: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = {"tensor": (), "head": (h,), "channel": (h, d)}[granularity]
    top = FP8_MAX[fmt] if fmt in FP8_MAX else INT_FORMATS[fmt][1]
    scale = (torch.rand(shape, generator=gen) * 2.0 + 0.5) / top  # absmax between 0.5 and 2.5
    if symmetric:
        return scale.to(torch.float32), None
    qmin, qmax = INT_FORMATS[fmt]
    zp = torch.randint(qmin // 2, qmax // 2 + 1, shape, generator=gen, dtype=torch.int32)
    return scale.to(torch.float32), zp


CASES = [
    (fmt, gran, sym)
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4")
    for gran in ("tensor", "head", "channel")
    for sym in ((True,) if fmt in FP8_MAX else (True, False))
]


# ---------------------------------------------------------------------------------------------
# The independent implementation itself, on a few values checked by hand.
# ---------------------------------------------------------------------------------------------


def test_oracle_fp8_grid_by_hand() -> None:
    e4m3 = fp8_positive_grid("fp8_e4m3")
    e5m2 = fp8_positive_grid("fp8_e5m2")
    assert len(e4m3) == 127 and e4m3[-1] == 448.0 and e4m3[1] == 2.0**-9
    assert len(e5m2) == 124 and e5m2[-1] == 57344.0 and e5m2[1] == 2.0**-16
    y = np.array([14.5, 15.5, 13.0, 432.0, 0.00146484375, -1.0625], dtype=np.float32)
    # 14.5 ties between 14 (mantissa 110) and 15 (111): even -> 14; 15.5 -> 16; 432 -> 448 (even);
    # 0.00146484375 = 0.75 * 2**-9 rounds to 2**-9; -1.0625 ties between 1 and 1.125 -> -1.
    assert fp8_round(y, "fp8_e4m3").tolist() == [14.0, 16.0, 13.0, 448.0, 2.0**-9, -1.0]
    fnuz = fp8_positive_grid("fp8_e4m3fnuz")
    # 128 codes 0x00..0x7F, all finite; largest 1.875 * 2**7; smallest subnormal 2**-10; the values are e4m3fn's / 2
    assert len(fnuz) == 128 and fnuz[-1] == 240.0 and fnuz[1] == 2.0**-10
    assert np.array_equal(fnuz[:127], e4m3 / 2)


# ---------------------------------------------------------------------------------------------
# expand_qparams
# ---------------------------------------------------------------------------------------------


def test_expand_qparams_shapes() -> None:
    assert expand_qparams(torch.tensor(2.0), 3, 5).shape == (1, 1, 1, 1)
    assert expand_qparams(torch.ones(3), 3, 5).shape == (1, 3, 1, 1)
    per_channel = torch.arange(15.0).reshape(3, 5)
    out = expand_qparams(per_channel, 3, 5)
    assert out.shape == (1, 3, 1, 5)
    assert out[0, 2, 0, 4].item() == 14.0


@pytest.mark.parametrize("shape", [(4,), (5,), (3, 4), (5, 3), (1, 3, 5), (3, 5, 1)])
def test_expand_qparams_rejects_other_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="per tensor"):
        expand_qparams(torch.ones(shape), 3, 5)


# ---------------------------------------------------------------------------------------------
# Hand values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_grid_values_roundtrip_exactly(fmt: str) -> None:
    qmin, qmax = INT_FORMATS[fmt]
    scale = torch.tensor([0.013, 0.25, 1.7])  # per head
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    x = (codes.reshape(1, 1, -1, 1) * scale.reshape(1, 3, 1, 1)).expand(2, 3, -1, 4).contiguous()
    assert torch.equal(qdq_static(x, scale, None, fmt), x)
    err = roundtrip_error_reference(x, scale, None, fmt)
    assert err.sse.tolist() == [0.0, 0.0, 0.0]
    assert err.max_abs_err.tolist() == [0.0, 0.0, 0.0]
    assert err.sqnr_db.tolist() == [math.inf] * 3
    assert err.clipped.tolist() == [0, 0, 0]
    assert err.count.tolist() == [2 * (qmax - qmin + 1) * 4] * 3


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_asymmetric_grid_values_roundtrip_exactly(fmt: str) -> None:
    qmin, qmax = INT_FORMATS[fmt]
    scale = torch.tensor([[0.5, 0.03], [2.0, 0.7]])  # per channel, 2 heads x 2 channels
    zp = torch.tensor([[qmin, 3], [-2, qmax]], dtype=torch.int32)
    q = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    x = (q.reshape(1, 1, -1, 1) - zp.reshape(1, 2, 1, 2)) * scale.reshape(1, 2, 1, 2)  # every code
    assert torch.equal(qdq_static(x, scale, zp, fmt), x)
    err = roundtrip_error_reference(x, scale, zp, fmt)
    assert err.sse.tolist() == [0.0, 0.0]
    assert err.clipped.tolist() == [0, 0]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz"])
def test_fp8_grid_values_roundtrip_exactly(fmt: str) -> None:
    grid = torch.from_numpy(fp8_positive_grid(fmt)).to(torch.float32)
    grid = grid[grid <= FP8_MAX[fmt]]  # e4m3fnuz's 232 and 240 lie beyond the engines' clamp at 224
    values = torch.cat([grid, -grid])
    scale = torch.tensor(0.37)
    x = (values * scale).reshape(1, 1, -1, 2)
    assert torch.equal(qdq_static(x, scale, None, fmt), x)
    err = roundtrip_error_reference(x, scale, None, fmt)
    assert err.sse.item() == 0.0
    assert err.sqnr_db.item() == math.inf
    assert err.clipped.item() == 0


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_error_at_most_half_a_step_inside_range(fmt: str, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    h, d = 3, 16
    scale, zp = make_qparams(fmt, "channel", symmetric, h, d, gen)
    qmin, qmax = INT_FORMATS[fmt]
    z = torch.zeros_like(scale) if zp is None else zp.to(torch.float32)
    lo = ((qmin - z) * scale).reshape(1, h, 1, d)
    hi = ((qmax - z) * scale).reshape(1, h, 1, d)
    u = torch.rand(4, h, 50, d, generator=gen)
    x = lo + u * (hi - lo)  # inside the representable range
    err = (x - qdq_static(x, scale, zp, fmt)).abs()
    half = scale.reshape(1, h, 1, d) / 2
    assert bool((err <= half * (1 + 1e-6)).all())
    assert roundtrip_error_reference(x, scale, zp, fmt).clipped.tolist() == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz"])
def test_fp8_relative_error_bound_inside_range(fmt: str) -> None:
    ebits, mbits = FP8_FORMATS[fmt]
    min_normal = 2.0 ** (1 - FP8_BIAS[fmt])
    gen = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.01, 3.0])
    # log-uniform magnitudes over the whole range, both signs
    mag = torch.exp(torch.empty(1, 2, 400, 8).uniform_(math.log(1e-7), math.log(FP8_MAX[fmt]), generator=gen))
    sign = torch.where(torch.rand(mag.shape, generator=gen) < 0.5, -1.0, 1.0)
    y = mag * sign
    x = y * scale.reshape(1, 2, 1, 1)
    err = (x - qdq_static(x, scale, None, fmt)).abs()
    s = scale.reshape(1, 2, 1, 1)
    normal = y.abs() >= min_normal
    rel_bound = 2.0 ** -(mbits + 1)  # half a step relative to the value
    assert bool((err[normal] <= rel_bound * x.abs()[normal] * (1 + 1e-6)).all())
    sub_bound = 2.0 ** (1 - FP8_BIAS[fmt] - mbits - 1)  # half the subnormal step, times the scale
    assert bool((err[~normal] <= (sub_bound * s.expand_as(x))[~normal] * (1 + 1e-6)).all())


def test_int_clip_counting_by_hand() -> None:
    x = torch.tensor([126.4, 127.4, 127.5, 128.0, -128.0, -128.5, -128.6, -129.0, 0.0, 1e9])
    x = x.reshape(1, 1, -1, 1)
    err = roundtrip_error_reference(x, torch.tensor(1.0), None, "int8")
    # clipped: 127.5 (rounds to 128), 128, -128.6 (-129), -129, 1e9; -128.5 rounds to -128 (even)
    assert err.clipped.tolist() == [5]
    assert qdq_static(x, torch.tensor(1.0), None, "int8").flatten().tolist() == [
        126.0, 127.0, 127.0, 127.0, -128.0, -128.0, -128.0, -128.0, 0.0, 127.0,
    ]  # fmt: skip
    assert err.count.tolist() == [10]
    assert err.clip_rate.tolist() == [0.5]


def test_int_asymmetric_clip_counting_by_hand() -> None:
    scale = torch.tensor([1.0, 0.5])
    zp = torch.tensor([10, -8], dtype=torch.int32)
    x = torch.tensor([[117.4, 117.6, -138.0, -138.6], [0.0, 67.4, 67.8, -60.0]]).reshape(1, 2, 4, 1)
    err = roundtrip_error_reference(x, scale, zp, "int8")
    # head 0: 117+10=127 ok, 118+10=128 clipped, -138+10=-128 ok, -139+10=-129 clipped
    # head 1: x/0.5-8: -8 ok, 135-8=127 ok (134.8 -> 135), 136-8=128 clipped, -120-8=-128 ok
    assert err.clipped.tolist() == [2, 1]
    out = qdq_static(x, scale, zp, "int8").reshape(2, 4)
    assert out.tolist() == [[117.0, 117.0, -138.0, -138.0], [0.0, 67.5, 67.5, -60.0]]


@pytest.mark.parametrize(
    ("fmt", "values", "n_clipped"),
    [
        # 464 is the tie between 448 (even code) and 480: rounds to 448, not clipped
        ("fp8_e4m3", [448.0, 456.0, 464.0, 464.03125, -480.0, 1e30, -448.0, 0.0], 3),
        # 61440 is the tie between 57344 (odd code) and 65536 (even): overflows, clipped
        ("fp8_e5m2", [57344.0, 60000.0, 61436.0, 61440.0, -70000.0, 1e30, -57344.0, 0.0], 3),
        # clamped at 224 (vLLM on ROCm): 232 is the tie between 224 (even code) and 240: rounds to 224, not clipped
        ("fp8_e4m3fnuz", [224.0, 228.0, 232.0, 232.01, -240.0, 1e30, -224.0, 0.0], 3),
    ],
)
def test_fp8_clip_counting_by_hand(fmt: str, values: list[float], n_clipped: int) -> None:
    fmax = FP8_MAX[fmt]
    x = torch.tensor(values).reshape(1, 1, -1, 1)
    err = roundtrip_error_reference(x, torch.tensor(1.0), None, fmt)
    assert err.clipped.tolist() == [n_clipped]
    out = qdq_static(x, torch.tensor(1.0), None, fmt).flatten().tolist()
    assert out == [fmax, fmax, fmax, fmax, -fmax, fmax, -fmax, 0.0]
    y = np.array(values, dtype=np.float32)
    assert int((np.abs(fp8_round(np.minimum(np.abs(y), 1e6), fmt, extended=True)) > fmax).sum()) == n_clipped


def test_value_at_fmax_times_scale_is_not_clipped() -> None:
    # 448 * 0.37 / 0.37 is one float32 ulp above 448: it rounds to 448, so it is not clipped
    scale = torch.tensor(0.37)
    x = (torch.tensor([448.0, -448.0]) * scale).reshape(1, 1, 2, 1)
    assert (x / scale).abs().max().item() > 448.0
    assert roundtrip_error_reference(x, scale, None, "fp8_e4m3").clipped.tolist() == [0]


# ---------------------------------------------------------------------------------------------
# Against the independent implementation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "granularity", "symmetric"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_matches_independent_implementation(
    fmt: str, granularity: str, symmetric: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(CASES.index((fmt, granularity, symmetric)))
    b, h, n, d = 2, 3, 7, 8
    scale, zp = make_qparams(fmt, granularity, symmetric, h, d, gen)
    x = (torch.randn(b, h, n, d, generator=gen) * 0.8).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([5.0, -5.0, 0.0]).to(dtype)  # clipped in every format here
    xs = broadcast_qparam(scale, (b, h, n, d))
    zs = None if zp is None else broadcast_qparam(zp, (b, h, n, d))
    x_hat, clipped = oracle_qdq(x.to(torch.float32).numpy(), xs, zs, fmt)

    got = qdq_static(x, scale, zp, fmt)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, torch.from_numpy(x_hat).to(dtype))

    err = roundtrip_error_reference(x, scale, zp, fmt)
    x32 = x.to(torch.float32).numpy()
    xf = x32.astype(np.float64)
    diff = (x32 - x_hat).astype(np.float64)  # the error is taken in float32, then accumulated in float64
    assert np.allclose(err.sse.numpy(), (diff**2).sum(axis=(0, 2, 3)), rtol=1e-12, atol=0)
    assert np.allclose(err.signal.numpy(), (xf**2).sum(axis=(0, 2, 3)), rtol=1e-12, atol=0)
    assert err.max_abs_err.numpy().tolist() == np.abs(diff).max(axis=(0, 2, 3)).astype(np.float32).tolist()
    assert err.clipped.tolist() == clipped.sum(axis=(0, 2, 3)).tolist()
    assert err.clipped[0].item() >= 2
    assert err.count.tolist() == [b * n * d] * h
    assert err.sse.dtype == torch.float64 and err.max_abs_err.dtype == torch.float32
    assert err.clipped.dtype == torch.int64


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8", "int4"])
def test_dynamic_symmetric_matches_independent_implementation(fmt: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 16, generator=gen) * torch.rand(2, 3, 5, 1, generator=gen) * 4
    x[1, 2, 4] = 0.0  # an all-zero token-head: scale floor, exact zeros back
    got = qdq_dynamic_per_token_head(x, fmt, symmetric=True)
    want = oracle_dynamic(x.numpy(), fmt, symmetric=True)
    assert torch.equal(got, torch.from_numpy(want))
    assert got[1, 2, 4].abs().sum().item() == 0.0


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dynamic_asymmetric_matches_independent_implementation(fmt: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 16, generator=gen) + torch.randn(2, 3, 5, 1, generator=gen) * 3
    x[0, 1, 2] = 1.25  # a constant token-head comes back exactly
    got = qdq_dynamic_per_token_head(x.to(torch.bfloat16), fmt, symmetric=False)
    want = oracle_dynamic(x.to(torch.bfloat16).to(torch.float32).numpy(), fmt, symmetric=False)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(want).to(torch.bfloat16))
    got32 = qdq_dynamic_per_token_head(x, fmt, symmetric=False)
    assert torch.equal(got32, torch.from_numpy(oracle_dynamic(x.numpy(), fmt, symmetric=False)))
    assert torch.equal(got32[0, 1, 2], x[0, 1, 2])
    # the minimum of every token-head is reproduced exactly (its code is 0, the offset is the min)
    assert torch.equal(got32.amin(dim=-1), x.amin(dim=-1))


def test_dynamic_asymmetric_by_hand() -> None:
    # LMDeploy's convention: offset = min (not widened to 0), scale = (max - min) / 15 for 4 bits
    row = torch.tensor([2.0, 2.5, 3.0, 9.5]).reshape(1, 1, 1, 4)  # min 2, max 9.5, scale 0.5
    assert qdq_dynamic_per_token_head(row, "int4", symmetric=False).flatten().tolist() == [2.0, 2.5, 3.0, 9.5]
    row = torch.tensor([2.0, 2.2, 2.3, 9.5]).reshape(1, 1, 1, 4)  # 0.4 -> 0 (half-even), 0.6 -> 1
    assert qdq_dynamic_per_token_head(row, "int4", symmetric=False).flatten().tolist() == [2.0, 2.0, 2.5, 9.5]


def test_dynamic_symmetric_error_at_most_half_a_step() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 9, 32, generator=gen)
    got = qdq_dynamic_per_token_head(x, "int8", symmetric=True)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((x - got).abs() <= step / 2 * (1 + 1e-6)).all())


def test_dynamic_rejects_asymmetric_fp8() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        qdq_dynamic_per_token_head(torch.zeros(1, 1, 1, 4), "fp8_e4m3", symmetric=False)


# ---------------------------------------------------------------------------------------------
# RoundTripError
# ---------------------------------------------------------------------------------------------


def test_merge_equals_the_sums_over_both_batches() -> None:
    gen = torch.Generator().manual_seed(6)
    scale = torch.tensor([0.01, 0.02])
    zp = torch.tensor([3, -5], dtype=torch.int32)
    a = torch.randn(2, 2, 10, 8, generator=gen)
    b = torch.randn(3, 2, 6, 8, generator=gen) * 2
    err_a = roundtrip_error_reference(a, scale, zp, "int8")
    err_b = roundtrip_error_reference(b, scale, zp, "int8")
    merged = err_a.merge(err_b)
    # a and b differ in batch and tokens: compare with the sums over both tensors computed directly
    xa, xb = a.double(), b.double()
    ea = (a - qdq_static(a, scale, zp, "int8")).double()  # float32 errors, as the reference defines them
    eb = (b - qdq_static(b, scale, zp, "int8")).double()
    sse = (ea**2).sum(dim=(0, 2, 3)) + (eb**2).sum(dim=(0, 2, 3))
    assert torch.allclose(merged.sse, sse, rtol=1e-12, atol=0)
    assert torch.allclose(merged.signal, (xa**2).sum(dim=(0, 2, 3)) + (xb**2).sum(dim=(0, 2, 3)), rtol=1e-12)
    assert merged.count.tolist() == [2 * 10 * 8 + 3 * 6 * 8] * 2
    assert torch.equal(merged.clipped, err_a.clipped + err_b.clipped)
    max_err = torch.maximum(ea.abs().amax(dim=(0, 2, 3)), eb.abs().amax(dim=(0, 2, 3)))
    assert torch.equal(merged.max_abs_err.double(), max_err)
    assert torch.allclose(merged.mse, sse / merged.count.double(), rtol=1e-12)


def test_derived_metrics_by_hand() -> None:
    err = RoundTripError(
        sse=torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64),
        signal=torch.tensor([100.0, 5.0, 4.0], dtype=torch.float64),
        max_abs_err=torch.tensor([0.5, 0.0, 1.0]),
        clipped=torch.tensor([1, 0, 4]),
        count=torch.tensor([4, 4, 8]),
    )
    assert err.sqnr_db.tolist() == [20.0, math.inf, 0.0]
    assert err.mse.tolist() == [0.25, 0.0, 0.5]
    assert err.clip_rate.tolist() == [0.25, 0.0, 0.5]
    with pytest.raises(ValueError, match="merge"):
        err.merge(RoundTripError.zeros(2))
    assert torch.equal(err.merge(RoundTripError.zeros(3)).sse, err.sse)


def test_sqnr_of_a_uniform_int8_quantizer_is_near_theory() -> None:
    # uniform x over the full range, step s: noise s**2 / 12, signal (127 s)**2 / 3 -> ~ 48.2 dB
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(1, 1, 20000, 16, generator=gen) * 2 - 1) * 127 * 0.01
    err = roundtrip_error_reference(x, torch.tensor(0.01), None, "int8")
    theory = 10 * math.log10((127**2 / 3) / (1 / 12))
    assert abs(err.sqnr_db.item() - theory) < 0.1


# ---------------------------------------------------------------------------------------------
# Input checks and dispatch
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused() -> None:
    x = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="symmetric"):
        qdq_static(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), "fp8_e4m3")
    with pytest.raises(ValueError, match="batch, kv_heads, tokens, head_dim"):
        qdq_static(torch.zeros(2, 3, 4), torch.tensor(1.0), None, "int8")
    with pytest.raises(ValueError, match="unknown format"):
        roundtrip_error_reference(x, torch.tensor(1.0), None, "int2")
    with pytest.raises(ValueError, match="zero_point shape"):
        qdq_static(x, torch.ones(2), torch.zeros((), dtype=torch.int32), "int8")
    with pytest.raises(ValueError, match="int32"):
        qdq_static(x, torch.ones(2), torch.zeros(2), "int8")
    with pytest.raises(ValueError, match="dtype"):
        qdq_static(x.to(torch.float64), torch.ones(2), None, "int8")


def test_empty_token_range_gives_zero_counts() -> None:
    err = roundtrip_error_reference(torch.zeros(2, 3, 0, 4), torch.ones(3), None, "int8")
    assert err.count.tolist() == [0, 0, 0] and err.sse.tolist() == [0.0, 0.0, 0.0]


def test_dispatch_on_cpu_uses_the_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 11, 8, generator=gen)
    scale, zp = make_qparams("int4", "head", False, 3, 8, gen)
    got, want = roundtrip_error(x, scale, zp, "int4"), roundtrip_error_reference(x, scale, zp, "int4")
    for field in ("sse", "signal", "max_abs_err", "clipped", "count"):
        assert torch.equal(getattr(got, field), getattr(want, field))
    assert torch.equal(fake_quantize(x, scale, zp, "int4"), qdq_static(x, scale, zp, "int4"))


def test_package_imports_and_dispatches_without_triton() -> None:
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kvq.kernels as k\n"
        "assert k.triton_kernels() is None\n"
        "x = torch.linspace(-2, 2, 48).reshape(1, 2, 3, 8)\n"
        "e = k.roundtrip_error(x, torch.tensor([0.01, 0.02]), None, 'int8')\n"
        "assert e.count.tolist() == [24, 24]\n"
        "assert k.fake_quantize(x, torch.tensor(0.5), None, 'int4').shape == x.shape\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
