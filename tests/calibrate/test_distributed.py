"""Data-parallel calibration under torchrun (gloo on CPU): the artifacts of one process, bit for bit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVQ_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "kvq", *argv],
                          capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def _calibrate_args(model, out):
    return ["calibrate", "--model", str(model), "--dataset", "pydoc", "--samples", "5", "--seqlen", "48",
            "--device", "cpu", "--recipe", "int8-asym-per-channel", "--out", str(out)]


def test_two_ranks_write_what_one_process_writes(tiny_llama, tmp_path):
    from kvq.cli import main

    assert main(_calibrate_args(tiny_llama, tmp_path / "one")) == 0
    proc = _torchrun(2, *_calibrate_args(tiny_llama, tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("stats.safetensors", "scales.safetensors", "scales.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert proc.stdout.count("kvq calibration") == 1  # rank 0 reports, rank 1 stays quiet


def test_a_failing_rank_stops_every_rank_and_writes_nothing(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(broken)
    out = tmp_path / "out"
    proc = _torchrun(2, *_calibrate_args(broken, out))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kvq: error: ")]
    assert len(errors) == 2 and all("layer 1: K holds NaN or inf" in line for line in errors), errors
    assert not out.exists()
