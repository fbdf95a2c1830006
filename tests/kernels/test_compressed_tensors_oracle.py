"""kvq's fake-quantizer and round-trip error against an implementation kvq did not write.

The oracle is compressed-tensors' ``fake_quantize`` (vLLM's quantization library; a kvq dependency):
``x_hat = (round(clamp(x / scale + zero_point, qmin, qmax)) - zero_point) * scale`` in float32, fp8
rounded by torch's cast to ``float8_e4m3fn``. kvq (``kvq.quant.qparams``) computes
``x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

Where the conventions agree (every case is asserted bit-exact there):

* fp8 e4m3, symmetric, per tensor / head / channel: both divide in float32, clamp to +-448 and cast
  with round-to-nearest-even; bit-exact everywhere, ties of the fp8 grid and values beyond the range
  included (bf16 inputs too: compressed-tensors returns float32, kvq returns bf16 of the same value);
* int8 / int4 symmetric with a given scale: same range ([-128, 127] / [-8, 7] in both), same rounding
  (half to even), zero point 0; bit-exact everywhere;
* asymmetric qparams from a (min, max) range: both widen the range to include 0, take
  ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = round(qmin - min / scale)``; bit-exact.

Where they differ (stated, and tested as a difference):

* int asymmetric fake-quantize: compressed-tensors adds the zero point *before* rounding, in
  float32. The two agree wherever that sum ``x / scale + zero_point`` is not exactly halfway between
  two integers: a half-integer is a float32 number (below 2**22), so the add's rounding never carries
  a value across one, it can only land on it. On a half-integer they may be one code apart: a tie
  ``x / scale`` with an odd zero point (kvq rounds ``x / scale`` to even and then shifts,
  compressed-tensors rounds the shifted value to even), or a value the inexact add moved onto a
  tie. The test asserts bit-exactness off the half-integers, at most one step on them, and that the
  odd-zero-point ties do differ.
* int symmetric qparams: kvq's ``scale = absmax / qmax`` (127) maps the calibrated range onto
  [-127, 127] (code -128 is never reached, nothing clips); compressed-tensors' ``absmax / 127.5``
  maps it onto [-127.5, 127.5], so ``-absmax`` rounds to -128 and ``+absmax`` clips to 127.
* a zero range: kvq floors every scale at 2**-23, compressed-tensors replaces only an exact 0 by
  float32 eps (the same 2**-23); not exercised here.

Shapes are (batch, kv_heads, tokens, head_dim) = (2, 3, 37, 80): 37 tokens and head_dim 80 divide no
Triton tile (8192 elements, BLOCK_D 128) nor a power of two.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from kvq.kernels import fake_quantize, roundtrip_error
from kvq.quant.qparams import choose_qparams
from kvq.recipe.schema import load_recipe

SHAPE = (2, 3, 37, 80)
INT_BITS = {"int8": 8, "int4": 4}
INT_LIMITS = {"int8": (-128, 127), "int4": (-8, 7)}  # two's complement, as compressed-tensors has them
CT_STRATEGY = {"tensor": "tensor", "head": "attn_head", "channel": "channel"}


def qparam_shape(granularity: str) -> tuple[int, ...]:
    """kvq's scale shape: () per tensor, (kv_heads,) per head, (kv_heads, head_dim) per channel."""
    _, h, _, d = SHAPE
    return {"tensor": (), "head": (h,), "channel": (h, d)}[granularity]


def broadcastable(t: torch.Tensor) -> torch.Tensor:
    """A kvq-shaped qparam as compressed-tensors wants it: broadcasting against (b, h, t, d).

    Always 4-d, so that torch's type promotion makes ``bf16 x / scale`` float32 (a 0-d float32 scale
    would keep bf16).
    """
    _, h, _, d = SHAPE
    if t.dim() == 0:
        return t.reshape(1, 1, 1, 1)  # () -> (1, 1, 1, 1)
    if t.dim() == 1:
        return t.reshape(1, h, 1, 1)  # (h,) -> (1, h, 1, 1)
    return t.reshape(1, h, 1, d)  # (h, d) -> (1, h, 1, d)


def fp8_e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, ascending (decoded by torch from all 256 bit patterns)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    return values[torch.isfinite(values)].unique()


def quotients(kind: str, gen: torch.Generator) -> torch.Tensor:
    """Target values of ``x / scale``, shape SHAPE: random, exact rounding ties, beyond the range."""
    n = torch.Size(SHAPE).numel()
    if kind == "fp8":
        grid = fp8_e4m3_grid()
        ties = (grid[1:] + grid[:-1]) / 2  # midpoints of neighbouring fp8 values: exact in float32
        special = torch.cat([grid, ties, torch.tensor([464.0, -464.0, 470.0, 480.0, 1e4, -3e5])])
        random = torch.randn(n, generator=gen) * 120.0
    else:
        lo, hi = INT_LIMITS[kind]
        ties = torch.arange(2 * lo - 4, 2 * hi + 6, dtype=torch.float32) / 2  # every half-integer and integer
        special = torch.cat([ties, torch.tensor([hi + 0.5, lo - 0.5, 4.0 * hi, 40.0 * lo, 1e5])])
        random = torch.randn(n, generator=gen) * (hi / 2.5)
    up = torch.nextafter(special, torch.full_like(special, float("inf")))
    special = torch.cat([special, up])  # one float32 ulp past each tie
    y = random.clone()
    where = torch.randperm(n, generator=gen)[: special.numel()]
    y[where] = special
    return y.reshape(SHAPE)


