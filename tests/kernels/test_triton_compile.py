"""The Triton kernels compile for a Hopper GPU (sm_90) here, without one: Triton's own ptxas builds them, so a
compile error shows before a GPU session, not in it. And the error kernel's tuple reduction needs fewer
barriers per tile than four reductions (read from the PTX)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

PTRS = {"x_ptr": "*bf16", "s_ptr": "*fp32", "z_ptr": "*i32", "out_ptr": "*bf16", "part_f_ptr": "*fp32",
        "part_clip_ptr": "*i32"}


def _ptx(fmt: str, fake_quant: bool, tuple_reduce: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvq.kernels.triton_jit import roundtrip_tile_kernel
    from kvq.kernels.triton_roundtrip import _format_constants

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("this triton ships no ptxas")
    names = roundtrip_tile_kernel.arg_names
    const = {**_format_constants(fmt), "HAS_ZP": fmt == "int4", "LIBDEVICE_RINT": False, "NATIVE_FP8": True,
             "CONTIG_D": True, "BLOCK_T": 32, "BLOCK_D": 128, "TILES_PER_PROGRAM": 4, "FAKE_QUANT": fake_quant,
             "EMULATE_BF16_STORE": False, "TUPLE_REDUCE": tuple_reduce}
    signature = {n: PTRS.get(n, "constexpr" if n in const else "i32") for n in names}
    source = ASTSource(roundtrip_tile_kernel, signature, constexprs={(names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    return compiled.asm["ptx"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3", "nvfp4"])
def test_kernels_compile_for_sm90_and_the_tuple_reduction_saves_barriers(fmt):
    tuple_ptx, four_ptx = _ptx(fmt, False, 1), _ptx(fmt, False, 0)
    assert "bar.sync" not in _ptx(fmt, True, 0)  # fake-quantize reduces nothing
    assert ".version" in tuple_ptx
    assert tuple_ptx.count("bar.sync") < four_ptx.count("bar.sync")
