"""Throughput of the fused Triton kernels (round-trip error, fake-quantize) against the torch reference.

    python bench/kernels.py                          # batch 8, 8 KV heads, 4096 tokens, head_dim 128, bf16
    python bench/kernels.py --formats int4 --granularities channel --asymmetric
    python bench/kernels.py --sweep                  # also try other tiles (tokens per program, warps)

GB/s counts the bytes the kernel must move: x read once for the error kernel; x read and the result
written for fake-quantize. Two timings on a GPU (triton.testing): "call" is one Python call as kvq makes
it (do_bench: launches, allocations and the per-head reduction included); "GPU" replays the same call in a
CUDA graph (do_bench_cudagraph), the time the GPU itself spends, launch overhead excluded. The bandwidth
reference is the GPU's measured copy bandwidth (a 1 GiB device-to-device copy, bytes read + written), not
the datasheet peak. Targets, printed next to the figures: the Triton error kernel's GPU time reaches
>= 80% of copy bandwidth, and its call runs >= 5x faster than the torch reference's. On CPU only the
reference runs (wall clock; the Triton kernels need CUDA).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from kvq.kernels import roundtrip_error_reference, triton_kernels
from kvq.quant.formats import FORMATS

TARGET_FRACTION_OF_COPY = 0.80
TARGET_SPEEDUP = 5.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def copy_bandwidth_gbps() -> float:
    """The GPU's device-to-device copy bandwidth in GB/s (bytes read + written), measured on 1 GiB."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def make_inputs(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    fmt: str,
    granularity: str,
    symmetric: bool,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gaussian K/V-like data with outlier channels, scales at ~4 sigma (a little clipping)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, _, d = shape
    x = torch.randn(shape, generator=gen) * (torch.rand(1, h, 1, d, generator=gen) + 0.5)
    x[..., ::16] *= 4.0
    qshape = {"tensor": (), "head": (h,), "channel": (h, d)}[granularity]
    top = FORMATS[fmt].qmax
    scale = torch.full(qshape, 4.0 / top)
    zp = None if symmetric else torch.zeros(qshape, dtype=torch.int32)
    return x.to(dtype=dtype, device=device), scale.to(device), None if zp is None else zp.to(device)


def time_ms(fn: Callable[[], object], cuda: bool, cpu_reps: int, graph: bool = False) -> float:
    """Median ms of ``fn``: do_bench on a GPU (in a CUDA graph when ``graph``), wall clock on CPU."""
    if cuda:
        import triton.testing

        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))
    fn()
    start = time.perf_counter()
    for _ in range(cpu_reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / cpu_reps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--formats", nargs="+", default=["fp8_e4m3", "fp8_e5m2", "int8", "int4"])
    parser.add_argument("--granularities", nargs="+", default=["tensor", "head", "channel"])
    parser.add_argument("--asymmetric", action="store_true", help="int formats with zero points")
    parser.add_argument(
        "--sweep", action="store_true", help="also time other tiles (tokens per program, warps)"
    )
    parser.add_argument("--cpu-reps", type=int, default=1, help="repetitions of the reference on CPU")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    kernels = triton_kernels() if cuda else None
    device = "cuda" if cuda else "cpu"
    shape = (args.batch, args.kv_heads, args.tokens, args.head_dim)
    dtype = DTYPES[args.dtype]
    nbytes = args.batch * args.kv_heads * args.tokens * args.head_dim * dtype.itemsize
    print(f"x: {shape} {args.dtype}, {nbytes / 1e6:.1f} MB; device: ", end="")
    if not cuda:
        print("CPU (no CUDA): the Triton kernels need CUDA; only the torch reference is timed")
    elif kernels is None:
        print(f"{torch.cuda.get_device_name()}; triton is not installed: only the torch reference is timed")
    copy = None
    if kernels is not None:
        copy = copy_bandwidth_gbps()
        print(f"{torch.cuda.get_device_name()}, measured copy bandwidth {copy:.0f} GB/s (read + write)")
        print(f"targets: error kernel GPU time >= {TARGET_FRACTION_OF_COPY:.0%} of copy bandwidth, "
              f"call >= {TARGET_SPEEDUP:.0f}x the reference")
    header = f"{'format':<9} {'gran':<8} {'sym':<4} {'ref ms':>8} {'ref GB/s':>9}"
    if kernels is not None:
        header += (f" {'call ms':>8} {'GPU ms':>8} {'GB/s':>6} {'% copy':>6} {'speedup':>8}"
                   f" {'fq GPU ms':>9} {'fq GB/s':>7} {'fq %':>5}  targets")
    print(header)
    for fmt in args.formats:
        symmetric = FORMATS[fmt].symmetric_only or not args.asymmetric
        for gran in args.granularities:
            x, scale, zp = make_inputs(shape, dtype, fmt, gran, symmetric, device)
            ref_ms = time_ms(partial(roundtrip_error_reference, x, scale, zp, fmt), cuda, args.cpu_reps)
            line = f"{fmt:<9} {gran:<8} {'y' if symmetric else 'n':<4} {ref_ms:>8.3f} {nbytes / ref_ms / 1e6:>9.2f}"
            if kernels is not None:
                error = partial(kernels.roundtrip_error_triton, x, scale, zp, fmt)
                call_ms, gpu_ms = time_ms(error, True, 0), time_ms(error, True, 0, graph=True)
                fq_ms = time_ms(partial(kernels.fake_quantize_triton, x, scale, zp, fmt), True, 0, graph=True)
                gbps, fq_gbps = nbytes / gpu_ms / 1e6, 2 * nbytes / fq_ms / 1e6
                speedup = ref_ms / call_ms
                ok_bw = "ok" if gbps >= TARGET_FRACTION_OF_COPY * copy else "MISS"
                ok_speed = "ok" if speedup >= TARGET_SPEEDUP else "MISS"
                line += (f" {call_ms:>8.4f} {gpu_ms:>8.4f} {gbps:>6.0f} {gbps / copy:>6.0%} {speedup:>7.1f}x"
                         f" {fq_ms:>9.4f} {fq_gbps:>7.0f} {fq_gbps / copy:>5.0%}  bw {ok_bw}, speedup {ok_speed}")
            print(line)
            if kernels is not None and args.sweep:
                for block_t in (8, 16, 32, 64, 128):
                    for warps in (2, 4, 8, 16):
                        run = partial(kernels.roundtrip_error_triton, x, scale, zp, fmt, block_t=block_t,
                                      num_warps=warps)
                        ms = time_ms(run, True, 0, graph=True)
                        print(f"    block_t {block_t:>3} warps {warps:>2}: GPU {ms:.4f} ms, {nbytes / ms / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
