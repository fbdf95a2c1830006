"""The command part of bench/device_check.py: kvq's commands end to end on the device, the statistics of the
device run against the CPU run of the same model, and the GPU test suite.

Commands run as ``python -m kvq ...`` in a fresh process each (on the GPU) or through ``kvq.cli.main`` in this
process (``--toy``, where each process would spend most of its time importing); their output goes to one log
file per command in the --out folder.

Statistics bound (float32 reduction order): every recorded statistic (per layer, KV head and channel: min,
max, absmax of K and V) is an extreme of K/V elements, and an extreme is 1-Lipschitz in the elements, so it
differs between devices by at most what one element does. An element is the end of a chain of float32 dot
products (length n <= 576 here: the o_proj input, 9 heads x 64) and softmax sums; two summation orders of one
dot product differ by at most 2 n u sum|a_i b_i| (u = 2**-24), 6.9e-5 of sum|a_i b_i| at n = 576. Allowing
for the 4 layers' chained products (about a dozen per layer) and sum|a_i b_i| a few times the result, the
check allows ``max |device - cpu| <= STATS_RTOL * max |cpu|`` per tensor, STATS_RTOL = 1e-3, and reports the
largest relative difference seen. Token counts and the rest of the metadata must be equal.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

STATS_RTOL = 1e-3
REPO = Path(__file__).resolve().parent.parent


def run_kvq(argv: list[str], log: Path, in_process: bool, timeout: float = 300) -> dict:
    """Run ``kvq ARGV``; its output goes to ``log``. {argv, rc, seconds, log}."""
    start = time.monotonic()
    with open(log, "w") as fh:
        if in_process:
            from kvq.cli import main

            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                rc = main(argv)
        else:
            try:
                rc = subprocess.run([sys.executable, "-m", "kvq", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"argv": ["kvq", *argv], "rc": rc, "seconds": round(time.monotonic() - start, 2), "log": log.name,
            "tail": tail}


def pipeline(model: str, device: str, out: Path, toy: bool) -> list[tuple[str, list[str]]]:
    """(name, argv) of each command, in order: a CPU calibration as the reference, then every command on
    ``device``, then calibrate and eval once more with --device-map auto."""
    data = ["--dataset", "pydoc"]
    size = ["--samples", "2", "--seqlen", "32", "--batch-size", "2"] if toy else \
        ["--samples", "8", "--seqlen", "512", "--batch-size", "4"]
    windows = ["--samples", "1", "--seqlen", "32"] if toy else ["--samples", "4", "--seqlen", "512"]
    on = ["--model", model, "--device", device]
    mapped = ["--model", model, "--device-map", "auto"]
    cal = ["--recipe", "int8-asym-per-head", "--force"]
    return [
        ("calibrate cpu (the reference)", ["calibrate", "--model", model, "--device", "cpu", *data, *size, *cal, "--out", str(out / "cal-cpu")]),
        (f"calibrate --device {device}", ["calibrate", *on, *data, *size, *cal, "--out", str(out / "cal-dev")]),
        ("solve", ["solve", str(out / "cal-dev"), "--recipe", "fp8-e4m3-per-tensor", "--out", str(out / "fp8-dev"), "--force"]),
        (f"validate --device {device}", ["validate", str(out / "cal-dev"), *on, *data, *windows, "--json", str(out / "validate.json")]),
        (f"eval --device {device}", ["eval", *on, *data, *windows, "--scales", str(out / "cal-dev"), "--scales", str(out / "fp8-dev"),
                            "--recipe", "int8-dynamic-per-token", "--json", str(out / "eval.json")]),
        (f"plan --device {device}", ["plan", str(out / "cal-dev"), *on, *data, *windows, "--skip", "1"]),
        ("calibrate --device-map auto", ["calibrate", *mapped, *data, *size, *cal, "--out", str(out / "cal-map")]),
        ("eval --device-map auto", ["eval", *mapped, *data, *windows, "--scales", str(out / "cal-map"),
                                    "--json", str(out / "eval-map.json")]),
    ]  # fmt: skip


def read_stats(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def compare_stats(device_file: Path, cpu_file: Path, rtol: float = STATS_RTOL) -> dict:
    """The device's statistics against the CPU's: equal keys and metadata, tensors within rtol of their absmax."""
    got, got_meta = read_stats(device_file)
    want, want_meta = read_stats(cpu_file)
    problems: list[str] = []
    if got.keys() != want.keys():
        problems.append(f"tensor names differ: {sorted(got.keys() ^ want.keys())[:4]}")
    meta_diff = sorted(k for k in got_meta.keys() | want_meta.keys() if got_meta.get(k) != want_meta.get(k))
    if meta_diff:
        problems.append(f"metadata differs: {meta_diff[:6]}")
    worst, worst_name, exact = 0.0, None, 0
    for name in sorted(got.keys() & want.keys()):
        a, b = got[name].double(), want[name].double()
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
            continue
        scale = float(b.abs().max()) or 1.0
        rel = float((a - b).abs().max()) / scale
        exact += int(torch.equal(a, b))
        if rel > worst:
            worst, worst_name = rel, name
        if rel > rtol:
            problems.append(f"{name}: max |device - cpu| = {rel:.2e} of max |cpu| > {rtol:g}")
    return {"ok": not problems, "rtol": rtol, "max_relative_difference": worst, "worst_tensor": worst_name,
            "tensors": len(want), "bit_equal_tensors": exact, "problems": problems[:10]}


def run_pipeline(model: str, device: str, out: Path, toy: bool, deadline: float = float("inf"),
                 command_s: float = 90) -> tuple[list[dict], list[dict]]:
    """Every command of :func:`pipeline` (a failed command does not stop the rest; each at most ``command_s``
    and none past ``deadline``, time.monotonic()); then the statistics comparisons. Returns (command results,
    checks)."""
    out.mkdir(parents=True, exist_ok=True)
    results, checks = [], []
    for i, (name, argv) in enumerate(pipeline(model, device, out, toy)):
        slug = f"{i:02d}_{name.split(' (')[0]}".replace(" ", "_").replace("-", "")
        left = deadline - time.monotonic()
        if left < 5:
            checks.append({"name": f"kvq {name}", "ok": False, "detail": "not run: the step's time ran out"})
            continue
        result = run_kvq(argv, out / f"{slug}.log", in_process=toy, timeout=min(command_s, left))
        results.append({"name": name, **result})
        checks.append({"name": f"kvq {name}", "ok": result["rc"] == 0,
                       "detail": f"exit {result['rc']} in {result['seconds']} s ({result['log']})"})
    for label, folder in ((f"--device {device}", "cal-dev"), ("--device-map auto", "cal-map")):
        dev, cpu = out / folder / "stats.safetensors", out / "cal-cpu" / "stats.safetensors"
        if not (dev.is_file() and cpu.is_file()):
            checks.append({"name": f"statistics {label} = cpu", "ok": False, "detail": "a calibration wrote no statistics"})
            continue
        cmp = compare_stats(dev, cpu)
        detail = (f"max relative difference {cmp['max_relative_difference']:.2e} (bound {cmp['rtol']:g}); "
                  f"{cmp['bit_equal_tensors']}/{cmp['tensors']} tensors bit-equal")
        checks.append({"name": f"statistics {label} = cpu", "ok": cmp["ok"], "detail": detail, "compare": cmp})
    return results, checks


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped of a pytest --junitxml report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def run_gpu_tests(model: str, out: Path, toy: bool, timeout: float) -> tuple[dict, dict]:
    """pytest -m gpu on the test files that hold GPU tests (so that collection imports nothing the GPU image
    lacks; 8 workers where xdist is there; under --toy they skip) with $KVQ_TEST_TOKENIZER at the device
    model's tokenizer. Returns (result, check)."""
    import importlib.util

    targets = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").rglob("test_*.py")
                     if "pytest.mark.gpu" in f.read_text(errors="replace"))
    workers = [] if toy or importlib.util.find_spec("xdist") is None else ["-n", "8"]
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *workers,
            f"--junitxml={out / 'gpu_tests.xml'}", *targets]
    env = dict(os.environ, KVQ_TEST_TOKENIZER=str(Path(model).resolve()), PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("TRITON_INTERPRET", None)  # the suite's CPU tests set it in their own subprocesses
    start = time.monotonic()
    with open(out / "gpu_tests.log", "w") as fh:
        try:
            rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout,
                                stdin=subprocess.DEVNULL).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = round(time.monotonic() - start, 1)
    counts = junit_counts(out / "gpu_tests.xml") if (out / "gpu_tests.xml").is_file() else {}
    result = {"argv": argv[1:], "rc": rc, "seconds": seconds, "log": "gpu_tests.log", **counts}
    ok = rc == 0 and counts.get("failed", 1) == 0 and counts.get("errors", 1) == 0
    if not toy:
        ok = ok and counts.get("passed", 0) > 0  # on a GPU the suite runs (skips are listed in the log)
    detail = f"exit {rc} in {seconds} s: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return result, {"name": "GPU test suite (pytest -m gpu)", "ok": ok, "detail": detail}