def scales_for(kind: str, granularity: str, exact: bool, gen: torch.Generator) -> torch.Tensor:
    """Powers of two (``exact``: x = y * scale is exact, so ties stay ties) or awkward float32 scales."""
    shape = qparam_shape(granularity)
    if exact:
        return torch.pow(2.0, torch.randint(-9, -2, shape, generator=gen).to(torch.float32))
    return torch.rand(shape, generator=gen) * 0.05 + 0.003


def ct_args(kind: str, symmetric: bool, granularity: str) -> QuantizationArgs:
    if kind == "fp8":
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=CT_STRATEGY[granularity])
    return QuantizationArgs(
        num_bits=INT_BITS[kind], type="int", symmetric=symmetric, strategy=CT_STRATEGY[granularity]
    )


def assert_error_matches(
    x: torch.Tensor, x_hat: torch.Tensor, clipped_by_hand: torch.Tensor, got
) -> None:  # fmt: skip
    """kvq's RoundTripError against sums computed here from the oracle's x_hat (float32 error)."""
    err = x.to(torch.float32) - x_hat.to(torch.float32)
    dims = (0, 2, 3)
    torch.testing.assert_close(got.sse, err.double().square().sum(dim=dims), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.signal, x.double().square().sum(dim=dims), rtol=1e-12, atol=0)
    assert torch.equal(got.max_abs_err, err.abs().amax(dim=dims))
    assert got.clipped.tolist() == clipped_by_hand.sum(dim=dims).tolist()
    assert got.count.tolist() == [SHAPE[0] * SHAPE[2] * SHAPE[3]] * SHAPE[1]


