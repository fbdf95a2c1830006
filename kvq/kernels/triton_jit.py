"""The ``@triton.jit`` device code of the fused round trip (launched by :mod:`kvq.kernels.triton_roundtrip`).

Every program of :func:`roundtrip_tile_kernel` loads TILES_PER_PROGRAM consecutive (BLOCK_T tokens x
BLOCK_D channels) tiles of one (batch, head) of ``x``, one after the other, quantizes and dequantizes each in
registers with the conventions of :mod:`kvq.quant.qparams` (float32, true division by the scale,
round-half-to-even, saturating clamp), then either stores ``x_hat`` (``FAKE_QUANT``) or reduces the tile
with ONE tuple reduction (``tl.reduce`` over (err², x², |err|, clipped) with :func:`_combine_partials`: one
cross-warp exchange instead of four) and accumulates over its tiles; it stores four partials once (sum of
squared error, signal power, max |error|, clipped count). A second, tiny kernel reduces the partials of each
head in float64 (int64 for counts), in a fixed order: results are deterministic.

Exactness with the torch reference (:mod:`kvq.kernels.reference`): codes, dequantized values,
``max_abs_err`` and ``clipped`` are bit-exact; ``sse`` and ``signal`` differ only by summation order
and by the float32 squares (relative ~1e-6). For that:

* floating-point contraction is off (the launcher passes ``enable_fp_fusion=False``):
  ``(q - zp) * s`` and ``x - x_hat`` are rounded separately, as torch does;
* ``x / s`` is the correctly rounded quotient, computed without a per-element division: with
  ``r = RN(1 / s)`` (one ``div_rn`` per channel) and ``q0 = x * r``, two Markstein corrections
  ``q <- fma(fma(-q, s, x), r, q)`` give ``RN(x / s)``: the first makes the quotient faithful, the
  second (Markstein's theorem: faithful quotient, correctly rounded reciprocal, exact remainder by
  fma) rounds it correctly. It holds while no intermediate is subnormal or overflows: for
  ``|x / s| < 2**127`` and scales above ~2**-80 (calibrated scales are >= 2**-23); a subnormal
  quotient may differ in its last bit, which rounds to the same code in every format.
  (Triton's ``/`` is an approximate division on NVIDIA; ``div_rn`` per element costs ~3x more.)

Rounding to integers is ``(y + 1.5 * 2**23) - 1.5 * 2**23``: for ``|y| <= 2**22`` the sum's ulp is 1,
so the add rounds ``y`` half-to-even, exactly as ``torch.round``; larger ``|y|`` give a value of the
same sign and magnitude > 2**22 - 2, which the clamp saturates just as it saturates the exact
rounding (same code, same clipped flag). ``LIBDEVICE_RINT`` uses ``libdevice.rint`` instead.

fp8 rounding uses Triton's fp8 types (``tl.float8e4nv`` = torch.float8_e4m3fn, ``tl.float8e5`` =
torch.float8_e5m2, round-to-nearest-even) after the engines' clamp to +-fmax when ``NATIVE_FP8``
(NVIDIA GPUs of compute capability >= 8.9); otherwise (older GPUs, ROCm, the interpreter, and always
for e4m3fnuz, ``FP8_KIND`` 2, AMD's format with exponent bias 8 and largest value 240) an exact
emulation: the step of the fp8 grid around ``y`` is a power of two read from ``y``'s exponent bits
(floored at the smallest normal exponent, so subnormals share the smallest step) and ``y`` is
rounded half-to-even to a multiple of it. Hand-written because no Triton or torch op rounds to fp8
on every target (the interpreter's fp32 -> fp8 cast does not round to nearest even).

Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs these kernels with the fp8
emulation, without libdevice, and with round-half-even on the bits for the bfloat16 store of the
fake-quantized tile (``EMULATE_BF16_STORE``: its fp32 -> bf16 cast truncates).

Non-finite inputs (NaN, inf) are outside the contract: the reference and the kernel may differ there.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _round_half_even(y, LIBDEVICE_RINT: tl.constexpr):
    """Round float32 ``y`` to the nearest integer, ties to even (= torch.round for |y| <= 2**22)."""
    if LIBDEVICE_RINT:
        r = libdevice.rint(y)
    else:
        r = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23
    return r


@triton.jit
def _div_rn(x, s, r):
    """Correctly rounded ``x / s`` given ``r = RN(1 / s)``: two Markstein corrections of ``x * r``."""
    q = x * r
    q = tl.fma(tl.fma(-q, s, x), r, q)  # faithful
    q = tl.fma(tl.fma(-q, s, x), r, q)  # correctly rounded
    return q


@triton.jit
def _fp8_round_emulated(y, MANT_BITS: tl.constexpr, EMIN: tl.constexpr, LIBDEVICE_RINT: tl.constexpr):
    """The fp8 value nearest to float32 ``y`` (ties to even), as float32; |y| is already <= fmax."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # unbiased exponent of y
    step_exp = tl.maximum(e, EMIN) - MANT_BITS  # the grid's step is 2**step_exp
    step = ((step_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - step_exp) << 23).to(tl.float32, bitcast=True)
    # y * inv_step is exact and below 2**(MANT_BITS + 1) in magnitude; so is the product by step
    return _round_half_even(y * inv_step, LIBDEVICE_RINT) * step


