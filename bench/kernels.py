"""Throughput of the fused round-trip error kernel against the torch reference.

    python bench/kernels.py                          # batch 8, 8 KV heads, 4096 tokens, head_dim 128, bf16
    python bench/kernels.py --formats int4 --granularities channel --asymmetric
    python bench/kernels.py --sweep                  # also try other tiles (tokens per program, warps)
    python bench/kernels.py --peak-gbps 3350         # override the GPU's peak memory bandwidth

GB/s counts the bytes of x read once (batch * heads * tokens * head_dim * element size); the scales and
the per-head results are negligible. Targets, printed next to the figures: the Triton kernel reaches
>= 80% of the GPU's peak memory bandwidth and runs >= 5x faster than the torch reference on the same
tensors. Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs) on a GPU; wall clock
on CPU, where only the reference runs (the Triton kernel needs CUDA).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from kvq.kernels import roundtrip_error_reference, triton_kernels
from kvq.qparams import FP8_MAX, INT_RANGE

TARGET_FRACTION_OF_PEAK = 0.80
TARGET_SPEEDUP = 5.0
# Peak memory bandwidth (GB/s) by device name, used when the device properties do not give it.
PEAK_GBPS_BY_NAME: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak GB/s, where it comes from): the flag, the device properties (DDR: 2 x clock x bus), or a table."""
    if override is not None:
        return override, "--peak-gbps"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties (2 x memory clock x bus width)"
    for key, gbps in PEAK_GBPS_BY_NAME:
        if key in props.name:
            return gbps, f"table ({key})"
    return None, "unknown: pass --peak-gbps"


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
    top = FP8_MAX[fmt] if fmt in FP8_MAX else INT_RANGE[fmt][1]
    scale = torch.full(qshape, 4.0 / top)
    zp = None if symmetric else torch.zeros(qshape, dtype=torch.int32)
    return x.to(dtype=dtype, device=device), scale.to(device), None if zp is None else zp.to(device)


def time_ms(fn: Callable[[], object], cuda: bool, cpu_reps: int) -> float:
    if cuda:
        import triton.testing

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
        "--peak-gbps", type=float, default=None, help="peak memory bandwidth of the GPU in GB/s"
    )
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
    print(f"x: {shape} {args.dtype}, {nbytes / 1e6:.1f} MB read once per round trip; device: ", end="")
    peak = None
    if cuda:
        dev = torch.device("cuda")
        peak, source = peak_bandwidth_gbps(dev, args.peak_gbps)
        peak_text = "unknown" if peak is None else f"{peak:.0f} GB/s"
        print(f"{torch.cuda.get_device_name(dev)}, peak {peak_text} [{source}]")
    else:
        print("CPU (no CUDA): the Triton kernel needs CUDA; only the torch reference is timed")
    if cuda and kernels is None:
        print("triton is not installed: only the torch reference is timed")
    print(
        f"targets: Triton >= {TARGET_FRACTION_OF_PEAK:.0%} of peak bandwidth, >= {TARGET_SPEEDUP:.0f}x the reference"
    )
    header = f"{'format':<9} {'gran':<8} {'sym':<4} {'ref ms':>9} {'ref GB/s':>9}"
    if kernels is not None:
        header += f" {'triton ms':>10} {'GB/s':>8} {'% peak':>7} {'speedup':>8}  targets"
    print(header)
    for fmt in args.formats:
        symmetric = fmt in FP8_MAX or not args.asymmetric
        for gran in args.granularities:
            x, scale, zp = make_inputs(shape, dtype, fmt, gran, symmetric, device)
            ref_ms = time_ms(partial(roundtrip_error_reference, x, scale, zp, fmt), cuda, args.cpu_reps)
            line = f"{fmt:<9} {gran:<8} {'y' if symmetric else 'n':<4} {ref_ms:>9.3f} {nbytes / ref_ms / 1e6:>9.2f}"
            if kernels is not None:
                tri_ms = time_ms(partial(kernels.roundtrip_error_triton, x, scale, zp, fmt), True, 0)
                gbps = nbytes / tri_ms / 1e6
                speedup = ref_ms / tri_ms
                frac = None if peak is None else gbps / peak
                frac_text = "n/a" if frac is None else f"{frac:.0%}"
                ok_bw = "?" if frac is None else ("ok" if frac >= TARGET_FRACTION_OF_PEAK else "MISS")
                ok_speed = "ok" if speedup >= TARGET_SPEEDUP else "MISS"
                line += f" {tri_ms:>10.4f} {gbps:>8.0f} {frac_text:>7} {speedup:>7.1f}x  bw {ok_bw}, speedup {ok_speed}"
            print(line)
            if kernels is not None and args.sweep:
                for block_t in (8, 16, 32, 64, 128):
                    for warps in (2, 4, 8, 16):
                        run = partial(
                            kernels.roundtrip_error_triton,
                            x,
                            scale,
                            zp,
                            fmt,
                            block_t=block_t,
                            num_warps=warps,
                        )
                        ms = time_ms(run, True, 0)
                        print(
                            f"    block_t {block_t:>3} warps {warps:>2}: {ms:.4f} ms, {nbytes / ms / 1e6:.0f} GB/s"
                        )


if __name__ == "__main__":
    main()
