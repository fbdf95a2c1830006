"""The Triton round-trip kernels against the torch reference.

On a CUDA GPU: native lowerings (libdevice rint, Triton's fp8 casts) and the emulated ones, sizes that
do not divide the tiles. On CPU: the same kernels under Triton's interpreter (TRITON_INTERPRET=1, in a
subprocess so that the variable is set before triton is imported), which runs the emulated lowerings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvq.kernels import fake_quantize, roundtrip_error
from kvq.kernels.reference import RoundTripError, qdq_static, roundtrip_error_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of torch ship it

FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp8_e4m3fnuz": 224.0}  # fnuz: the engines' clamp
FP8_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp8_e4m3fnuz": torch.float8_e4m3fnuz}
INT_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
CASES = [
    (fmt, gran, sym)
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4")
    for gran in ("tensor", "head", "channel")
    for sym in ((True,) if fmt in FP8_MAX else (True, False))
] + [("nvfp4", "tensor", True)]


def make_case(
    fmt: str,
    granularity: str,
    symmetric: bool,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x with outliers (so that some values clip), and scales set to ~3 sigma of x."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    x = torch.randn(shape, generator=gen) * (torch.rand(1, h, 1, d, generator=gen) + 0.2)
    x += torch.randn(1, h, 1, d, generator=gen) * 0.3  # channel offsets: asymmetric ranges
    x[..., :: max(1, d // 7)] *= 4.0  # outlier channels
    qshape = {"tensor": (), "head": (h,), "channel": (h, d)}[granularity]
    top = FP8_MAX[fmt] if fmt in FP8_MAX else 2000.0 if fmt == "nvfp4" else INT_RANGE[fmt][1]  # nvfp4: some saturate
    scale = (torch.rand(qshape, generator=gen) * 2.0 + 2.0) / top
    zp = None
    if not symmetric:
        qmin, qmax = INT_RANGE[fmt]
        zp = torch.randint(qmin // 2, qmax // 2 + 1, qshape, generator=gen, dtype=torch.int32)
    return x.to(dtype), scale, zp


def assert_same_error(got: RoundTripError, want: RoundTripError) -> None:
    """Bit-exact counts and max |err|; float64 sums equal up to summation order."""
    assert torch.equal(got.clipped.cpu(), want.clipped.cpu())
    assert torch.equal(got.count.cpu(), want.count.cpu())
    assert torch.equal(got.max_abs_err.cpu(), want.max_abs_err.cpu())
    torch.testing.assert_close(got.sse.cpu(), want.sse.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got.signal.cpu(), want.signal.cpu(), rtol=1e-5, atol=0)
    assert got.sse.dtype == torch.float64 and got.clipped.dtype == torch.int64


def special_values(fmt: str) -> torch.Tensor:
    """Rounding edge cases of y = x / scale with scale 1: grid values, ties, one float32 ulp off ties."""
    if fmt in FP8_MAX:
        codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE[fmt]).to(torch.float32)
        grid = codes[torch.isfinite(codes)].unique()
        mids = (grid[1:] + grid[:-1]) / 2
        top = FP8_MAX[fmt]
        extra = torch.tensor([248.0, 256.0, 464.0, 480.0, 61440.0, 65536.0, 1e9, top * 1.5])
        base = torch.cat([grid, mids, extra, -extra])
    else:
        half = torch.arange(-300, 300, dtype=torch.float32) + 0.5
        base = torch.cat([half, half - 0.5, torch.tensor([2.0**22 + 0.5, 2.0**23 + 1, -(2.0**22) - 0.5])])
    up = torch.nextafter(base, torch.full_like(base, float("inf")))
    down = torch.nextafter(base, torch.full_like(base, -float("inf")))
    return torch.cat([base, up, down])


def nvfp4_edge_values() -> torch.Tensor:
    """(1, 1, n, 16) blocks whose first value 6 makes the block scale exactly 1 (global scale 1): the others are
    e2m1 values, the ties between them and one float32 ulp either side, so y = x exercises every rounding."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    base = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([5.9, 6.0])])
    base = torch.cat([base, torch.nextafter(base, torch.tensor(9.0)), torch.nextafter(base, torch.tensor(-1.0))])
    base = torch.cat([base, -base])
    rows = base[: base.numel() - base.numel() % 15].reshape(-1, 15)
    return torch.cat([torch.full((rows.shape[0], 1), 6.0), rows], dim=1).reshape(1, 1, -1, 16)


