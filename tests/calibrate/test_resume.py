"""An interrupted calibration (SIGKILL, Ctrl-C) resumes to the artifacts of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from bad_input import assert_contract, run_in_process

from kvq.artifacts.files import PARTIAL_FILE
from kvq.cli import main

ARTIFACTS = ("stats.safetensors", "scales.safetensors", "scales.json")


RECIPES = {"minmax": "int8-asym-per-channel"}


def _args(model, out, *extra, recipe="minmax"):
    return ["calibrate", "--model", str(model), "--dataset", "pydoc", "--samples", "48", "--seqlen", "96",
            "--device", "cpu", "--recipe", RECIPES[recipe], "--out", str(out), *extra]


@pytest.fixture(scope="module", autouse=True)
def _observer_recipe(tmp_path_factory):
    """A recipe whose observers read histograms (keys, per channel) and the reservoir of Q/K/V rows (values)."""
    path = tmp_path_factory.mktemp("recipes") / "observers.yaml"
    path.write_text("format: int4\nsymmetric: false\ngranularity: channel\nkeys: {observer: mse}\n"
                    "values: {observer: attention, granularity: head}\n")
    RECIPES["observers"] = str(path)


def _start(argv):
    env = {k: v for k, v in os.environ.items() if k != "KVQ_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "kvq", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_partial(proc, out, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not (out / PARTIAL_FILE).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no partial statistics appeared before the run ended (rc {proc.poll()})")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    found = {}
    for recipe in RECIPES:
        out = tmp_path_factory.mktemp("resume") / "whole"
        assert main(_args(tiny_llama, out, recipe=recipe)) == 0
        found[recipe] = {name: (out / name).read_bytes() for name in ARTIFACTS}
    return found


@pytest.mark.parametrize(("how", "recipe"), [("SIGKILL", "minmax"), ("SIGINT", "minmax"), ("SIGKILL", "observers")])
def test_an_interrupted_run_resumes_to_the_same_bytes(tiny_llama, tmp_path, uninterrupted, how, recipe):
    out = tmp_path / "out"
    proc = _start(_args(tiny_llama, out, "--save-every", "1", recipe=recipe))
    _wait_for_partial(proc, out)
    for _ in range(5):  # a Ctrl-C CPython loses before a blocking call is pressed again, as a user would
        proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    if how == "SIGINT":
        assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "kvq: interrupted"
    assert (out / PARTIAL_FILE).exists() and not (out / "stats.safetensors").exists()
    assert main(_args(tiny_llama, out, "--resume", recipe=recipe)) == 0
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == uninterrupted[recipe]
    assert sorted(os.listdir(out)) == sorted(ARTIFACTS)  # the partial file and any temporary are gone


def test_resume_refuses_another_run(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start(_args(tiny_llama, out, "--save-every", "1"))
    _wait_for_partial(proc, out)
    proc.kill()
    proc.wait()
    before = (out / PARTIAL_FILE).read_bytes()
    argv = _args(tiny_llama, out, "--resume")
    argv[argv.index("--seqlen") + 1] = "80"
    assert_contract(run_in_process(argv, capsys), 2, "--resume: the interrupted run")
    argv = _args(tiny_llama, out, "--resume")
    argv[argv.index("int8-asym-per-channel")] = "int4-asym-per-head"
    assert_contract(run_in_process(argv, capsys), 2, "had another recipe")
    assert (out / PARTIAL_FILE).read_bytes() == before


def test_a_partial_save_cut_by_sigkill_leaves_no_obstacle(tiny_llama, tmp_path, capsys):
    """A run killed while it writes its partial statistics leaves kvq's temporary beside them; --resume (and any
    later run into the folder) removes it instead of refusing the folder as holding a foreign file."""
    from kvq.io.atomic import _HOST, TMP_SUFFIX

    out = tmp_path / "out"
    proc = _start(_args(tiny_llama, out, "--save-every", "1"))
    _wait_for_partial(proc, out)
    proc.kill()
    proc.wait()
    stale = out / f".{PARTIAL_FILE}.{_HOST}.{proc.pid}.0123abcd.new{TMP_SUFFIX}"  # as the killed writer names it
    stale.write_bytes(b"half a file")
    assert main(_args(tiny_llama, out, "--resume")) == 0
    assert not stale.exists() and sorted(os.listdir(out)) == sorted(ARTIFACTS)
