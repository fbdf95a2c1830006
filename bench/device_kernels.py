"""The kernel part of bench/device_check.py: both Triton kernels per format, against the torch reference and a
measured copy of the same bytes, and the tile sweep.

Per format (one row each): the torch reference's call time; for the error kernel (``validate``) and the
fake-quantize kernel (``eval``) the time of one call as kvq makes it (``triton.testing.do_bench``: launches and
allocations included) and of the same call replayed in a CUDA graph (``do_bench_cudagraph``: the GPU's own
time), GB/s (error kernel: x read once; fake-quantize: x read and x_hat written) and the fraction of the copy
bandwidth, measured as a torch copy of x's bytes (read + written) replayed in a CUDA graph. Before timing, each
kernel's result is checked against the reference (fake-quantize bit-exact; the error's counts and max bit-exact,
its float64 sums to 1e-5 relative, summation order). Targets: GPU time >= 80% of copy bandwidth and call
>= 5x the reference's call, for both kernels.

Under ``--toy`` (CPU, Triton's interpreter, tiny shapes) the correctness checks run and the call times are wall
clock; CUDA-graph times, bandwidths and the targets are skipped with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

TARGET_FRACTION_OF_COPY = 0.80
TARGET_SPEEDUP = 5.0
NO_CUDA = "needs CUDA (toy run: Triton's CPU interpreter has no GPU timings)"

# (format, granularity, symmetric): every format the kernels take, the int ones both ways
ROWS = [
    ("fp8_e4m3", "head", True), ("fp8_e5m2", "head", True), ("fp8_e4m3", "channel", True),
    ("int8", "head", True), ("int4", "head", True), ("int8", "channel", False), ("int4", "tensor", False),
    ("nvfp4", "tensor", True),
]  # fmt: skip
# the tile sweep: the rows it covers, and the tiles it tries for each kernel (the launchers' keywords); the error
# kernel first (it is the one below target), each tile compiled once per row
SWEEP_ROWS = [("fp8_e4m3", "head", True), ("int8", "head", True), ("int4", "channel", False), ("nvfp4", "tensor", True)]
SWEEP_TILES = {
    "error": [{"block_t": bt, "num_warps": w, "tiles_per_program": tpp}
              for bt in (16, 32, 64) for w in (2, 4, 8) for tpp in (1, 4)],
    "fake_quant": [{"block_t": bt, "num_warps": w, "tiles_per_program": 1} for bt in (16, 32, 64, 128) for w in (4, 8)],
}  # fmt: skip
TOY_SWEEP_TILES = {kind: [{"block_t": 4, "num_warps": 1, "tiles_per_program": 1},
                          {"block_t": 8, "num_warps": 2, "tiles_per_program": 2}] for kind in ("error", "fake_quant")}


@dataclass
class Timer:
    """Median milliseconds of a call: do_bench / do_bench_cudagraph on CUDA, wall clock (toy) on CPU."""

    cuda: bool
    rep_ms: int = 200

    def call(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median"))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def graph(self, fn: Callable[[], object]) -> float | None:
        if not self.cuda:
            return None
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median"))


def make_inputs(shape, dtype, fmt, granularity, symmetric, device):
    """K/V-like data (outlier channels, channel offsets) and scales at ~4 sigma (a little clipping)."""
    gen = torch.Generator().manual_seed(0)
    _, h, _, d = shape
    x = torch.randn(shape, generator=gen) * (torch.rand(1, h, 1, d, generator=gen) + 0.5)
    x += torch.randn(1, h, 1, d, generator=gen) * 0.3
    x[..., ::16] *= 4.0
    qshape = {"tensor": (), "head": (h,), "channel": (h, d)}[granularity]
    from kvq.quant.formats import FORMATS

    top = 1500.0 if fmt == "nvfp4" else FORMATS[fmt].qmax
    scale = torch.full(qshape, 4.0 / top)
    zp = None if symmetric else torch.full(qshape, -1, dtype=torch.int32)
    return x.to(dtype=dtype, device=device), scale.to(device), None if zp is None else zp.to(device)


def same_error(got, want) -> str | None:
    """None when two RoundTripErrors agree (counts and max bit-exact, sums to 1e-5 relative); else why not."""
    for name in ("clipped", "count", "max_abs_err"):
        if not torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()):
            return f"{name} differs from the reference"
    for name in ("sse", "signal"):
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        if not torch.allclose(a, b, rtol=1e-5, atol=0):
            return f"{name} differs from the reference by more than 1e-5 relative"
    return None


def copy_gbps(x: torch.Tensor, timer: Timer) -> float | None:
    """A torch copy of x's bytes, in a CUDA graph: GB/s counting bytes read and written."""
    if not timer.cuda:
        return None
    src = x.reshape(-1).view(torch.uint8)  # (nbytes,)
    dst = torch.empty_like(src)
    ms = timer.graph(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def kernel_row(kernels, x, scale, zp, fmt, timer: Timer, copy: float | None) -> dict:
    """Both kernels on one input: correctness against the reference, then their timings."""
    from kvq.kernels.reference import qdq_static, roundtrip_error_reference

    nbytes = x.numel() * x.element_size()
    error = partial(kernels.roundtrip_error_triton, x, scale, zp, fmt)
    fake = partial(kernels.fake_quantize_triton, x, scale, zp, fmt)
    ref_error = partial(roundtrip_error_reference, x, scale, zp, fmt)
    ref_fake = partial(qdq_static, x, scale, zp, fmt)
    row: dict = {"bytes": nbytes, "checks": []}
    why = same_error(error(), ref_error())
    row["checks"].append({"name": "error kernel = reference", "ok": why is None, "detail": why or "exact"})
    same = torch.equal(fake(), ref_fake())
    row["checks"].append({"name": "fake-quantize = reference", "ok": same, "detail": "bit-exact" if same else "differs"})
    for kind, fn, ref, moved in (("error", error, ref_error, nbytes), ("fake_quant", fake, ref_fake, 2 * nbytes)):
        ref_ms, call_ms, gpu_ms = timer.call(ref), timer.call(fn), timer.graph(fn)
        entry = {"reference_ms": ref_ms, "call_ms": call_ms, "gpu_ms": gpu_ms, "speedup": ref_ms / call_ms}
        if gpu_ms is None or copy is None:  # the interpreter's speed says nothing about the kernel's
            entry.update(gbps=None, fraction_of_copy=None, speedup=None, skipped=NO_CUDA)
        else:
            entry.update(gbps=moved / gpu_ms / 1e6, fraction_of_copy=moved / gpu_ms / 1e6 / copy)
            row["checks"].append({"name": f"{kind}: GPU time >= {TARGET_FRACTION_OF_COPY:.0%} of copy bandwidth",
                                  "ok": entry["fraction_of_copy"] >= TARGET_FRACTION_OF_COPY, "target": True,
                                  "detail": f"{entry['fraction_of_copy']:.1%}"})
            row["checks"].append({"name": f"{kind}: call >= {TARGET_SPEEDUP:.0f}x the reference", "target": True,
                                  "ok": entry["speedup"] >= TARGET_SPEEDUP, "detail": f"{entry['speedup']:.1f}x"})
        row[kind] = entry
    return row


def run_kernels(shape, dtype, device: str, rows=ROWS) -> dict:
    """The per-format table: copy bandwidth, then one row per (format, granularity, symmetric)."""
    from kvq.kernels import triton_kernels

    kernels = triton_kernels()
    if kernels is None:
        return {"error": "triton is not installed", "rows": []}
    timer = Timer(cuda=device.startswith("cuda"))
    x0, _, _ = make_inputs(shape, dtype, "int8", "tensor", True, device)
    copy = copy_gbps(x0, timer)
    out: dict = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "copy_gbps": copy,
                 "copy_skipped": None if copy is not None else NO_CUDA, "rows": []}
    for fmt, gran, sym in rows:
        x, scale, zp = make_inputs(shape, dtype, fmt, gran, sym, device)
        row = {"format": fmt, "granularity": gran, "symmetric": sym}
        try:
            row.update(kernel_row(kernels, x, scale, zp, fmt, timer, copy))
        except Exception as exc:  # a kernel that fails to compile or run is a failed check, the rest goes on
            row["checks"] = [{"name": "kernels run", "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}]
        out["rows"].append(row)
    return out


def default_tile(kind: str, fmt: str) -> dict | None:
    """The kernel's default tile for ``fmt`` (ERROR_TILES / FAKE_QUANT_TILES of kvq.kernels.triton_roundtrip)."""
    from kvq.kernels import triton_roundtrip

    table = getattr(triton_roundtrip, "ERROR_TILES" if kind == "error" else "FAKE_QUANT_TILES", None)
    tile = None if table is None else table.get(fmt)
    return None if tile is None else dict(vars(tile))


def sweep(shape, dtype, device: str, deadline: float, tiles: dict | None = None, rows=SWEEP_ROWS) -> dict:
    """Time each tile of ``tiles[kind]`` for both kernels on ``rows`` (the error kernel's rows first), the
    default tile too; stops at ``deadline`` (time.monotonic()). ``suggested``: per kernel and format, the best
    tile as a Tile of the tables (elements = block_t x the padded head_dim)."""
    from kvq.kernels import triton_kernels

    kernels = triton_kernels()
    timer = Timer(cuda=device.startswith("cuda"), rep_ms=60)
    tiles = tiles or SWEEP_TILES
    block_d = 1 << (shape[3] - 1).bit_length()
    results: list[dict] = []
    suggested: dict[str, dict] = {"error": {}, "fake_quant": {}}
    stopped = None
    launches = {"error": kernels.roundtrip_error_triton, "fake_quant": kernels.fake_quantize_triton}
    for kind in ("error", "fake_quant"):
        for fmt, gran, sym in rows:
            x, scale, zp = make_inputs(shape, dtype, fmt, gran, sym, device)
            moved = x.numel() * x.element_size() * (1 if kind == "error" else 2)
            timings = []
            for tile in [{}, *tiles[kind]]:  # {}: the default tile
                if time.monotonic() > deadline:
                    stopped = f"out of time at {kind} {fmt} {gran}: the sweep's budget ran out"
                    break
                fn = partial(launches[kind], x, scale, zp, fmt, **tile)
                try:
                    ms = timer.graph(fn) if timer.cuda else timer.call(fn)
                except Exception as exc:  # e.g. a tile too large for the GPU's registers
                    timings.append({**tile, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                timings.append({**(tile or {"tile": "default"}), "ms": ms, "gbps": moved / ms / 1e6 if timer.cuda else None})
            done = [t for t in timings if "ms" in t]
            best = min(done, key=lambda t: t["ms"]) if done else None
            default_ms = next((t["ms"] for t in done if t.get("tile") == "default"), None)
            results.append({"format": fmt, "granularity": gran, "symmetric": sym, "kernel": kind,
                            "default": default_tile(kind, fmt), "default_ms": default_ms, "best": best,
                            "timings": timings})
            if best is not None and "block_t" in best:
                suggested[kind][fmt] = {"elements": best["block_t"] * block_d, "num_warps": best["num_warps"],
                                        "tiles_per_program": best["tiles_per_program"]}
            if stopped:
                break
        if stopped:
            break
    timing = "CUDA graph" if timer.cuda else "wall clock (interpreter)"
    return {"rows": results, "stopped": stopped, "timing": timing, "suggested": suggested}