@triton.jit
def _round_to_bf16_emulated(v):
    """float32 ``v`` rounded half-to-even to bfloat16 precision (still float32; finite values)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000: keep the top 16 bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _qdq(
    x, s, r, zp,
    QMIN: tl.constexpr, QMAX: tl.constexpr, CLIP_AT: tl.constexpr, CLIP_INCLUSIVE: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_KIND: tl.constexpr, HAS_ZP: tl.constexpr,
    LIBDEVICE_RINT: tl.constexpr, NATIVE_FP8: tl.constexpr,
):  # fmt: skip
    """(x_hat, clipped) of float32 ``x`` for scale ``s`` (``r = RN(1 / s)``) and float zero point ``zp``."""
    y = _div_rn(x, s, r)
    if IS_FP8:
        if CLIP_INCLUSIVE:
            clipped = tl.abs(y) >= CLIP_AT
        else:
            clipped = tl.abs(y) > CLIP_AT
        yc = tl.minimum(tl.maximum(y, QMIN), QMAX)
        if NATIVE_FP8 and FP8_KIND == 0:
            q = yc.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
        elif NATIVE_FP8 and FP8_KIND == 1:
            q = yc.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.float32)
        elif FP8_KIND == 0:  # e4m3fn: smallest normal 2**-6
            q = _fp8_round_emulated(yc, 3, -6, LIBDEVICE_RINT)
        elif FP8_KIND == 1:  # e5m2: 2**-14
            q = _fp8_round_emulated(yc, 2, -14, LIBDEVICE_RINT)
        else:  # e4m3fnuz (exponent bias 8): 2**-7, always emulated
            q = _fp8_round_emulated(yc, 3, -7, LIBDEVICE_RINT)
        x_hat = q * s
    else:
        k = _round_half_even(y, LIBDEVICE_RINT)
        if HAS_ZP:
            k = k + zp
        q = tl.minimum(tl.maximum(k, QMIN), QMAX)
        clipped = q != k
        if HAS_ZP:
            x_hat = (q - zp) * s
        else:
            x_hat = q * s
    return x_hat, clipped


@triton.jit
def _qdq_nvfp4(x, g, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, LIBDEVICE_RINT: tl.constexpr):
    """(x_hat, clipped) of a float32 (BLOCK_T, BLOCK_D) tile in NVFP4 with global scale ``g`` (1, BLOCK_D rows of
    the same value): per 16 channels an e4m3 block scale ``RN(amax / (6 g))`` saturated at 448, values rounded to
    e2m1 (ties to even) and saturated at 6, as kvq.quant.nvfp4 does. Lanes past head_dim hold 0 and form whole blocks."""
    NB: tl.constexpr = BLOCK_D // 16
    amax = tl.max(tl.reshape(tl.abs(x), (BLOCK_T, NB, 16)), axis=2)  # (BLOCK_T, NB)
    amax = tl.reshape(tl.broadcast_to(amax[:, :, None], (BLOCK_T, NB, 16)), (BLOCK_T, BLOCK_D))
    six_g = 6.0 * g
    sb = tl.minimum(tl.math.div_rn(amax, six_g), 448.0)
    sb = _fp8_round_emulated(sb, 3, -6, LIBDEVICE_RINT)  # e4m3 (|sb| <= 448: no clamp needed)
    denom = sb * g
    has = denom > 0
    y = tl.where(has, tl.math.div_rn(x, tl.where(has, denom, 1.0)), 0.0)
    a = tl.abs(y)
    q = tl.where(a < 2.0, _round_half_even(a * 2.0, LIBDEVICE_RINT) / 2.0,
                 tl.where(a < 4.0, _round_half_even(a, LIBDEVICE_RINT), _round_half_even(a / 2.0, LIBDEVICE_RINT) * 2.0))
    q = tl.minimum(q, 6.0)
    q = tl.where(y < 0, -q, q)
    x_hat = (q * sb) * g
    clipped = (tl.abs(x) >= 7.0 * denom) & has
    return x_hat, clipped


@triton.jit
def _combine_partials(sse_a, signal_a, max_a, clip_a, sse_b, signal_b, max_b, clip_b):
    """The combine function of the tile's one tuple reduction: sums, max, and the clipped count."""
    return sse_a + sse_b, signal_a + signal_b, tl.maximum(max_a, max_b), clip_a + clip_b


