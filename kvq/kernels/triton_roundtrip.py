"""Triton kernels: the static quantize -> dequantize round trip fused with its error reductions.

One pass over ``x`` (batch, kv_heads, tokens, head_dim), any strides, float32 / bfloat16 / float16:
every program loads a (BLOCK_T tokens x BLOCK_D channels) tile of one (batch, head), quantizes and
dequantizes it in registers with the conventions of :mod:`kvq.qparams` (float32, true division by
the scale, round-half-to-even, saturating clamp) and writes four partial results (sum of squared
error, signal power, max |error|, clipped count). A second, tiny kernel reduces the partials of each
head in float64 (int64 for counts), in a fixed order: results are deterministic.

Exactness with the torch reference (:mod:`kvq.kernels.reference`): codes, dequantized values,
``max_abs_err`` and ``clipped`` are bit-exact; ``sse`` and ``signal`` differ only by summation order
and by the float32 squares (relative ~1e-6). For that:

* floating-point contraction is off (``enable_fp_fusion=False``): ``(q - zp) * s`` and ``x - x_hat``
  are rounded separately, as torch does;
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
rounding (same code, same clipped flag). ``libdevice_rint=True`` uses ``libdevice.rint`` instead.

fp8 rounding uses Triton's fp8 types (``tl.float8e4nv`` = torch.float8_e4m3fn, ``tl.float8e5`` =
torch.float8_e5m2, round-to-nearest-even) after the engines' clamp to +-fmax on NVIDIA GPUs of
compute capability >= 8.9; elsewhere (older GPUs, ROCm, the interpreter) an exact emulation: the step
of the fp8 grid around ``y`` is a power of two read from ``y``'s exponent bits (floored at the
smallest normal exponent, so subnormals share the smallest step) and ``y`` is rounded half-to-even
to a multiple of it.

Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs these kernels, with the fp8
emulation (its fp32 -> fp8 cast does not round to nearest even), without libdevice, and with
round-half-even on the bits for the bfloat16 store of :func:`fake_quantize_triton` (its fp32 -> bf16
cast truncates).

Non-finite inputs (NaN, inf) are outside the contract: the reference and the kernel may differ there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvq.kernels.reference import FP8_OVERFLOW, RoundTripError, check_kv, expand_qparams
from kvq.qparams import FP8_MAX, INT_RANGE

TILE_ELEMENTS = 8192  # elements of x per program (BLOCK_T * BLOCK_D) unless told otherwise
REDUCE_BLOCK = 1024  # partials per step of the per-head reduction


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
    x,
    s,
    r,
    zp,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    CLIP_AT: tl.constexpr,
    CLIP_INCLUSIVE: tl.constexpr,
    IS_FP8: tl.constexpr,
    FP8_E4M3: tl.constexpr,
    HAS_ZP: tl.constexpr,
    LIBDEVICE_RINT: tl.constexpr,
    NATIVE_FP8: tl.constexpr,
):
    """(x_hat, clipped) of float32 ``x`` for scale ``s`` (``r = RN(1 / s)``) and float zero point ``zp``."""
    y = _div_rn(x, s, r)
    if IS_FP8:
        if CLIP_INCLUSIVE:
            clipped = tl.abs(y) >= CLIP_AT
        else:
            clipped = tl.abs(y) > CLIP_AT
        yc = tl.minimum(tl.maximum(y, QMIN), QMAX)
        if NATIVE_FP8:
            if FP8_E4M3:
                q = yc.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
            else:
                q = yc.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.float32)
        else:
            if FP8_E4M3:
                q = _fp8_round_emulated(yc, 3, -6, LIBDEVICE_RINT)
            else:
                q = _fp8_round_emulated(yc, 2, -14, LIBDEVICE_RINT)
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
def _load_tile(
    x_ptr, s_ptr, z_ptr, pid, NT, H, T, D,
    sx_b, sx_h, sx_t, sx_d, ss_h, ss_d,
    HAS_ZP: tl.constexpr, CONTIG_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The program's tile of x (float32, 0 outside) and mask, the scale, reciprocal and zero-point rows
    (shape (1, BLOCK_D); 1, 1, 0 outside), and the tile's batch, head and token-block indices."""
    pid_t = pid % NT
    pid_bh = pid // NT
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < T)[:, None] & mask_d[None, :]
    row = b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + offs_t.to(tl.int64) * sx_t
    if CONTIG_D:
        col = offs_d
    else:
        col = offs_d.to(tl.int64) * sx_d
    x = tl.load(x_ptr + row[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    qp = h * ss_h + offs_d * ss_d
    s = tl.load(s_ptr + qp, mask=mask_d, other=1.0)
    r = tl.math.div_rn(tl.full([BLOCK_D], 1.0, tl.float32), s)
    if HAS_ZP:
        zp = tl.load(z_ptr + qp, mask=mask_d, other=0).to(tl.float32)
    else:
        zp = tl.zeros([BLOCK_D], dtype=tl.float32)
    return x, mask, s[None, :], r[None, :], zp[None, :], b, h, pid_t


@triton.jit
def _roundtrip_partials_kernel(
    x_ptr, s_ptr, z_ptr, part_f_ptr, part_clip_ptr,
    NT, H, T, D, P, PER_HEAD,
    sx_b, sx_h, sx_t, sx_d, ss_h, ss_d,
    QMIN: tl.constexpr, QMAX: tl.constexpr, CLIP_AT: tl.constexpr, CLIP_INCLUSIVE: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_E4M3: tl.constexpr, HAS_ZP: tl.constexpr,
    LIBDEVICE_RINT: tl.constexpr, NATIVE_FP8: tl.constexpr, CONTIG_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One tile's partial sse, signal, max |err| (float32 rows 0..2 of part_f) and clipped count."""
    pid = tl.program_id(0)
    x, mask, s, r, zp, b, h, pid_t = _load_tile(
        x_ptr, s_ptr, z_ptr, pid, NT, H, T, D, sx_b, sx_h, sx_t, sx_d, ss_h, ss_d,
        HAS_ZP, CONTIG_D, BLOCK_T, BLOCK_D,
    )  # fmt: skip
    x_hat, clipped = _qdq(
        x, s, r, zp, QMIN, QMAX, CLIP_AT, CLIP_INCLUSIVE, IS_FP8, FP8_E4M3, HAS_ZP,
        LIBDEVICE_RINT, NATIVE_FP8,
    )  # fmt: skip
    # lanes outside x hold 0, which round-trips to 0 unless a zero point lies outside the range
    err = tl.where(mask, x - x_hat, 0.0)
    sse = tl.sum(err * err)
    signal = tl.sum(x * x)
    max_err = tl.max(tl.abs(err))
    n_clip = tl.sum((mask & clipped).to(tl.int32))
    # partials of head h are contiguous: index h * PER_HEAD + b * NT + pid_t, PER_HEAD = B * NT
    idx = h.to(tl.int64) * PER_HEAD + b.to(tl.int64) * NT + pid_t
    tl.store(part_f_ptr + idx, sse)
    tl.store(part_f_ptr + P + idx, signal)
    tl.store(part_f_ptr + 2 * P + idx, max_err)
    tl.store(part_clip_ptr + idx, n_clip)


@triton.jit
def _reduce_partials_kernel(
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


@triton.jit
def _fake_quant_kernel(
    x_ptr, s_ptr, z_ptr, out_ptr,
    NT, H, T, D,
    sx_b, sx_h, sx_t, sx_d, ss_h, ss_d, so_b, so_h, so_t,
    QMIN: tl.constexpr, QMAX: tl.constexpr, CLIP_AT: tl.constexpr, CLIP_INCLUSIVE: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_E4M3: tl.constexpr, HAS_ZP: tl.constexpr,
    LIBDEVICE_RINT: tl.constexpr, NATIVE_FP8: tl.constexpr, CONTIG_D: tl.constexpr,
    EMULATE_BF16_STORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out = dequantize(quantize(x)) cast to out's dtype; out is contiguous along head_dim."""
    pid = tl.program_id(0)
    x, mask, s, r, zp, b, h, pid_t = _load_tile(
        x_ptr, s_ptr, z_ptr, pid, NT, H, T, D, sx_b, sx_h, sx_t, sx_d, ss_h, ss_d,
        HAS_ZP, CONTIG_D, BLOCK_T, BLOCK_D,
    )  # fmt: skip
    x_hat, _ = _qdq(
        x, s, r, zp, QMIN, QMAX, CLIP_AT, CLIP_INCLUSIVE, IS_FP8, FP8_E4M3, HAS_ZP,
        LIBDEVICE_RINT, NATIVE_FP8,
    )  # fmt: skip
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    out_row = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + offs_t.to(tl.int64) * so_t
    out_ptrs = out_ptr + out_row[:, None] + tl.arange(0, BLOCK_D)[None, :]
    if EMULATE_BF16_STORE:
        x_hat = _round_to_bf16_emulated(x_hat)
    tl.store(out_ptrs, x_hat.to(out_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older versions read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def native_fp8_supported(device: torch.device) -> bool:
    """Whether Triton's fp8 casts (float8e4nv, float8e5) compile on ``device``: NVIDIA, sm >= 8.9."""
    if interpreting() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _lowering(x: torch.Tensor, native_fp8: bool | None, libdevice_rint: bool) -> tuple[bool, bool]:
    """(LIBDEVICE_RINT, NATIVE_FP8) after checking that the device can run them."""
    if libdevice_rint and interpreting():
        raise ValueError("libdevice_rint=True cannot run under TRITON_INTERPRET=1 (no libdevice there)")
    supported = native_fp8_supported(x.device)
    if native_fp8 is None:
        native_fp8 = supported
    elif native_fp8 and not supported:
        raise ValueError(
            f"Triton's fp8 casts need an NVIDIA GPU of compute capability >= 8.9, not {x.device}"
        )
    return libdevice_rint, native_fp8


def _check_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or interpreting()):
        raise ValueError(
            f"the Triton round-trip kernel needs a CUDA tensor, got one on {x.device}: "
            "use kvq.kernels.roundtrip_error (it falls back to the torch reference)"
        )


def _kernel_qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """Scale (float32) and zero point (int32) on x's device, contiguous, with their (head, channel) strides."""
    check_kv(x, fmt)
    _, heads, _, head_dim = x.shape
    expand_qparams(scale, heads, head_dim)  # validates the shape
    if not scale.is_floating_point():
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    if fmt in FP8_MAX and zero_point is not None:
        raise ValueError(f"format {fmt} is symmetric: pass zero_point=None")
    s = scale.to(device=x.device, dtype=torch.float32).contiguous()
    z = None
    if zero_point is not None:
        if zero_point.shape != scale.shape:
            raise ValueError(
                f"zero_point shape {tuple(zero_point.shape)} differs from scale shape {tuple(scale.shape)}"
            )
        if zero_point.is_floating_point():
            raise ValueError(f"zero_point must be an integer tensor (int32), got {zero_point.dtype}")
        z = zero_point.to(device=x.device, dtype=torch.int32).contiguous()
    if s.dim() == 0:
        return s, z, 0, 0  # per tensor: one value for every (head, channel)
    if s.dim() == 1:
        return s, z, 1, 0  # per head
    return s, z, head_dim, 1  # per channel, (heads, head_dim) row-major


def _format_constants(fmt: str) -> dict[str, float | bool]:
    """The format's constexpr arguments of the kernels."""
    if fmt in FP8_MAX:
        clip_at, inclusive = FP8_OVERFLOW[fmt]
        return {
            "QMIN": -FP8_MAX[fmt], "QMAX": FP8_MAX[fmt], "CLIP_AT": clip_at, "CLIP_INCLUSIVE": inclusive,
            "IS_FP8": True, "FP8_E4M3": fmt == "fp8_e4m3",
        }  # fmt: skip
    qmin, qmax = INT_RANGE[fmt]
    return {
        "QMIN": float(qmin), "QMAX": float(qmax), "CLIP_AT": 0.0, "CLIP_INCLUSIVE": False,
        "IS_FP8": False, "FP8_E4M3": False,
    }  # fmt: skip


def _blocks(tokens: int, head_dim: int, block_t: int | None, num_warps: int | None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): TILE_ELEMENTS per program unless told, no more tokens than needed."""
    block_d = triton.next_power_of_2(head_dim)
    if block_t is None:
        block_t = max(1, TILE_ELEMENTS // block_d)
        block_t = min(block_t, triton.next_power_of_2(max(tokens, 1)))
    elif block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    if num_warps is None:
        num_warps = 8 if block_t * block_d >= 8192 else 4
    return block_t, block_d, num_warps


def roundtrip_error_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: str,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    native_fp8: bool | None = None,
    libdevice_rint: bool = False,
) -> RoundTripError:
    """Per-head round-trip error of ``x`` (CUDA) in one fused pass; same result as the torch reference.

    ``block_t`` / ``num_warps`` override the tile (tokens per program, a power of two) and the warps
    per program. ``native_fp8`` picks Triton's fp8 cast (True) or its emulation (False); None uses the
    cast where the device has it. ``libdevice_rint`` rounds with ``libdevice.rint`` instead of the
    float add. All choices give the same numbers; they exist to test and time each lowering.
    """
    _check_device(x)
    s, z, ss_h, ss_d = _kernel_qparams(x, scale, zero_point, fmt)
    batch, heads, tokens, head_dim = x.shape
    count = batch * tokens * head_dim
    if count == 0:
        return RoundTripError.zeros(heads, device=x.device)
    block_t, block_d, warps = _blocks(tokens, head_dim, block_t, num_warps)
    rint, fp8 = _lowering(x, native_fp8, libdevice_rint)
    n_t = triton.cdiv(tokens, block_t)
    programs = n_t * batch * heads
    per_head = programs // heads
    part_f = torch.empty((3, programs), dtype=torch.float32, device=x.device)
    part_clip = torch.empty((programs,), dtype=torch.int32, device=x.device)
    _roundtrip_partials_kernel[(programs,)](
        x, s, s if z is None else z, part_f, part_clip,
        n_t, heads, tokens, head_dim, programs, per_head,
        *x.stride(), ss_h, ss_d,
        **_format_constants(fmt), HAS_ZP=z is not None, LIBDEVICE_RINT=rint, NATIVE_FP8=fp8,
        CONTIG_D=x.stride(3) == 1, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    out = RoundTripError.zeros(heads, device=x.device)
    _reduce_partials_kernel[(heads,)](
        part_f, part_clip, out.sse, out.signal, out.max_abs_err, out.clipped, out.count,
        programs, per_head, count,
        BLOCK_P=min(REDUCE_BLOCK, triton.next_power_of_2(per_head)), num_warps=4,
    )  # fmt: skip
    return out


def fake_quantize_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: str,
    *,
    native_fp8: bool | None = None,
    libdevice_rint: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in x's dtype (a new contiguous tensor); bit-exact with ``qdq_static``."""
    _check_device(x)
    s, z, ss_h, ss_d = _kernel_qparams(x, scale, zero_point, fmt)
    batch, heads, tokens, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_t, block_d, warps = _blocks(tokens, head_dim, None, None)
    rint, fp8 = _lowering(x, native_fp8, libdevice_rint)
    n_t = triton.cdiv(tokens, block_t)
    _fake_quant_kernel[(n_t * batch * heads,)](
        x, s, s if z is None else z, out,
        n_t, heads, tokens, head_dim,
        *x.stride(), ss_h, ss_d, *out.stride()[:3],
        **_format_constants(fmt), HAS_ZP=z is not None, LIBDEVICE_RINT=rint, NATIVE_FP8=fp8,
        CONTIG_D=x.stride(3) == 1, EMULATE_BF16_STORE=interpreting() and x.dtype == torch.bfloat16,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out
