"""Calibrating models larger than one process: data-parallel ranks and offload, measured.

    python bench/scale_out.py [--model M] [--samples 16] [--seqlen 512] [--max-memory cpu=300MB]

Each run is a fresh ``kvq calibrate`` process over the same samples (the built-in pydoc text), so its
peak resident memory (``ru_maxrss`` of that process tree) and its wall time are its own:

1. 1 process x 2 threads vs ``torchrun --nproc-per-node 2`` with 1 thread per rank (gloo): tokens/s
   and whether the statistics are byte-identical. Target on this 2-core machine: the 2 ranks at least
   0.9x the tokens/s of the single process, and identical statistics.
2. The plain run vs ``--device-map auto --max-memory ... --offload-folder``: peak RSS (target: offload
   lowers it) and whether the statistics are byte-identical.

Figures only; nothing here is a test. (Calibration's peak memory against a plain forward over the
same tokens is ``bench/calibrate_speed.py``'s.)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A fresh wrapper per run: its RUSAGE_CHILDREN covers that run's process tree only (torchrun's ranks too).
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run(argv: list[str], threads: int) -> tuple[float, float]:
    """Run ``argv`` to the end; (seconds, the largest peak RSS of one process of its tree, in MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench/scale_out.py: {' '.join(argv[:6])} ... failed:\n{proc.stderr[-2000:]}")
    return seconds, int(proc.stdout.split()[-1]) / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-memory", default="cpu=300MB")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvq-scale-out-"))
    calibrate = ["calibrate", "--dataset", "pydoc", "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                 "--device", "cpu", *(["--model", args.model] if args.model else [])]
    kvq = [sys.executable, "-m", "kvq"]
    tokens = args.samples * args.seqlen  # at most: samples are cut at seqlen

    one, one_rss = run([*kvq, *calibrate, "--out", str(work / "one")], threads=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "kvq"]
    two, _ = run([*torchrun, *calibrate, "--out", str(work / "two")], threads=1)
    same = (work / "one" / "stats.safetensors").read_bytes() == (work / "two" / "stats.safetensors").read_bytes()
    ratio = one / two
    print(f"1 process x 2 threads: {one:6.1f} s ({tokens / one:8.0f} tok/s at most), peak RSS {one_rss:6.0f} MiB")
    print(f"2 ranks   x 1 thread : {two:6.1f} s ({tokens / two:8.0f} tok/s at most), statistics identical: {same}")
    print(f"{'PASS' if ratio >= 0.9 and same else 'FAIL'}  2 ranks at {ratio:.2f}x the tokens/s of 1 process "
          "(target >= 0.9x, identical statistics)")

    offloaded, off_rss = run([*kvq, *calibrate, "--out", str(work / "offload"), "--device-map", "auto",
                              "--max-memory", args.max_memory, "--offload-folder", str(work / "offload-weights")],
                             threads=2)
    same = (work / "one" / "stats.safetensors").read_bytes() == (work / "offload" / "stats.safetensors").read_bytes()
    print(f"offloaded ({args.max_memory}): {offloaded:6.1f} s, peak RSS {off_rss:6.0f} MiB "
          f"(plain {one_rss:.0f} MiB), statistics identical: {same}")
    print(f"{'PASS' if off_rss < one_rss and same else 'FAIL'}  offload lowers the peak RSS "
          f"({off_rss / one_rss:.2f}x) with identical statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
