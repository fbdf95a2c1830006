"""Every CUDA path of kvq in one command (issue 22): GPU tests, the commands end to end, CUDA-vs-CPU statistics,
both kernels' speed against the copy bandwidth and the torch reference, and the tile sweep.

The one GPU command (a device call, in the repository root; at most 8 minutes on one H100 or H200):

    # here, once per session: the model and the wheels that travel (both git-ignored)
    python bench/device_model.py && bash bench/device_wheels.sh
    # the device call, with carry ["bench/device_model", ".whl"] and timeout_s 600:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
        python3 bench/device_check.py --out /tmp/check --copy-to $OUT

It writes device_check.json (everything) and device_check.md (the tables for docs/kernels.md) into --out,
with one log per command, and exits 1 if any check failed (a missed speed target counts: it is marked
"target"). On CPU, ``--toy`` runs the same steps at toy size in about a minute (Triton's interpreter, tiny
shapes, device cpu; CUDA-graph timings, bandwidths and speed targets skipped with the reason):
tests/test_device_check.py runs it in CI so that the check cannot rot between GPU sessions.

Steps (``--only`` picks some): tests (pytest -m gpu), cli (calibrate / solve / validate / eval / plan on
the device and with --device-map auto, statistics against a CPU calibration: bench/device_steps.py),
kernels (per format: bench/device_kernels.py), sweep (tiles per format and kernel, until the budget ends).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

STEPS = ("tests", "cli", "kernels", "sweep")
BUDGET_S = 470  # under 8 minutes in all
TESTS_MAX_S, CLI_MAX_S = 210, 150
GPU_SHAPE, TOY_SHAPE = (8, 8, 4096, 128), (1, 2, 37, 64)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the report and the logs")
    parser.add_argument("--toy", action="store_true", help="CPU, Triton's interpreter, toy sizes (CI)")
    parser.add_argument("--model", default=str(HERE / "device_model"), help="the device model (bench/device_model.py)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget; the sweep fills the rest")
    parser.add_argument("--copy-to", type=Path, help="also copy the JSON, the markdown and a tar of the logs here ($OUT)")
    return parser.parse_args(argv)


def ensure_model(model: Path, out: Path, toy: bool) -> tuple[Path | None, str | None]:
    """The device model folder, built into --out under --toy when it is missing; (None, why) if there is none."""
    if (model / "config.json").is_file():
        return model, None
    if not toy:
        return None, f"no device model at {model}: run python bench/device_model.py here and carry bench/device_model"
    import device_model

    try:
        return device_model.build(out / "device_model"), None
    except Exception as exc:  # the embedded GGUF is not installed
        return None, f"cannot build the device model: {type(exc).__name__}: {exc}"


class Check:
    """Runs the steps, collects checks and what was skipped, and keeps the clock."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.monotonic()
        self.deadline = self.start + args.budget_s
        self.report: dict = {"toy": args.toy, "checks": [], "skipped": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn) -> None:
        if name not in self.args.only:
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # one broken step is a failed check; the others still run
            self.report["checks"].append({"name": f"step {name}", "ok": False,
                                          "detail": f"{type(exc).__name__}: {exc}"[:400]})
            (self.args.out / f"{name}_error.log").write_text(traceback.format_exc())
        self.report.setdefault("step_seconds", {})[name] = round(time.monotonic() - t0, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.toy:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU host has no network: never wait on the hub
    import device_kernels
    import device_report
    import device_steps
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.toy else "cuda"
    check = Check(args)
    report = check.report
    report["environment"] = device_report.environment(device)
    if not args.toy and not torch.cuda.is_available():
        report["checks"].append({"name": "CUDA available", "ok": False, "detail": "torch sees no CUDA GPU (use --toy on CPU)"})
    model, why = ensure_model(Path(args.model), args.out, args.toy)
    if model is None:
        report["checks"].append({"name": "device model", "ok": False, "detail": why})
    shape = TOY_SHAPE if args.toy else GPU_SHAPE
    dtype = torch.bfloat16

    def tests() -> None:
        if model is None:
            raise RuntimeError("no device model, so no tokenizer for the GPU fixtures")
        timeout = max(30.0, min(TESTS_MAX_S, check.left() - 120))
        report["gpu_tests"], result = device_steps.run_gpu_tests(str(model), args.out, args.toy, timeout)
        report["checks"].append(result)

    def cli() -> None:
        if model is None:
            raise RuntimeError("no device model")
        deadline = time.monotonic() + max(60.0, min(CLI_MAX_S, check.left() - 60))
        report["commands"], checks = device_steps.run_pipeline(str(model), device, args.out / "runs", args.toy, deadline)
        report["checks"].extend(checks)

    def kernels() -> None:
        report["kernels"] = device_kernels.run_kernels(shape, dtype, device)
        if "error" in report["kernels"]:
            report["checks"].append({"name": "Triton kernels", "ok": False, "detail": report["kernels"]["error"]})
        for row in report["kernels"]["rows"]:
            label = f"{row['format']} {'sym' if row['symmetric'] else 'asym'} {row['granularity']}"
            report["checks"].extend({**c, "name": f"{label}: {c['name']}"} for c in row["checks"])
        if report["kernels"].get("copy_skipped"):
            report["skipped"].append(f"kernel GPU times, GB/s and speed targets: {report['kernels']['copy_skipped']}")

    def sweep() -> None:
        if args.toy:
            report["sweep"] = device_kernels.sweep(shape, dtype, device, time.monotonic() + 60,
                                                   tiles=device_kernels.TOY_SWEEP_TILES, rows=device_kernels.SWEEP_ROWS[:1])
            report["skipped"].append("tile sweep: one format and two tiles, wall clock under the interpreter (toy)")
        else:
            report["sweep"] = device_kernels.sweep(shape, dtype, device, check.deadline)
        if report["sweep"].get("stopped"):
            report["skipped"].append(f"tile sweep: {report['sweep']['stopped']}")

    for name, fn in (("tests", tests), ("cli", cli), ("kernels", kernels), ("sweep", sweep)):
        check.step(name, fn)
    report["skipped"] += [f"step {s}: not asked for (--only)" for s in STEPS if s not in args.only]
    failed = [c for c in report["checks"] if not c["ok"]]
    report.update(ok=not failed, failed=len(failed), seconds=round(time.monotonic() - check.start, 1))
    js, md = device_report.write(report, args.out)
    if args.copy_to:
        bundle(args.out, args.copy_to)
    sys.stdout.write(md.read_text() + f"\nreport: {js}\n")
    return 0 if not failed else 1


def bundle(out: Path, to: Path) -> None:
    """device_check.json, device_check.md and logs.tar.gz (every log and JSON of the run) in ``to``."""
    to.mkdir(parents=True, exist_ok=True)
    for name in ("device_check.json", "device_check.md"):
        (to / name).write_bytes((out / name).read_bytes())
    with tarfile.open(to / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.suffix in (".log", ".json", ".xml", ".md"):
                tar.add(path, arcname=str(path.relative_to(out)))


if __name__ == "__main__":
    sys.exit(main())