@triton.jit
def roundtrip_tile_kernel(
    x_ptr, s_ptr, z_ptr, out_ptr, part_f_ptr, part_clip_ptr,
    NP, H, T, D, P, PER_HEAD,
    sx_b, sx_h, sx_t, sx_d, ss_h, ss_d, so_b, so_h, so_t,
    QMIN: tl.constexpr, QMAX: tl.constexpr, CLIP_AT: tl.constexpr, CLIP_INCLUSIVE: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_KIND: tl.constexpr, HAS_ZP: tl.constexpr,
    LIBDEVICE_RINT: tl.constexpr, NATIVE_FP8: tl.constexpr, CONTIG_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    FAKE_QUANT: tl.constexpr, EMULATE_BF16_STORE: tl.constexpr, IS_NVFP4: tl.constexpr,
    TUPLE_REDUCE: tl.constexpr,
):  # fmt: skip
    """The round trip of TILES_PER_PROGRAM consecutive (BLOCK_T, BLOCK_D) tiles of one (batch, head).

    Program ``pid_t`` of a (batch, head) (NP programs each) takes tokens from
    ``pid_t * TILES_PER_PROGRAM * BLOCK_T`` on. FAKE_QUANT: store x_hat into ``out`` (x's dtype, contiguous
    along head_dim; strides so_*). Else: one tuple reduction per tile gives its sse, signal, max |err| and
    clipped count, accumulated over the program's tiles; the program stores them once (float32 rows 0..2 of
    part_f, P columns; the count in part_clip). TUPLE_REDUCE: 1 that tuple reduction (compiled), 2 the same
    on a tile flattened first (under the interpreter), 0 four reductions instead (the launcher's default under
    the interpreter, whose tl.reduce calls the combine function once per element in Python); all give the
    same results. Unused pointers and sizes are placeholders the compiled branch
    never reads.
    """
    pid = tl.program_id(0)
    pid_t = pid % NP
    pid_bh = pid // NP
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if CONTIG_D:
        col = offs_d
    else:
        col = offs_d.to(tl.int64) * sx_d
    # scale, reciprocal and zero point rows (1, BLOCK_D); 1, 1 and 0 outside head_dim: loaded once per program
    qp = h * ss_h + offs_d * ss_d
    s = tl.load(s_ptr + qp, mask=mask_d, other=1.0)
    r = tl.math.div_rn(tl.full([BLOCK_D], 1.0, tl.float32), s)
    if HAS_ZP:
        zp = tl.load(z_ptr + qp, mask=mask_d, other=0).to(tl.float32)
    else:
        zp = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    out_base = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    acc_sse = 0.0
    acc_signal = 0.0
    acc_max = 0.0
    acc_clip = 0
    for i in range(TILES_PER_PROGRAM):
        offs_t = (pid_t * TILES_PER_PROGRAM + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_d[None, :]
        row = base + offs_t.to(tl.int64) * sx_t
        x = tl.load(x_ptr + row[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if IS_NVFP4:
            x_hat, clipped = _qdq_nvfp4(x, s[None, :], BLOCK_T, BLOCK_D, LIBDEVICE_RINT)
        else:
            x_hat, clipped = _qdq(
                x, s[None, :], r[None, :], zp[None, :], QMIN, QMAX, CLIP_AT, CLIP_INCLUSIVE, IS_FP8, FP8_KIND,
                HAS_ZP, LIBDEVICE_RINT, NATIVE_FP8,
            )  # fmt: skip
        if FAKE_QUANT:
            out_row = out_base + offs_t.to(tl.int64) * so_t
            if EMULATE_BF16_STORE:
                x_hat = _round_to_bf16_emulated(x_hat)
            out_ptrs = out_ptr + out_row[:, None] + offs_d[None, :]
            tl.store(out_ptrs, x_hat.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            # lanes outside x hold 0, which round-trips to 0 unless a zero point lies outside the range
            err = tl.where(mask, x - x_hat, 0.0)
            clip_i = (mask & clipped).to(tl.int32)
            if TUPLE_REDUCE == 1:  # one reduction of the four, over the whole tile
                sse, signal, mx, clip = tl.reduce((err * err, x * x, tl.abs(err), clip_i), None, _combine_partials)
            elif TUPLE_REDUCE == 2:
                # the same under the interpreter, whose tl.reduce(axis=None) flattens only the first input: the
                # tile flattened first, shape (BLOCK_T * BLOCK_D,)
                N: tl.constexpr = BLOCK_T * BLOCK_D
                sse, signal, mx, clip = tl.reduce(
                    (tl.reshape(err * err, (N,)), tl.reshape(x * x, (N,)), tl.reshape(tl.abs(err), (N,)),
                     tl.reshape(clip_i, (N,))), 0, _combine_partials,
                )  # fmt: skip
            else:  # four reductions: the interpreter runs tl.reduce's combine per element in Python (slow)
                sse = tl.sum(err * err)
                signal = tl.sum(x * x)
                mx = tl.max(tl.abs(err))
                clip = tl.sum(clip_i)
            acc_sse += sse
            acc_signal += signal
            acc_max = tl.maximum(acc_max, mx)
            acc_clip += clip
    if not FAKE_QUANT:
        # partials of head h are contiguous: index h * PER_HEAD + b * NP + pid_t, PER_HEAD = B * NP
        idx = h.to(tl.int64) * PER_HEAD + b.to(tl.int64) * NP + pid_t
        tl.store(part_f_ptr + idx, acc_sse)
        tl.store(part_f_ptr + P + idx, acc_signal)
        tl.store(part_f_ptr + 2 * P + idx, acc_max)
        tl.store(part_clip_ptr + idx, acc_clip)


@triton.jit
def reduce_partials_kernel(
    part_f_ptr, part_clip_ptr, sse_ptr, signal_ptr, max_ptr, clip_ptr, count_ptr, P, PER_HEAD, COUNT,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Per head: float64 sums of sse and signal, max of max |err|, int64 sum of clipped; writes count."""
    h = tl.program_id(0)
    base = h.to(tl.int64) * PER_HEAD
    acc_sse = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_signal = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_max = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_P], dtype=tl.int64)
    for start in range(0, PER_HEAD, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        m = offs < PER_HEAD
        acc_sse += tl.load(part_f_ptr + base + offs, mask=m, other=0.0).to(tl.float64)
        acc_signal += tl.load(part_f_ptr + P + base + offs, mask=m, other=0.0).to(tl.float64)
        acc_max = tl.maximum(acc_max, tl.load(part_f_ptr + 2 * P + base + offs, mask=m, other=0.0))
        acc_clip += tl.load(part_clip_ptr + base + offs, mask=m, other=0).to(tl.int64)
    tl.store(sse_ptr + h, tl.sum(acc_sse))
    tl.store(signal_ptr + h, tl.sum(acc_signal))
    tl.store(max_ptr + h, tl.max(acc_max))
    tl.store(clip_ptr + h, tl.sum(acc_clip))
    one = tl.arange(0, 1)
    tl.store(count_ptr + h + one, tl.full([1], COUNT, dtype=tl.int64))
