"""Launchers of the Triton round-trip kernels (:mod:`kvq.kernels.triton_jit`): checks, tiles, lowerings.

:func:`roundtrip_error_triton` makes one pass over ``x`` (batch, kv_heads, tokens, head_dim), any
strides, float32 / bfloat16 / float16, and returns the per-head :class:`RoundTripError`;
:func:`fake_quantize_triton` writes ``dequantize(quantize(x))`` in x's dtype. Both give the numbers of
the torch reference (:mod:`kvq.kernels.reference`; the exactness argument is in
:mod:`kvq.kernels.triton_jit`). The same checks as the reference's refuse bad inputs with a
``ValueError`` before any kernel runs.

Lowerings: on NVIDIA GPUs of compute capability >= 8.9 fp8 rounds with Triton's fp8 casts, elsewhere
with the exact emulation; ``libdevice_rint=True`` rounds with ``libdevice.rint``. Under Triton's
interpreter (``TRITON_INTERPRET=1``) the kernels also accept CPU tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from kvq.kernels.reference import RoundTripError, check_qparams
from kvq.kernels.triton_jit import reduce_partials_kernel, roundtrip_tile_kernel
from kvq.quant.formats import FORMATS

REDUCE_BLOCK = 1024  # partials per step of the per-head reduction


@dataclass(frozen=True)
class Tile:
    """A kernel's launch shape: elements of x per tile (BLOCK_T = elements // BLOCK_D tokens, at least 1),
    warps per program, and tiles per program (consecutive token tiles of one (batch, head))."""

    elements: int
    num_warps: int
    tiles_per_program: int


# Default tiles per number format, one table per kernel. bench/device_check.py's sweep overrides them per call
# (block_t / num_warps / tiles_per_program) and reports the best it found next to these. The error kernel's
# default is a guess from the one H200 sweep (int4 per head: 32 tokens x 128 channels, 4 warps best), with 4
# tiles per program to cut the partials fourfold; unmeasured since its reduction became one tuple reduction.
# Fake-quantize keeps the tile it reached 79-90% of copy bandwidth with (docs/kernels.md).
NUMBER_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4", "nvfp4")
ERROR_TILES: dict[str, Tile] = {fmt: Tile(elements=4096, num_warps=4, tiles_per_program=4) for fmt in NUMBER_FORMATS}
FAKE_QUANT_TILES: dict[str, Tile] = {fmt: Tile(elements=8192, num_warps=8, tiles_per_program=1) for fmt in NUMBER_FORMATS}


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


FP8_KINDS: dict[str, int] = {"fp8_e4m3": 0, "fp8_e5m2": 1, "fp8_e4m3fnuz": 2}  # the kernels' FP8_KIND


def _format_constants(number_format: str) -> dict[str, float | bool]:
    """The number format's constexpr arguments of the kernels."""
    if number_format == "nvfp4":
        return {"QMIN": -6.0, "QMAX": 6.0, "CLIP_AT": 7.0, "CLIP_INCLUSIVE": True, "IS_FP8": False, "FP8_KIND": -1,
                "IS_NVFP4": True}
    record = FORMATS[number_format]
    if record.overflow is not None:
        clip_at, inclusive = record.overflow
        return {
            "QMIN": record.qmin, "QMAX": record.qmax, "CLIP_AT": clip_at, "CLIP_INCLUSIVE": inclusive,
            "IS_FP8": True, "FP8_KIND": FP8_KINDS[number_format], "IS_NVFP4": False,
        }  # fmt: skip
    return {
        "QMIN": record.qmin, "QMAX": record.qmax, "CLIP_AT": 0.0, "CLIP_INCLUSIVE": False,
        "IS_FP8": False, "FP8_KIND": -1, "IS_NVFP4": False,
    }  # fmt: skip


def _power_of_two(name: str, value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def _blocks(
    tokens: int, head_dim: int, tile: Tile, block_t: int | None, num_warps: int | None, tiles_per_program: int | None
) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps, TILES_PER_PROGRAM): the format's ``tile`` where not told, no more tokens
    per tile, nor tiles per program, than ``tokens`` needs (so short inputs compile few variants)."""
    block_d = triton.next_power_of_2(head_dim)
    if block_t is None:
        block_t = max(1, tile.elements // block_d)
        block_t = min(block_t, triton.next_power_of_2(max(tokens, 1)))
    _power_of_two("block_t", block_t)
    num_warps = _power_of_two("num_warps", num_warps or tile.num_warps)
    tiles = _power_of_two("tiles_per_program", tiles_per_program or tile.tiles_per_program)
    tiles = min(tiles, triton.next_power_of_2(triton.cdiv(max(tokens, 1), block_t)))
    return block_t, block_d, num_warps, tiles


@dataclass
class _Launch:
    """What both tile kernels take: qparams on x's device, grid and the constexpr/launch keywords."""

    scale: torch.Tensor  # float32, contiguous, shape of the granularity
    zero_point: torch.Tensor  # int32 (or the scale again when there is none: never read, HAS_ZP=False)
    scale_strides: tuple[int, int]  # (head, channel) strides into scale / zero_point
    token_blocks: int  # programs per (batch, head), each TILES_PER_PROGRAM tiles of BLOCK_T tokens
    programs: int
    meta: dict[str, object]  # constexprs, num_warps, enable_fp_fusion