@pytest.mark.parametrize("granularity", ["tensor", "head", "channel"])
@pytest.mark.parametrize("exact", [True, False], ids=["pow2-scales", "awkward-scales"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_e4m3_is_bit_exact_with_compressed_tensors(granularity: str, exact: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    scale = scales_for("fp8", granularity, exact, gen)
    x = (quotients("fp8", gen) * broadcastable(scale)).to(dtype)
    want = ct_fake_quantize(x, broadcastable(scale), None, ct_args("fp8", True, granularity))
    got = fake_quantize(x, scale, None, "fp8_e4m3")
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    y = x.to(torch.float32) / broadcastable(scale)
    assert int((y.abs() > 448).sum()) > 0 and int((y.abs() < 0.01).sum()) > 0  # the range is exercised
    # Clipped by hand: e4m3's largest value is 448 = 1.75 * 2**8 and the next step of its grid would be
    # 480; |y| above their midpoint 464 rounds past 448 (464 itself goes to the even 448).
    assert_error_matches(x, want, y.abs() > 464, roundtrip_error(x, scale, None, "fp8_e4m3"))


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["tensor", "head", "channel"])
def test_int_symmetric_with_a_given_scale_is_bit_exact(kind: str, granularity: str) -> None:
    gen = torch.Generator().manual_seed(12)
    for exact in (True, False):
        scale = scales_for(kind, granularity, exact, gen)
        x = quotients(kind, gen) * broadcastable(scale)
        zero = torch.zeros_like(broadcastable(scale), dtype=torch.int8)
        want = ct_fake_quantize(x, broadcastable(scale), zero, ct_args(kind, True, granularity))
        got = fake_quantize(x, scale, None, kind)
        assert torch.equal(got, want)
        lo, hi = INT_LIMITS[kind]
        r = torch.round(x / broadcastable(scale))
        assert_error_matches(x, want, (r < lo) | (r > hi), roundtrip_error(x, scale, None, kind))


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["tensor", "head", "channel"])
def test_int_asymmetric_agrees_except_where_the_zero_point_is_added_before_rounding(
    kind: str, granularity: str
) -> None:
    gen = torch.Generator().manual_seed(13)
    lo, hi = INT_LIMITS[kind]
    differ_total = 0
    for exact in (True, False):
        scale = scales_for(kind, granularity, exact, gen)
        zp = torch.randint(lo // 2, hi // 2 + 1, qparam_shape(granularity), generator=gen, dtype=torch.int32)
        flat = zp.view(-1)  # () / (h,) / (h, d) -> (n,), a view
        flat[0] |= 1  # an odd zero point, where ties disagree
        flat[-1] &= ~1 if flat.numel() > 1 else -1  # and an even one, where they agree
        s4, z4 = broadcastable(scale), broadcastable(zp)
        x = quotients(kind, gen) * s4
        want = ct_fake_quantize(x, s4, z4.to(torch.int8), ct_args(kind, False, granularity))
        got = fake_quantize(x, scale, zp, kind)
        y = x / s4  # float32, as both compute it
        shifted = y + z4.to(torch.float32)  # compressed-tensors' float32 add
        agree = (shifted - torch.floor(shifted)) != 0.5
        assert torch.equal(got[agree], want[agree])
        # codes apart: x_hat / scale is (q - zero_point) up to a float32 rounding, so round() recovers it
        apart = (torch.round(got / s4) - torch.round(want / s4)).abs()
        assert bool((apart[~agree] <= 1).all())  # at most one code
        odd_tie = ((y - torch.floor(y)) == 0.5) & (z4 % 2 == 1) & (shifted > lo) & (shifted < hi)
        if exact:  # power-of-two scales keep the planted ties, and there the codes differ by one
            assert int(odd_tie.sum()) > 0
            assert bool((apart[odd_tie] == 1).all())
        differ_total += int((got != want).sum())
        # kvq's clip count, by hand from its stated convention: round(x / scale) + zero_point off range
        r = torch.round(y) + z4.to(torch.float32)
        err = roundtrip_error(x, scale, zp, kind)
        assert err.clipped.tolist() == ((r < lo) | (r > hi)).sum(dim=(0, 2, 3)).tolist()
        # on the agreeing elements the error is the oracle's, to the bit
        assert float((x - got).abs()[agree].max()) == float((x - want).abs()[agree].max())
    assert differ_total > 0  # the stated difference is real


@pytest.mark.parametrize("recipe", ["int8-asym-per-head", "int4-asym-per-head"])
def test_asymmetric_qparams_are_bit_exact(recipe: str) -> None:
    spec = load_recipe(recipe).key
    gen = torch.Generator().manual_seed(14)
    min_val = -torch.rand(64, generator=gen) * 3.0
    max_val = torch.rand(64, generator=gen) * 5.0
    min_val[:4] = torch.tensor([0.5, 0.25, -2.0, -1e-3])  # ranges that must be widened to include 0
    max_val[:4] = torch.tensor([2.0, 0.75, -0.5, 1e-3])
    scale, zp = choose_qparams(min_val, max_val, spec)
    ct_scale, ct_zp = calculate_qparams(min_val, max_val, ct_args(spec.format, False, "channel"))
    assert torch.equal(scale, ct_scale)
    assert zp.tolist() == ct_zp.to(torch.int32).tolist()


def test_fp8_qparams_are_bit_exact() -> None:
    spec = load_recipe("fp8-e4m3-per-tensor").key
    gen = torch.Generator().manual_seed(15)
    min_val = -torch.rand(64, generator=gen) * 30.0
    max_val = torch.rand(64, generator=gen) * 50.0
    scale, zp = choose_qparams(min_val, max_val, spec)
    ct_scale, _ = calculate_qparams(min_val, max_val, ct_args("fp8", True, "channel"))
    assert zp is None and torch.equal(scale, ct_scale)  # absmax / 448 in both


def test_int8_symmetric_qparams_differ_by_the_half_step() -> None:
    """kvq: scale = absmax / 127; compressed-tensors: absmax / 127.5 (see the module docstring)."""
    spec = load_recipe("int8-sym-per-head").key
    # 127.5 * 2**k: compressed-tensors' scale is the power of two 2**k, so its quotients are exactly +-127.5
    absmax = 127.5 * torch.tensor([2.0**-8, 2.0**-4, 0.5, 1.0])
    scale, _ = choose_qparams(-absmax, absmax, spec)
    ct_scale, _ = calculate_qparams(-absmax, absmax, ct_args("int8", True, "channel"))
    torch.testing.assert_close(scale * 127.0, absmax, rtol=1e-6, atol=0)
    assert ct_scale.tolist() == [2.0**-8, 2.0**-4, 0.5, 1.0]
    # The calibrated extremes: kvq keeps both inside the range, compressed-tensors clips +absmax by
    # half a step and sends -absmax to code -128.
    ends = torch.stack([-absmax, absmax], dim=-1).reshape(1, 4, 1, 2)  # (h, 2) -> (1, h, 1, 2)
    kvq_hat = fake_quantize(ends, scale, None, "int8")
    torch.testing.assert_close(kvq_hat, ends, rtol=1e-6, atol=0)
    assert int(roundtrip_error(ends, scale, None, "int8").clipped.sum()) == 0
    zero = torch.zeros(1, 4, 1, 1, dtype=torch.int8)
    ct_hat = ct_fake_quantize(ends, ct_scale.reshape(1, 4, 1, 1), zero, ct_args("int8", True, "channel"))
    assert torch.equal(ct_hat[..., 0], -128 * ct_scale.reshape(1, 4, 1))  # -127.5 rounds to the even -128
    assert torch.equal(ct_hat[..., 1], 127 * ct_scale.reshape(1, 4, 1))  # +127.5 clamps to 127
