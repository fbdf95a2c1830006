"""Calibration speed and memory against a plain forward of the CausalLM, on the same tokens.

    python bench/calibrate_speed.py [--model M] [--samples 8] [--seqlen 512] [--batch-size 1]
                                    [--dtypes float32 bfloat16] [--device cpu|cuda]

For each dtype it runs, on exactly the same batches: (1) a plain full forward of the CausalLM
(``model(input_ids, attention_mask)``, logits and its DynamicCache included), and (2) kvq's
calibration pass (``collect_stats``: the decoder without the LM head, K/V folded into statistics,
nothing stored). It prints tokens/s and peak memory of each, and the ratios against the targets:
calibration time <= 0.9x the plain forward, peak memory <= 1.1x.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (reset before each phase); on CPU, the
process's peak resident set (VmHWM), reset before each phase through /proc/self/clear_refs.
Both include the model's weights; "extra" is the peak minus what was resident before the phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvq.calibration import collect_stats  # noqa: E402
from kvq.data import batches, load_documents, select_samples  # noqa: E402
from kvq.model.loading import load_model  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory of one phase, in MiB, with the level before the phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.before = _status_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak = _status_kib("VmHWM") / 1024


def plain_forward(model, batch_list) -> None:
    device = next(model.parameters()).device
    with torch.inference_mode():
        for b in batch_list:
            out = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))
            del out


def calibration(model, batch_list) -> None:
    collect_stats(model, batch_list)


def timed(fn, model, batch_list, device) -> tuple[float, PeakMemory]:
    with PeakMemory(device) as mem:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(model, batch_list)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, mem


PHASES = {"plain forward": plain_forward, "kvq calibration": calibration}


def run_phase(args, dtype: str, phase: str) -> dict:
    """Load the model, warm up, then time one phase; returns its figures (run in a fresh process)."""
    shared = REPO.parent / "shared" / "data" / "c4-en-validation-sample.jsonl"
    files = args.data_files or ([str(shared)] if shared.is_file() else None)
    dataset = load_documents("c4" if files else "pydoc", files)
    lm = load_model(args.model, dtype=dtype, device=args.device)
    device = next(lm.model.parameters()).device
    tok = lm.tokenizer
    picked = select_samples(dataset.documents, tok, args.samples, args.seqlen, seed=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch_list = list(batches(picked.token_ids, args.batch_size, pad))
    fn = PHASES[phase]
    fn(lm.model, batch_list[:1])  # warm-up on the first batch
    runs = [timed(fn, lm.model, batch_list, device) for _ in range(args.repeats)]
    return {
        "dtype": dtype, "phase": phase, "tokens": picked.total_tokens, "data": dataset.name,
        "device": str(device), "threads": torch.get_num_threads(),
        "seconds": min(r[0] for r in runs),
        "peak_mib": max(r[1].peak for r in runs), "before_mib": min(r[1].before for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--data-files", nargs="+", default=None,
                    help="default: ../shared/data/c4-en-validation-sample.jsonl if present, else pydoc text")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each phase; the best time is kept")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    args = ap.parse_args()

    if args.phase is not None:
        print(json.dumps(run_phase(args, args.dtypes[0], args.phase)))
        return

    rows = []
    passthrough = [a for a in sys.argv[1:]]
    for dtype in args.dtypes:
        for phase in PHASES:
            # Each phase in a fresh process, so one phase's freed memory is not the next one's peak.
            cmd = [sys.executable, __file__, *passthrough, "--dtypes", dtype, "--phase", phase]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    print(f"device {first['device']}, {first['threads']} threads, {args.samples} samples x <= {args.seqlen} tokens, "
          f"batch {args.batch_size}, data {first['data']}")
    print(f"{'dtype':9} {'phase':16} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'peak MiB':>9} {'extra MiB':>9}")
    for i, r in enumerate(rows):
        print(f"{r['dtype']:9} {r['phase']:16} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens'] / r['seconds']:9.0f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] - r['before_mib']:9.0f}")
        if i % 2 == 1:
            plain, kvq = rows[i - 1], r
            t = kvq["seconds"] / plain["seconds"]
            m = kvq["peak_mib"] / plain["peak_mib"]
            print(f"{r['dtype']:9} {'kvq / plain':16} {'':>7} {t:7.3f}x {'':>9} {m:8.3f}x "
                  f"  time target <= 0.9x: {'PASS' if t <= 0.9 else 'FAIL'}; "
                  f"memory target <= 1.1x: {'PASS' if m <= 1.1 else 'FAIL'}")


if __name__ == "__main__":
    main()
