"""Crafted files for the hostile-file cases of tests/test_bad_inputs.py (issue 20), and a bounded run.

A hostile file is small (a few KB) but states something that would cost kvq without limit if believed:
a sample counter that is not the partial's, a billion layers, JSON nested 10^5 levels deep. Each
generator writes one such file from a good one; :func:`run_bounded` runs the CLI on it in a fresh
process under a memory ceiling and a time limit and reports its peak memory, so a case checks the
error contract (exit 2, one line naming the file and the field, ``--out`` untouched) and that work
and memory stay bounded by the size of the input.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from bad_input import Outcome
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NESTED = "[" * 100_000 + "]" * 100_000  # 200 KB of JSON, 10^5 levels deep
ADDRESS_SPACE = 3 << 30  # bytes: enough for torch + transformers, far from a billion-entry list
PEAK_RSS = 1 << 30  # bytes: the bound on a run's peak memory
SECONDS = 30.0  # the bound on a run's time, for a file under 1 MB


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata() or {})
    return load_file(str(path)), meta


def rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None, **meta: str | None) -> Path:
    """``path`` (a safetensors file) rewritten in place with ``tensors`` (default: its own) and its metadata
    updated by ``meta`` (a None value drops the key)."""
    old_tensors, old_meta = read(path)
    for key, value in meta.items():
        if value is None:
            old_meta.pop(key, None)
        else:
            old_meta[key] = value
    save_file(old_tensors if tensors is None else tensors, str(path), metadata=old_meta)
    return path


def run_child(cmd: list[str], seconds: float, env: dict[str, str] | None = None,
              address_space: int = ADDRESS_SPACE) -> tuple[Outcome, int, float]:
    """``cmd`` in a fresh process under an address-space ceiling, killed past ``seconds``: its outcome (a kill
    reads as a negative exit code), its own peak resident memory in bytes and its wall time."""
    child_env = {k: v for k, v in os.environ.items() if k != "KVQ_DEBUG"} | (env or {})

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=child_env,
                                preexec_fn=limit)
        timer = threading.Timer(seconds, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory, not the largest child's
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        outcome = Outcome(os.waitstatus_to_exitcode(status), out.read(), err.read())
        return outcome, usage.ru_maxrss * 1024, elapsed  # Linux: kilobytes


def run_bounded(argv: list[str], seconds: float = SECONDS) -> tuple[Outcome, int, float]:
    """``python -m kvq ARGV`` under :func:`run_child`: its outcome, its peak resident memory in bytes, and its
    wall time (killed, failing the test, past ``seconds``)."""
    outcome, rss, elapsed = run_child([sys.executable, "-m", "kvq", *argv], seconds)
    if elapsed >= seconds:
        pytest.fail(f"kvq {' '.join(argv)[:300]} ran past {seconds} s")
    return outcome, rss, elapsed


class _Stop(KeyboardInterrupt):
    """Ctrl-C, pressed by the progress callback once the run has done some samples."""


def write_partial(model: Path, out: Path, recipe: str, samples: int, seqlen: int, after: int) -> Path:
    """A partial statistics file as kvq writes it on Ctrl-C: calibrate ``model`` on pydoc into ``out`` (the
    library, not the CLI under test) and press Ctrl-C once ``after`` samples are done."""
    from kvq.artifacts.files import PARTIAL_FILE
    from kvq.calibration import CalibrationConfig, run_calibration
    from kvq.data.data_spec import DataSpec
    from kvq.model.model_spec import ModelSpec
    from kvq.recipe.schema import load_recipe

    def press(done: int, total: int) -> None:
        if done >= after:
            raise _Stop

    cfg = CalibrationConfig(model=ModelSpec(model=str(model), device="cpu"), data=DataSpec(dataset="pydoc"),
                            samples=samples, seqlen=seqlen)
    with pytest.raises(_Stop):
        run_calibration(cfg, load_recipe(recipe), out, progress=press)
    return out / PARTIAL_FILE