def _prepare(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    number_format: str,
    tile: Tile,
    overrides: tuple[int | None, int | None, int | None],
    native_fp8: bool | None,
    libdevice_rint: bool,
) -> _Launch:
    """Check the inputs and the device, then lay out the launch of a tile kernel over ``x``."""
    if not (x.is_cuda or interpreting()):
        raise ValueError(
            f"the Triton round-trip kernel needs a CUDA tensor, got one on {x.device}: "
            "use kvq.kernels.roundtrip_error (it falls back to the torch reference)"
        )
    check_qparams(x, scale, zero_point, number_format)
    batch, heads, tokens, head_dim = x.shape
    if number_format == "nvfp4" and (head_dim % 16 or scale.dim()):
        raise ValueError(f"nvfp4 needs one global scale and a head_dim that is a multiple of 16 (blocks of 16), "
                         f"got scale shape {tuple(scale.shape)} and head_dim {head_dim}")
    s = scale.to(device=x.device, dtype=torch.float32).contiguous()
    z = s if zero_point is None else zero_point.to(device=x.device, dtype=torch.int32).contiguous()
    # per tensor: one value for every (head, channel); per head; per channel, (heads, head_dim) row-major
    strides = {0: (0, 0), 1: (1, 0), 2: (head_dim, 1)}[s.dim()]
    block_t, block_d, warps, tiles = _blocks(tokens, head_dim, tile, *overrides)
    rint, fp8 = _lowering(x, native_fp8, libdevice_rint)
    token_blocks = triton.cdiv(tokens, block_t * tiles)
    meta = {
        **_format_constants(number_format), "HAS_ZP": zero_point is not None, "LIBDEVICE_RINT": rint,
        "NATIVE_FP8": fp8, "CONTIG_D": x.stride(3) == 1, "BLOCK_T": block_t, "BLOCK_D": block_d,
        "TILES_PER_PROGRAM": tiles, "num_warps": warps, "enable_fp_fusion": False,
    }  # fmt: skip
    return _Launch(s, z, strides, token_blocks, token_blocks * batch * heads, meta)


def _tuple_reduce(asked: bool | None) -> int:
    """The kernel's TUPLE_REDUCE: 1 (one tuple reduction per tile), 2 (the same, under the interpreter), or
    0 (four reductions; the default under the interpreter, where tl.reduce runs per element in Python)."""
    if not interpreting():
        return 0 if asked is False else 1
    return 2 if asked else 0


def roundtrip_error_triton(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str, *,
    block_t: int | None = None, num_warps: int | None = None, tiles_per_program: int | None = None,
    native_fp8: bool | None = None, libdevice_rint: bool = False, tuple_reduce: bool | None = None,
) -> RoundTripError:  # fmt: skip
    """Per-head round-trip error of ``x`` (CUDA) in one fused pass; same result as the torch reference.

    ``block_t`` / ``num_warps`` / ``tiles_per_program`` override the format's tile in ERROR_TILES (tokens per
    tile, warps per program, tiles per program: powers of two). ``native_fp8`` picks Triton's fp8 cast (True) or its emulation (False); None uses the
    cast where the device has it. ``libdevice_rint`` rounds with ``libdevice.rint`` instead of the
    float add. ``tuple_reduce`` reduces each tile with one tuple reduction (None: except under the
    interpreter, where it is slow) instead of four. All choices give the same numbers; they exist to test and
    time each lowering.
    """
    tile = ERROR_TILES.get(number_format, ERROR_TILES["int8"])
    overrides = (block_t, num_warps, tiles_per_program)
    launch = _prepare(x, scale, zero_point, number_format, tile, overrides, native_fp8, libdevice_rint)
    batch, heads, tokens, head_dim = x.shape
    count = batch * tokens * head_dim
    if count == 0:
        return RoundTripError.zeros(heads, device=x.device)
    programs = launch.programs
    per_head = programs // heads
    part_f = torch.empty((3, programs), dtype=torch.float32, device=x.device)
    part_clip = torch.empty((programs,), dtype=torch.int32, device=x.device)
    roundtrip_tile_kernel[(programs,)](
        x, launch.scale, launch.zero_point, x, part_f, part_clip,  # x: placeholder for out
        launch.token_blocks, heads, tokens, head_dim, programs, per_head,
        *x.stride(), *launch.scale_strides, 0, 0, 0,
        **launch.meta, FAKE_QUANT=False, EMULATE_BF16_STORE=False,
        TUPLE_REDUCE=_tuple_reduce(tuple_reduce),
    )  # fmt: skip
    out = RoundTripError.zeros(heads, device=x.device)
    reduce_partials_kernel[(heads,)](
        part_f, part_clip, out.sse, out.signal, out.max_abs_err, out.clipped, out.count,
        programs, per_head, count,
        BLOCK_P=min(REDUCE_BLOCK, triton.next_power_of_2(per_head)), num_warps=4,
    )  # fmt: skip
    return out


def fake_quantize_triton(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str, *,
    block_t: int | None = None, num_warps: int | None = None, tiles_per_program: int | None = None,
    native_fp8: bool | None = None, libdevice_rint: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``dequantize(quantize(x))`` in x's dtype (a new contiguous tensor); bit-exact with ``qdq_static``.
    The keywords are those of :func:`roundtrip_error_triton`; the default tiles are FAKE_QUANT_TILES'."""
    tile = FAKE_QUANT_TILES.get(number_format, FAKE_QUANT_TILES["int8"])
    overrides = (block_t, num_warps, tiles_per_program)
    launch = _prepare(x, scale, zero_point, number_format, tile, overrides, native_fp8, libdevice_rint)
    _, heads, tokens, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    roundtrip_tile_kernel[(launch.programs,)](
        x, launch.scale, launch.zero_point, out, x, x,  # x: placeholders for the partials
        launch.token_blocks, heads, tokens, head_dim, 0, 0,
        *x.stride(), *launch.scale_strides, *out.stride()[:3],
        **launch.meta, FAKE_QUANT=True, EMULATE_BF16_STORE=interpreting() and x.dtype == torch.bfloat16,
        TUPLE_REDUCE=0,  # no reduction: one compiled variant
    )  # fmt: skip
    return out