def ties_with_scales(fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (1, 2, 64, 16) whose x / scale lies on, or one float32 ulp beside, a rounding tie of the format,
    with per-channel scales of awkward significands (all ones, 1 + ulp, random)."""
    gen = torch.Generator().manual_seed(seed)
    mant = torch.tensor([0x7FFFFF, 0x7FFFFE, 0x000001, 0x000000, 0x400000, 0x3FFFFF, 0x2AAAAB, 0x555555])
    mant = torch.cat([mant, torch.randint(0, 1 << 23, (24,), generator=gen)])
    exps = torch.randint(100, 125, (32,), generator=gen)
    scale = ((exps << 23) | mant).to(torch.int32).view(torch.float32).reshape(2, 16)
    if fmt in FP8_MAX:
        codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE[fmt]).to(torch.float32)
        grid = codes[torch.isfinite(codes)].unique()
        ties = (grid[1:] + grid[:-1]) / 2
    else:
        ties = torch.arange(-140, 140, dtype=torch.float32) + 0.5
    pick = ties[torch.randint(0, len(ties), (1, 2, 64, 16), generator=gen)]
    x = pick * scale.reshape(1, 2, 1, 16)
    step = torch.randint(-1, 2, x.shape, generator=gen)  # -1, 0, +1 ulp
    x = torch.where(step > 0, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
    x = torch.where(step < 0, torch.nextafter(x, torch.full_like(x, -float("inf"))), x)
    return x, scale


def division_operands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerators and divisors over wide exponent ranges, divisors with awkward significands."""
    gen = torch.Generator().manual_seed(seed)
    awkward = torch.tensor([0x7FFFFF, 0x7FFFFE, 0x000001, 0x000000, 0x400000, 0x3FFFFF])
    mant_b = torch.where(
        torch.rand(n, generator=gen) < 0.5,
        awkward[torch.randint(0, 6, (n,), generator=gen)],
        torch.randint(0, 1 << 23, (n,), generator=gen),
    )
    b = ((torch.randint(70, 140, (n,), generator=gen) << 23) | mant_b).to(torch.int32).view(torch.float32)
    sign = torch.randint(0, 2, (n,), generator=gen) << 31
    a_bits = (
        sign
        | (torch.randint(60, 180, (n,), generator=gen) << 23)
        | torch.randint(0, 1 << 23, (n,), generator=gen)
    )
    a = a_bits.to(torch.int64).to(torch.int32).view(torch.float32)
    return a, b


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvq.kernels.triton_jit import _div_rn

    @triton.jit
    def _division_probe_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=1.0)
        b = tl.load(b_ptr + offs, mask=m, other=1.0)
        r = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), b)
        tl.store(out_ptr + offs, _div_rn(a, b, r), mask=m)

    def probe_division(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(a)
        _division_probe_kernel[(triton.cdiv(a.numel(), 1024),)](
            a, b, out, a.numel(), BLOCK=1024, enable_fp_fusion=False
        )
        return out


def assert_division_exact(a: torch.Tensor, b: torch.Tensor, got: torch.Tensor) -> None:
    """Bitwise equal to torch's float32 division wherever the quotient is a normal number."""
    want = a / b
    normal = want.abs() >= torch.finfo(torch.float32).tiny
    bad = normal & (got.view(torch.int32) != want.view(torch.int32))
    assert int(bad.sum()) == 0, f"{int(bad.sum())} quotients differ, e.g. {a[bad][:3]} / {b[bad][:3]}"
    assert int(normal.sum()) > 0.9 * a.numel()


# ---------------------------------------------------------------------------------------------
# CPU: Triton's interpreter, in a subprocess
# ---------------------------------------------------------------------------------------------

INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from kvq.kernels.reference import qdq_static, roundtrip_error_reference
    from kvq.kernels.triton_roundtrip import fake_quantize_triton, interpreting, roundtrip_error_triton
    from tests.kernels.test_triton import (
        CASES, assert_division_exact, assert_same_error, division_operands, make_case, nvfp4_edge_values,
        probe_division, special_values, ties_with_scales,
    )

    assert interpreting()
    failures, cases = [], 0

    def check(name, x, scale, zp, fmt):
        global cases
        cases += 1
        try:
            assert_same_error(roundtrip_error_triton(x, scale, zp, fmt), roundtrip_error_reference(x, scale, zp, fmt))
            got, want = fake_quantize_triton(x, scale, zp, fmt), qdq_static(x, scale, zp, fmt)
            assert got.dtype == x.dtype and got.shape == x.shape
            assert torch.equal(got, want), f"{int((got != want).sum())} fake-quantized values differ"
        except AssertionError as e:
            failures.append(f"{name}: {e}")

    shapes = [(2, 3, 37, 80), (1, 2, 21, 96), (2, 1, 9, 64), (1, 1, 130, 128)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for i, (fmt, gran, sym) in enumerate(CASES):
        shape = shapes[i % len(shapes)]
        for dtype in dtypes:
            x, scale, zp = make_case(fmt, gran, sym, shape, dtype, seed=i)
            check(f"{fmt}/{gran}/sym={sym}/{dtype}/{shape}", x, scale, zp, fmt)
    # a non-contiguous view: (batch, tokens, heads, head_dim) storage seen as (b, h, t, d)
    x, scale, zp = make_case("int8", "channel", False, (2, 3, 17, 80), torch.bfloat16, seed=99)
    check("int8 non-contiguous", x.transpose(1, 2).contiguous().transpose(1, 2), scale, zp, "int8")
    x, scale, _ = make_case("fp8_e4m3", "head", True, (1, 3, 11, 96), torch.float32, seed=98)
    check("fp8 non-contiguous head_dim", x.transpose(2, 3).contiguous().transpose(2, 3), scale, None, "fp8_e4m3")
    # rounding edge cases: every fp8 value, every tie, one ulp on either side; integer ties
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4"):
        v = special_values(fmt)
        n = v.numel() - v.numel() % 16
        x = v[:n].reshape(1, 1, -1, 16)
        check(f"{fmt} edge values", x, torch.tensor(1.0), None, fmt)
        if fmt.startswith("int"):
            check(f"{fmt} edge values, zp", x, torch.tensor(1.0), torch.tensor(-3, dtype=torch.int32), fmt)
    check("nvfp4 edge values", nvfp4_edge_values(), torch.tensor(1.0), None, "nvfp4")
    # exactness of the division near rounding ties, with awkward scales
    for i, fmt in enumerate(("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4")):
        x, scale = ties_with_scales(fmt, seed=i)
        check(f"{fmt} ties with scales", x, scale, None, fmt)
    # several tiles per program, token counts that divide neither the tile nor the program's tiles
    def check_tiles(name, x, scale, zp, fmt, **kw):
        global cases
        cases += 1
        try:
            assert_same_error(roundtrip_error_triton(x, scale, zp, fmt, **kw), roundtrip_error_reference(x, scale, zp, fmt))
            fq = {k: v for k, v in kw.items() if k != "tuple_reduce"}  # fake-quantize reduces nothing
            assert torch.equal(fake_quantize_triton(x, scale, zp, fmt, **fq), qdq_static(x, scale, zp, fmt))
        except AssertionError as e:
            failures.append(f"{name} {kw}: {e}")

    for i, (fmt, gran, sym) in enumerate([("int4", "channel", False), ("fp8_e4m3", "head", True), ("nvfp4", "tensor", True)]):
        x, scale, zp = make_case(fmt, gran, sym, (2, 3, 37, 80 if fmt != "nvfp4" else 64), torch.bfloat16, seed=50 + i)
        for block_t, tiles in ((4, 4), (8, 2), (1, 8), (16, 4)):
            check_tiles(f"{fmt} tiles", x, scale, zp, fmt, block_t=block_t, tiles_per_program=tiles)
    # the tuple reduction (the GPU's default; slow under the interpreter, so on small tiles)
    for i, (fmt, gran, sym) in enumerate([("int8", "head", False), ("fp8_e5m2", "channel", True)]):
        x, scale, zp = make_case(fmt, gran, sym, (1, 2, 7, 16), torch.float32, seed=60 + i)
        check_tiles(f"{fmt} tuple reduce", x, scale, zp, fmt, block_t=2, tiles_per_program=2, tuple_reduce=True)
    # the division itself, bit for bit
    cases += 1
    a, b = division_operands(200_000, seed=0)
    try:
        assert_division_exact(a, b, probe_division(a, b))
    except AssertionError as e:
        failures.append(f"division: {e}")
    print(json.dumps({"cases": cases, "failures": failures}))
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_triton_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["cases"] == len(CASES) * 3 + 2 + 7 + 1 + 5 + 12 + 2 + 1


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = [(2, 8, 1151, 128), (1, 2, 1151, 80), (3, 4, 333, 96), (2, 1, 1151, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize(("fmt", "granularity", "symmetric"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_kernel_matches_reference(
    fmt: str, granularity: str, symmetric: bool, dtype: torch.dtype, shape: tuple[int, int, int, int]
) -> None:
    from kvq.kernels.triton_roundtrip import fake_quantize_triton, roundtrip_error_triton

    x, scale, zp = make_case(
        fmt, granularity, symmetric, shape, dtype, seed=CASES.index((fmt, granularity, symmetric))
    )
    x, scale = x.cuda(), scale.cuda()
    zp = None if zp is None else zp.cuda()
    want = roundtrip_error_reference(x, scale, zp, fmt)
    assert int(want.clipped.sum()) > 0  # the case exercises the clamp
    assert_same_error(roundtrip_error_triton(x, scale, zp, fmt), want)
    assert_same_error(roundtrip_error_triton(x, scale, zp, fmt, native_fp8=False, libdevice_rint=True), want)
    ref = qdq_static(x, scale, zp, fmt)
    assert torch.equal(fake_quantize_triton(x, scale, zp, fmt), ref)
    assert torch.equal(fake_quantize_triton(x, scale, zp, fmt, native_fp8=False, libdevice_rint=True), ref)
    # CPU reference on the same data: the torch CUDA ops give the same codes
    want_cpu = roundtrip_error_reference(x.cpu(), scale.cpu(), None if zp is None else zp.cpu(), fmt)
    assert_same_error(want, want_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4"])
@pytest.mark.parametrize(("native_fp8", "libdevice_rint"), [(None, False), (False, False), (None, True)])
def test_gpu_rounding_edge_values(fmt: str, native_fp8: bool | None, libdevice_rint: bool) -> None:
    from kvq.kernels.triton_roundtrip import fake_quantize_triton, roundtrip_error_triton

    v = special_values(fmt)
    n = v.numel() - v.numel() % 16
    x = v[:n].reshape(1, 1, -1, 16).cuda()
    one = torch.tensor(1.0, device="cuda")
    kw = {"native_fp8": native_fp8, "libdevice_rint": libdevice_rint}
    assert torch.equal(fake_quantize_triton(x, one, None, fmt, **kw), qdq_static(x, one, None, fmt))
    assert_same_error(
        roundtrip_error_triton(x, one, None, fmt, **kw), roundtrip_error_reference(x, one, None, fmt)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4"])
@pytest.mark.parametrize(("native_fp8", "libdevice_rint"), [(None, False), (False, False), (None, True)])
def test_gpu_ties_with_awkward_scales(fmt: str, native_fp8: bool | None, libdevice_rint: bool) -> None:
    from kvq.kernels.triton_roundtrip import fake_quantize_triton, roundtrip_error_triton

    x, scale = ties_with_scales(fmt, seed=1)
    x, scale = x.cuda(), scale.cuda()
    kw = {"native_fp8": native_fp8, "libdevice_rint": libdevice_rint}
    assert torch.equal(fake_quantize_triton(x, scale, None, fmt, **kw), qdq_static(x, scale, None, fmt))
    assert_same_error(
        roundtrip_error_triton(x, scale, None, fmt, **kw), roundtrip_error_reference(x, scale, None, fmt)
    )


@pytest.mark.gpu
@pytest.mark.parametrize(("block_t", "tiles", "warps"), [(1, 8, 1), (8, 2, 2), (16, 4, 4), (32, 4, 4), (64, 1, 8)])
@pytest.mark.parametrize(("fmt", "granularity", "symmetric"), [("int4", "channel", False), ("fp8_e4m3", "head", True), ("nvfp4", "tensor", True)])  # fmt: skip
def test_gpu_tiles_per_program(fmt: str, granularity: str, symmetric: bool, block_t: int, tiles: int, warps: int) -> None:
    """The tiles the sweep tries: token counts that divide neither the tile nor a program's tiles."""
    from kvq.kernels.triton_roundtrip import fake_quantize_triton, roundtrip_error_triton
    x, scale, zp = make_case(fmt, granularity, symmetric, (2, 8, 1151, 128), torch.bfloat16, seed=7)
    x, scale = x.cuda(), scale.cuda()
    zp = None if zp is None else zp.cuda()
    kw = {"block_t": block_t, "tiles_per_program": tiles, "num_warps": warps}
    want = roundtrip_error_reference(x, scale, zp, fmt)
    assert_same_error(roundtrip_error_triton(x, scale, zp, fmt, **kw), want)
    assert_same_error(roundtrip_error_triton(x, scale, zp, fmt, tuple_reduce=False, **kw), want)
    assert torch.equal(fake_quantize_triton(x, scale, zp, fmt, **kw), qdq_static(x, scale, zp, fmt))


@pytest.mark.gpu
def test_gpu_division_is_correctly_rounded() -> None:
    a, b = division_operands(4_000_000, seed=1)
    a, b = a.cuda(), b.cuda()
    assert_division_exact(a, b, probe_division(a, b))


@pytest.mark.gpu
def test_gpu_non_contiguous_input_and_dispatch() -> None:
    from kvq.kernels.triton_roundtrip import roundtrip_error_triton

    x, scale, zp = make_case("int4", "channel", False, (2, 8, 1151, 128), torch.bfloat16, seed=5)
    x = x.cuda().transpose(1, 2).contiguous().transpose(1, 2)  # (b, t, h, d) storage
    scale, zp = scale.cuda(), zp.cuda()
    want = roundtrip_error_reference(x, scale, zp, "int4")
    assert_same_error(roundtrip_error_triton(x, scale, zp, "int4"), want)
    assert_same_error(roundtrip_error(x, scale, zp, "int4"), want)
    assert torch.equal(fake_quantize(x, scale, zp, "int4"), qdq_static(x, scale, zp, "int4"))
    # per-tensor scale on the CPU is moved to the GPU
    assert_same_error(
        roundtrip_error(x, scale.cpu().mean(), None, "int4"),
        roundtrip_error_reference(x, scale.mean(), None, "int4"),
    )


@pytest.mark.gpu
def test_gpu_merge_of_two_batches_matches_one_pass() -> None:
    from kvq.kernels.triton_roundtrip import roundtrip_error_triton

    x, scale, _ = make_case("fp8_e4m3", "head", True, (4, 8, 515, 128), torch.bfloat16, seed=6)
    x, scale = x.cuda(), scale.cuda()
    merged = roundtrip_error_triton(x[:1], scale, None, "fp8_e4m3").merge(
        roundtrip_error_triton(x[1:], scale, None, "fp8_e4m3")
    )
    assert_same_error(merged, roundtrip_error_triton(x, scale, None, "fp8_e4m3"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_entry_point_refuses_cpu_tensors_outside_the_interpreter() -> None:
    from kvq.kernels.triton_roundtrip import interpreting, roundtrip_error_triton

    if interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set in this process")
    with pytest.raises(ValueError, match="CUDA"):
        roundtrip_error_triton(torch.zeros(1, 1, 1, 8), torch.tensor(1.0), None, "int8")
