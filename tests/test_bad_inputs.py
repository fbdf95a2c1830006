"""The bad-input catalogue: every command, fed what a user can get wrong, keeps the error contract.

Each case asserts (tests/bad_input.py): the exit code (2 bad usage or input, 1 failure while working,
130 Ctrl-C), one bounded ``kvq: error: ...`` line naming the thing at fault (a hint line may follow),
no traceback, and that ``--out`` holds exactly what it held before: where it makes sense a good
artifact is put there first, and it must survive the failed run byte for byte.

The expected texts are what the message must name (the flag, the file, the key, the numbers), written
from the input, not copied from kvq's output. Runs are in-process (fast); a subprocess only where the
process boundary matters (Ctrl-C). Data come from the built-in ``pydoc`` dataset, so nothing skips.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bad_input import MAX_LINE, Outcome, assert_contract, run_in_process, snapshot
from hostile_files import NESTED, PEAK_RSS, SECONDS, read, rewrite, run_bounded, run_child, write_partial
from safetensors.torch import load_file, save_file

from kvq.artifacts.files import PARTIAL_FILE

FAST = ["--samples", "2", "--seqlen", "16"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch, tmp_path):
    monkeypatch.delenv("KVQ_DEBUG", raising=False)
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))  # a GGUF conversion writes here, not in ~


@pytest.fixture(scope="module")
def good_artifact(tiny_llama, tmp_path_factory) -> Path:
    """A good int8 asymmetric per-head artifact of the tiny model, made by the library (not the CLI under test)."""
    from kvq.calibration import CalibrationConfig, run_calibration
    from kvq.data.data_spec import DataSpec
    from kvq.model.model_spec import ModelSpec
    from kvq.recipe.schema import load_recipe

    out = tmp_path_factory.mktemp("good") / "artifact"
    cfg = CalibrationConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), samples=2, seqlen=16)
    run_calibration(cfg, load_recipe("int8-asym-per-head"), out)
    return out


@dataclass
class World:
    """What a case can use: the tiny model, a copy of a good artifact (``out``), a scratch folder."""

    model: Path
    good: Path  # the pristine artifact (read only)
    out: Path  # a copy of it, where a failed run must not touch anything
    tmp: Path

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def calibrate(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["calibrate", "--model", str(self.model), "--dataset", "pydoc", *FAST, "--device", "cpu",
                "--out", str(out or self.out), *extra]

    def stats_with(self, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        """A copy of the good stats.safetensors, tensors edited, metadata kept."""
        from safetensors import safe_open

        with safe_open(str(self.good / "stats.safetensors"), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(self.good / "stats.safetensors"))
        edit(tensors)
        folder = self.tmp / "edited-stats"
        folder.mkdir(exist_ok=True)
        save_file(tensors, str(folder / "stats.safetensors"), metadata=meta)
        return folder / "stats.safetensors"

    def scales_with(self, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        """A copy of the good artifact whose scales.safetensors tensors are edited (metadata kept)."""
        from safetensors import safe_open

        folder = self.tmp / "edited-artifact"
        shutil.copytree(self.good, folder)
        with safe_open(str(folder / "scales.safetensors"), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(folder / "scales.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "scales.safetensors"), metadata=meta)
        return folder

    def model_copy(self, edit: Callable[[Path], None]) -> Path:
        folder = self.tmp / "model-copy"
        shutil.copytree(self.model, folder)
        edit(folder)
        return folder


ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))
GOOD_RECIPE = "format: int8\nsymmetric: false\ngranularity: head\n"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _symlink_to_nowhere(path: Path) -> Path:
    path.symlink_to(path.parent / "gone")
    return path


def _nan_scales(t: dict[str, torch.Tensor]) -> None:
    t["layers.1.k_scale"] = torch.full_like(t["layers.1.k_scale"], float("nan"))


def _min_above_max(t: dict[str, torch.Tensor]) -> None:
    t["layers.1.k.min"][0, 3] = t["layers.1.k.max"][0, 3] + 1.0


def _drop_layer(t: dict[str, torch.Tensor]) -> None:
    for key in [k for k in t if k.startswith("layers.1.")]:
        del t[key]


# (id, argv built from the world, exit code, text the error line must hold; {tmp} and {out} are the world's)
CASES: list[tuple[str, Callable[[World], list[str]], int, str]] = [
    # --- recipes (calibrate and solve) ---
    ("recipe-typo", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", GOOD_RECIPE + "symetric: true\n"))),
     2, "symetric: unknown key (did you mean 'symmetric'?)"),
    ("recipe-nested-typo", lambda w: ["solve", str(w.out), "--out", str(w.out), "--recipe",
                                      str(w.write("r.yaml", GOOD_RECIPE + "keys: {granularty: channel}\n"))],
     2, "keys.granularty: unknown key (did you mean 'granularity'?)"),
    ("recipe-wrong-type", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", GOOD_RECIPE.replace(
        "false", "'no'")))), 2, "symmetric: Input should be a valid boolean"),
    ("recipe-list-value", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", "format: [int8]\ngranularity: head\n"))),
     2, "format: Input should be"),
    ("recipe-duplicate-key", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", GOOD_RECIPE + "format: int4\n"))),
     2, "key 'format' is given twice (lines 1 and 4)"),
    ("recipe-huge", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", GOOD_RECIPE + "#" * (1 << 20)))),
     2, "is over 64 KiB"),
    ("recipe-alias-bomb", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", ALIAS_BOMB))), 2, "aliases"),
    ("recipe-is-jsonl-data", lambda w: w.calibrate("--recipe", str(w.write("d.jsonl", '{"text": "a"}\n{"text": "b"}\n'))),
     2, "d.jsonl"),
    ("recipe-is-parquet", lambda w: w.calibrate("--recipe", str(w.write("d.parquet", b"PAR1\x15\x04\x00\x00" * 64))),
     2, "recipe {tmp}/d.parquet"),
    ("recipe-utf16", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", GOOD_RECIPE.encode("utf-16"))))
     , 2, "is not UTF-8 text"),
    ("recipe-empty", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", ""))), 2, "r.yaml is empty"),
    ("recipe-is-folder", lambda w: w.calibrate("--recipe", str(w.tmp)), 2, "recipe {tmp} is a folder"),
    ("recipe-unreadable", lambda w: w.calibrate("--recipe", "/proc/self/mem"), 2, "recipe /proc/self/mem cannot be read"),
    ("recipe-broken-symlink", lambda w: w.calibrate("--recipe", str(_symlink_to_nowhere(w.tmp / "r.yaml"))),
     2, "r.yaml does not exist"),
    ("recipe-unknown-name", lambda w: w.calibrate("--recipe", "int3-per-head"), 2, "unknown recipe 'int3-per-head'"),
    ("recipe-unknown-observer", lambda w: w.calibrate("--recipe", str(w.write("r.yaml", GOOD_RECIPE + "observer: kl\n"))),
     2, "observer: Input should be 'minmax', 'percentile', 'mse', 'attention' or 'loss'"),
    ("recipe-percentile-without-its-observer", lambda w: w.calibrate("--recipe", str(w.write(
        "r.yaml", GOOD_RECIPE + "percentile: 99.9\n"))), 2, "percentile is an option of observer percentile"),
    ("recipe-percentile-100", lambda w: w.calibrate("--recipe", str(w.write(
        "r.yaml", GOOD_RECIPE + "observer: percentile\npercentile: 100\n"))), 2, "percentile: Input should be less than 100"),
    ("solve-mse-without-histograms", lambda w: ["solve", str(w.out), "--out", str(w.out), "--recipe", str(w.write(
        "r.yaml", GOOD_RECIPE + "observer: mse\n"))], 2, "hold no histograms"),
    ("solve-attention-without-rows", lambda w: ["solve", str(w.out), "--out", str(w.out), "--recipe", str(w.write(
        "r.yaml", GOOD_RECIPE + "observer: attention\n"))], 2, "hold no Q/K/V rows"),
    ("recipe-smooth-keys-search-nvfp4", lambda w: w.calibrate("--recipe", str(w.write(
        "r.yaml", "format: nvfp4\ngranularity: tensor\ntransforms: [{name: smooth-keys, search: true}]\n"))),
     2, "smooth-keys search cannot model nvfp4 keys"),
    ("calibrate-unknown-histograms", lambda w: w.calibrate("--histograms", "tensor"), 2, "'tensor'"),
    ("recipe-missing-file", lambda w: w.calibrate("--recipe", "nowhere/r.yaml"), 2, "nowhere/r.yaml does not exist"),
    # --- flags ---
    ("samples-zero", lambda w: w.calibrate("--samples", "0"), 2, "'--samples'"),
    ("seqlen-negative", lambda w: w.calibrate("--seqlen", "-5"), 2, "'--seqlen'"),
    ("batch-size-not-integer", lambda w: w.calibrate("--batch-size", "two"), 2, "'two'"),
    ("unknown-flag", lambda w: w.calibrate("--smaples", "3"), 2, "--smaples"),
    ("unknown-dtype", lambda w: w.calibrate("--dtype", "float8"), 2, "'float8'"),
    ("validate-top-zero", lambda w: ["validate", str(w.out), "--dataset", "pydoc", "--top", "0", *FAST], 2, "'--top'"),
    ("export-unknown-format", lambda w: ["export-scales", str(w.out), "--format", "onnx", "--out", str(w.out)],
     2, "'onnx'"),
    ("export-tp-zero", lambda w: ["export-scales", str(w.out), "--format", "sglang-json", "--tp", "0",
                                  "--out", str(w.out / "x.json")], 2, "'--tp'"),
    ("export-unknown-reduce", lambda w: ["export-scales", str(w.out), "--format", "sglang-json", "--reduce", "mean",
                                         "--out", str(w.out / "x.json")], 2, "'mean'"),
    ("solve-missing-recipe-flag", lambda w: ["solve", str(w.out), "--out", str(w.out)], 2, "--recipe"),
    # --- missing things ---
    ("missing-data-file", lambda w: w.calibrate("--dataset", "c4", "--data-files", str(w.tmp / "missing.jsonl")),
     2, "missing.jsonl"),
    ("unknown-dataset", lambda w: w.calibrate("--dataset", "c5"), 2, "unknown dataset 'c5'"),
    ("missing-model", lambda w: w.calibrate("--model", str(w.tmp / "no-model")), 2, "no-model"),
    ("missing-stats", lambda w: ["solve", str(w.tmp / "nope"), "--recipe", "int8-sym-per-head", "--out", str(w.out)],
     2, "nope"),
    ("eval-missing-scales", lambda w: ["eval", "--model", str(w.model), "--dataset", "pydoc", "--scales",
                                       str(w.tmp / "none"), *FAST], 2, "none"),
    ("eval-unknown-eval-recipe", lambda w: ["eval", "--model", str(w.model), "--dataset", "pydoc", "--recipe", "int7",
                                            "--device", "cpu", *FAST], 2, "'int7'"),
    # --- the model ---
    ("seqlen-beyond-positions", lambda w: w.calibrate("--seqlen", "1024"), 2, "--seqlen 1024"),
    ("eval-seqlen-beyond-positions", lambda w: ["eval", "--model", str(w.model), "--dataset", "pydoc", "--seqlen", "600",
                                                "--samples", "1", "--device", "cpu"], 2, "--seqlen 600"),
    ("corrupt-weights", lambda w: w.calibrate("--model", str(w.model_copy(lambda m: _truncate(m / "model.safetensors")))),
     2, "model.safetensors"),
    ("corrupt-gguf", lambda w: w.calibrate("--model", str(w.write("broken.gguf", b"GGUF" + os.urandom(4000)))),
     2, "broken.gguf"),
    ("gguf-not-gguf", lambda w: w.calibrate("--model", str(w.write("text.gguf", "hello\n" * 100))), 2, "text.gguf"),
    # --- devices: refused before any data or model is loaded (the model path does not even exist) ---
    ("device-tpu", lambda w: w.calibrate("--device", "tpu", "--model", str(w.tmp / "no-model"), "--dataset", "c5"),
     2, "--device 'tpu'"),
    ("device-gpu-word", lambda w: ["validate", str(w.out), "--device", "gpu", "--model", str(w.tmp / "no-model"),
                                   "--dataset", "c5"], 2, "--device 'gpu'"),
    ("device-cuda-7", lambda w: ["eval", "--device", "cuda:7", "--model", str(w.tmp / "no-model"), "--dataset", "c5"],
     2, "--device cuda:7"),
    # --- --out ---
    ("out-is-a-file", lambda w: w.calibrate(out=w.out / "scales.json"), 2, "scales.json"),
    ("out-under-a-file", lambda w: w.calibrate(out=w.out / "scales.json" / "sub"), 2, "scales.json"),
    ("out-read-only", lambda w: w.calibrate(out=Path("/sys/kvq-test-out")), 2, "/sys/kvq-test-out"),
    ("solve-out-is-its-own-stats", lambda w: ["solve", str(w.out / "stats.safetensors"), "--recipe", "int8-sym-per-head",
                                              "--out", str(w.out / "stats.safetensors")], 2, "stats.safetensors"),
    # --- artifacts ---
    ("stats-min-above-max", lambda w: ["solve", str(w.stats_with(_min_above_max)), "--recipe", "int8-sym-per-head",
                                       "--out", str(w.out)], 2, "min"),
    ("stats-missing-layer", lambda w: ["solve", str(w.stats_with(_drop_layer)), "--recipe", "int8-sym-per-head",
                                       "--out", str(w.out)], 2, "1 missing"),
    ("stats-empty-file", lambda w: ["solve", str(w.write("stats.safetensors", b"")), "--recipe", "int8-sym-per-head",
                                    "--out", str(w.out)], 2, "stats.safetensors"),
    ("stats-garbage", lambda w: ["solve", str(w.write("stats.safetensors", os.urandom(512))), "--recipe",
                                 "int8-sym-per-head", "--out", str(w.out)], 2, "stats.safetensors"),
    ("scales-empty-file", lambda w: ["export-scales", str(w.write("scales.safetensors", b"")), "--format", "sglang-json",
                                     "--out", str(w.out / "x.json")], 2, "scales.safetensors"),
    ("validate-nan-scales", lambda w: ["validate", str(w.scales_with(_nan_scales)), "--model", str(w.model),
                                       "--dataset", "pydoc", "--device", "cpu", *FAST, "--json", str(w.out / "v.json")],
     2, "edited-artifact"),
    ("eval-nan-scales", lambda w: ["eval", "--scales", str(w.scales_with(_nan_scales)), "--model", str(w.model),
                                   "--dataset", "pydoc", "--device", "cpu", *FAST], 2, "edited-artifact"),
    ("export-nan-scales", lambda w: ["export-scales", str(w.scales_with(_nan_scales)), "--format", "sglang-json",
                                     "--out", str(w.out / "x.json")], 2, "edited-artifact"),
    # --- data files that are not text ---
    ("data-binary", lambda w: w.calibrate("--dataset", "c4", "--data-files", str(w.write("d.txt", os.urandom(2048)))),
     2, "d.txt"),
    ("data-utf16", lambda w: w.calibrate("--dataset", "c4", "--data-files", str(w.write(
        "d.jsonl", json.dumps({"text": "some words " * 50}).encode("utf-16")))), 2, "d.jsonl"),
    ("data-broken-symlink", lambda w: w.calibrate("--dataset", "c4", "--data-files",
                                                  str(_symlink_to_nowhere(w.tmp / "d.jsonl"))), 2, "d.jsonl"),
    ("data-file-is-folder", lambda w: w.calibrate("--dataset", "c4", "--data-files", str(w.tmp)), 2, "{tmp}"),
]


@pytest.mark.parametrize("case_id, argv_of, code, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, argv_of, code, expected, tiny_llama, good_artifact, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(good_artifact, out)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    world = World(model=tiny_llama, good=good_artifact, out=out, tmp=scratch)
    argv = argv_of(world)
    before = snapshot(out)
    start = time.perf_counter()
    outcome = run_in_process(argv, capsys)
    assert_contract(outcome, code, expected.format(tmp=world.tmp, out=world.out))
    assert snapshot(out) == before, f"{case_id}: --out changed"
    if case_id.startswith("device-"):  # refused before loading: no model, no data, so it is quick
        assert time.perf_counter() - start < 5.0


def test_alias_bomb_stays_small(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(ALIAS_BOMB)  # 9**9 = 387 million strings if expanded
    tracemalloc.start()
    try:
        outcome = run_in_process(["solve", str(tmp_path), "--recipe", str(recipe), "--out", str(tmp_path / "o")], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = assert_contract(outcome, 2, "aliases")
    assert len(line) < 200 and peak < 20 * 2**20, (len(line), peak)


def test_huge_recipe_message_is_bounded(tmp_path, capsys):
    """A megabyte-long value in a small file: the line stays one bounded line."""
    recipe = tmp_path / "long.yaml"
    recipe.write_text("format: " + "x" * 60000 + "\ngranularity: head\n")
    line = assert_contract(run_in_process(["solve", str(tmp_path), "--recipe", str(recipe), "--out",
                                           str(tmp_path / "o")], capsys), 2, "format: Input should be")
    assert len(line) <= MAX_LINE


def test_no_space_left_names_the_path(capsys):
    """A real ENOSPC from the kernel (/dev/full), through the one error map."""
    from kvq.cli.error_map import handle

    with pytest.raises(OSError) as err:
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 8192)
            fh.flush()
    assert err.value.errno == errno.ENOSPC
    err.value.filename = "/dev/full"
    code = handle(err.value)
    outcome = Outcome(code, *capsys.readouterr())
    assert_contract(outcome, 1, "no space left on the device writing /dev/full")


def _kvq(*argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "KVQ_DEBUG"}
    # SIGINT handled as a shell gives it, even when this test runs in a background job (which ignores it).
    return subprocess.Popen([sys.executable, "-m", "kvq", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupted(proc: subprocess.Popen) -> Outcome:
    """Ctrl-C, pressed again (as a user would) if the first one is lost.

    CPython can lose a SIGINT that lands just before a blocking system call starts (its handler has
    run, the flag is set, and nothing checks it while ``read()`` blocks): not kvq's to fix, and a
    second Ctrl-C is what a user does. More than a few lost presses would be kvq's bug: fail then. Each press
    waits 60 s: on a loaded 2-core machine the clean stop after a Ctrl-C (releasing the model, removing temp
    files) has taken 20-30 s, and a second press during it would kill the process by the signal.
    """
    for _ in range(4):
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
            return Outcome(proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    stdout, stderr = proc.communicate()
    raise AssertionError(f"kvq did not stop after 4 Ctrl-C: {stderr[-2000:]}")


def test_ctrl_c_while_reading_the_recipe(tmp_path):
    """SIGINT while kvq is blocked reading its inputs (a FIFO recipe): exit 130, one line, nothing written."""
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = _kvq("calibrate", "--dataset", "pydoc", "--recipe", str(fifo), "--out", str(out))
    deadline = time.monotonic() + 120
    writer = None
    while writer is None and time.monotonic() < deadline:  # kvq has opened the FIFO once a writer can open it
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO and proc.poll() is None, proc.poll()
            time.sleep(0.05)
    if writer is None:
        proc.kill()
        proc.communicate()
        raise AssertionError("kvq did not open its FIFO recipe within 120 s")
    try:
        outcome = _interrupted(proc)
    finally:
        os.close(writer)
    assert_contract(outcome, 130)
    assert outcome.stderr.strip().splitlines()[-1] == "kvq: interrupted"
    assert snapshot(out) is None


@pytest.mark.parametrize("delay", [0.1, 0.5, 1.0, 2.0])
def test_ctrl_c_while_starting_up(tiny_llama, good_artifact, tmp_path, delay):
    """SIGINT at several instants of start-up (imports, model loading): exit 130, one line, the good
    artifact untouched. An interrupt that arrives inside an import is delivered once the import is done."""
    out = tmp_path / "out"
    shutil.copytree(good_artifact, out)
    before = snapshot(out)
    proc = _kvq("calibrate", "--model", str(tiny_llama), "--dataset", "pydoc", *FAST, "--device", "cpu",
                "--out", str(out), "--force")
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.skip(f"the run ended in under {delay} s")
    outcome = _interrupted(proc)
    assert_contract(outcome, 130)
    assert snapshot(out) == before


def _raised(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except BaseException as exc:  # noqa: B036 - the real exception, whatever it is, goes to the map
        return exc
    raise AssertionError("did not raise")


@pytest.mark.parametrize("action", [lambda: bytearray(2**62), lambda: torch.empty(2**42, dtype=torch.float32)],
                         ids=["MemoryError", "torch-cpu-allocator"])
def test_out_of_memory_names_the_flags_that_help(action, capsys):
    """Real allocation failures (Python's and torch's CPU allocator) through the one error map."""
    from kvq.cli.error_map import handle

    code = handle(_raised(action))
    outcome = Outcome(code, *capsys.readouterr())
    assert_contract(outcome, 1, "out of memory in main memory (CPU)")
    hint = outcome.stderr.strip().splitlines()[-1]
    assert "--batch-size" in hint and "--seqlen" in hint and "--dtype" in hint


def test_an_unexpected_exception_is_one_line_with_the_debug_hint(capsys):
    from kvq.cli.error_map import handle

    code = handle(_raised(lambda: {}["missing key"]))
    outcome = Outcome(code, *capsys.readouterr())
    assert_contract(outcome, 1, "internal error: KeyError: 'missing key'")
    assert "KVQ_DEBUG=1" in outcome.stderr
    code = handle(RuntimeError("first line " + "x" * 5000 + "\nsecond line"))  # multi-line and huge: its first line
    outcome = Outcome(code, *capsys.readouterr())
    assert_contract(outcome, 1, "internal error: RuntimeError: first line")
    assert "second line" not in outcome.stderr


# ==========================================================================================


# Issue 20, hostile files (helper b): inspect on crafted checkpoints, paths a checkpoint names, long
# --out names, plan's messages, tokenization bounded by the sample, a symbolic link as --out.
# Each fixture writes a small hostile file (a few KB); the oracle is the exit code, one line (or one
# defect) naming the file and the field, no traceback, --out untouched, and, where a number in the
# file could make kvq work without bound, the run's time and peak memory.
# =================================================================================================


from kvq.io.atomic import _HOST, TMP_SUFFIX, temp_stem  # noqa: E402

_AS_LIMIT = 6 << 30  # address space: a runaway dies here instead of taking the machine

_CHILD = """
import json, sys, time
import torch, kvq.api, kvq.cli  # before the clock: the bound is on kvq's work, not on imports
from kvq.cli import main
start = time.perf_counter()
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    json.dump({"seconds": time.perf_counter() - start}, fh)
sys.exit(code)
"""


def run_in_child(argv: list[str], tmp: Path, timeout: float = 240) -> tuple[Outcome, float, int]:
    """``kvq ARGV`` in a child process (:func:`hostile_files.run_child`): (outcome, seconds of kvq's work, peak
    RSS in bytes of that child)."""
    timing = tmp / "timing.json"
    # rich wraps at the terminal width; one defect stays on one line
    outcome, rss, _ = run_child([sys.executable, "-c", _CHILD, str(timing), *argv], timeout,
                                env={"COLUMNS": "250"}, address_space=_AS_LIMIT)
    seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else float("inf")
    return outcome, seconds, rss


def _assert_bounded(seconds: float, rss: int) -> None:
    assert seconds < SECONDS, f"{seconds:.1f} s"
    assert rss < PEAK_RSS, f"peak RSS {rss / 2**20:.0f} MiB"


def _ct_config(layers: int = 2, **override) -> dict:
    """A Llama config.json declaring a compressed-tensors FP8 per-tensor KV cache (2 KV heads x head_dim 16)."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
              "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 32, "head_dim": 16,
              "quantization_config": {"quant_method": "compressed-tensors", "kv_cache_scheme": {
                  "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}}}
    config.update(override)
    return config


def _kv_tensors(layers: int = 2) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.{r}_scale": torch.tensor([0.05 + 0.01 * i]) for i in range(layers)
            for r in "kv"}


def _checkpoint(folder: Path, config: dict | str, index: dict | str | None = None) -> Path:
    """A checkpoint folder of KV scales: config.json, model.safetensors (or the index given), hand-written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if index is None:
        save_file(_kv_tensors(), str(folder / "model.safetensors"))
    else:
        save_file(_kv_tensors(), str(folder / "scales-00001.safetensors"))
        (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


def _deep_json(levels: int = 100_000) -> str:
    return "[" * levels + "]" * levels


def _sglang_layer_key(tmp: Path) -> list[str]:
    path = tmp / "scales.json"
    path.write_text(json.dumps({"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {
        "0": {"0": 0.05, "999999999999": 0.05}}}}))
    return [str(path)]


def _lmdeploy_rank(tmp: Path) -> list[str]:
    folder = tmp / "turbomind"
    folder.mkdir()
    for rank in (0, 100_000_000):  # [k_scale, k_zp, v_scale, v_zp] as raw little-endian float32
        (folder / f"layers.0.past_kv_scale.{rank}.weight").write_bytes(
            torch.tensor([0.05, 0.0, 0.05, 0.0]).numpy().astype("<f4").tobytes())
    return [str(folder)]


def _kvq_billion_layers(tmp: Path, good: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(good / "scales.safetensors"), "pt") as fh:
        meta = dict(fh.metadata())
    meta["num_layers"] = str(10**9)
    meta.pop("cached_layers", None)  # an artifact of every layer (as before cached_layers was written)
    path = tmp / "scales.safetensors"
    save_file(load_file(str(good / "scales.safetensors")), str(path), metadata=meta)
    return [str(path)]


# (id, writer of the hostile input -> inspect argv, the defect's kind, what the one defect must name)
INSPECT_DEFECTS = [
    ("sglang-layer-key-1e12", lambda t, g: _sglang_layer_key(t), "missing-layer",
     ["layers 1..999999999998", "kv_cache.scaling_factor.0.999999999999"]),
    ("lmdeploy-rank-1e8", lambda t, g: _lmdeploy_rank(t), "config",
     ["layers.0.past_kv_scale.100000000.weight", "rank 100000000", "2 rank(s)"]),
    ("kvq-metadata-1e9-layers", _kvq_billion_layers, "missing-layer",
     ["1000000000 layers", "scales.safetensors metadata num_layers"]),
]


@pytest.mark.parametrize("case_id, write, kind, names", INSPECT_DEFECTS, ids=[c[0] for c in INSPECT_DEFECTS])
def test_inspect_bounds_its_work_by_what_the_file_holds(case_id, write, kind, names, good_artifact, tmp_path):
    """A count or index stated in a file is checked against what the file holds: one defect, bounded work."""
    argv = ["inspect", *write(tmp_path, good_artifact), "--json", str(tmp_path / "report.json")]
    outcome, seconds, rss = run_in_child(argv, tmp_path)
    assert outcome.code == 1, outcome.stderr[-2000:]  # inspect: 1 = defects found
    assert "Traceback" not in outcome.stdout + outcome.stderr
    _assert_bounded(seconds, rss)
    defects = json.loads((tmp_path / "report.json").read_text())["defects"]
    assert len(defects) <= 4, defects
    hits = [d for d in defects if d["kind"] == kind and all(n in d["message"] for n in names)]
    assert hits, defects
    assert len(outcome.stdout.splitlines()) < 80  # the console report is as small as the file


def _nested(tmp: Path, good: Path, where: str) -> list[str]:
    if where == "sglang-json":
        path = tmp / "scales.json"
        path.write_text('{"kv_cache": ' + _deep_json() + "}")
        return [str(path)]
    if where == "config.json":
        return [str(_checkpoint(tmp / "ckpt", '{"num_hidden_layers": ' + _deep_json() + "}"))]
    if where == "index.json":
        return [str(_checkpoint(tmp / "ckpt", _ct_config(), '{"weight_map": ' + _deep_json() + "}"))]
    from safetensors import safe_open

    with safe_open(str(good / "scales.safetensors"), "pt") as fh:  # kvq metadata: the recipe
        meta = dict(fh.metadata())
    meta["recipe"] = _deep_json()
    path = tmp / "scales.safetensors"
    save_file(load_file(str(good / "scales.safetensors")), str(path), metadata=meta)
    return [str(path)]


@pytest.mark.parametrize("where, expected", [
    ("sglang-json", "scales.json does not parse"), ("config.json", "config.json does not parse"),
    ("index.json", "model.safetensors.index.json does not parse"), ("kvq-metadata", "recipe metadata does not parse"),
])
def test_inspect_deeply_nested_json_does_not_parse(where, expected, good_artifact, tmp_path, capsys):
    """10^5 levels of nesting: "does not parse", exit 2, not an internal RecursionError."""
    argv = ["inspect", *_nested(tmp_path, good_artifact, where)]
    line = assert_contract(run_in_process(argv, capsys), 2, expected)
    assert "nested too deeply" in line


@pytest.mark.parametrize("target", ["../outside.safetensors", "{abs}"], ids=["dotdot", "absolute"])
def test_inspect_reports_an_index_path_outside_the_checkpoint_and_never_reads_it(target, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"  # a real file with a KV scale: read, it would show in the report
    save_file({"model.layers.1.self_attn.v_scale": torch.tensor([123.0])}, str(outside))
    name = target.format(abs=outside)
    weight_map = {n: "scales-00001.safetensors" for n in _kv_tensors()}
    weight_map["model.layers.1.self_attn.v_scale"] = name
    ckpt = _checkpoint(tmp_path / "ckpt", _ct_config(), {"weight_map": weight_map})
    outcome = run_in_process(["inspect", str(ckpt), "--json", str(tmp_path / "r.json")], capsys)
    assert outcome.code == 1 and "Traceback" not in outcome.stdout + outcome.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    outside_defects = [d for d in report["defects"] if "weight_map" in d["message"] and repr(name) in d["message"]]
    assert [d["tensor"] for d in outside_defects] == ["model.safetensors.index.json"], report["defects"]
    assert all(t["values"] != [123.0] for t in report["tensors"])  # never opened
    assert {t["file"] for t in report["tensors"]} == {"scales-00001.safetensors"}


def _model_with_index(tiny_llama: Path, folder: Path, target: str) -> Path:
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": target}}))
    (folder / "model.safetensors").unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("command", ["calibrate", "export-scales"])
def test_a_model_whose_index_leaves_its_folder_is_refused(command, tiny_llama, good_artifact, tmp_path, capsys):
    model = _model_with_index(tiny_llama, tmp_path / "model", "/etc/hostname")
    out = tmp_path / "out"
    shutil.copytree(good_artifact, out)
    before = snapshot(out)
    if command == "calibrate":
        argv = ["calibrate", "--model", str(model), "--dataset", "pydoc", *FAST, "--device", "cpu", "--out", str(out)]
    else:  # vllm writes a whole checkpoint around the model's files (read through its index): fp8 scales
        fp8 = tmp_path / "fp8"
        assert run_in_process(["solve", str(good_artifact), "--recipe", "fp8-e4m3-per-tensor", "--out", str(fp8)],
                              capsys).code == 0
        argv = ["export-scales", str(fp8), "--format", "vllm", "--model", str(model), "--out", str(out)]
    assert_contract(run_in_process(argv, capsys), 2, "weight_map points to '/etc/hostname', outside the")
    assert snapshot(out) == before


@pytest.mark.parametrize("key, value", [("num_hidden_layers", -5), ("num_key_value_heads", 0),
                                        ("head_dim", 2.5), ("num_attention_heads", True)])
def test_impossible_config_counts_are_a_config_error_naming_the_key(key, value, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt", _ct_config(**{key: value}))
    line = assert_contract(run_in_process(["inspect", str(ckpt)], capsys), 2, f"config.json: {key} is {value}")
    assert "a whole number from 1 to" in line


def test_calibrate_refuses_a_model_config_with_impossible_counts(tiny_llama, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["num_key_value_heads"] = 0
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = ["calibrate", "--model", str(model), "--dataset", "pydoc", *FAST, "--device", "cpu", "--out", str(out)]
    assert_contract(run_in_process(argv, capsys), 2, "num_key_value_heads is 0")
    assert snapshot(out) is None


def test_a_model_config_stating_a_billion_kv_heads_bounds_nothing(tiny_llama, good_artifact, tmp_path, capsys):
    """export-scales --model reads the model's counts: a config stating 10**9 KV heads is refused before any
    loop over them (the bound, 65536, comes from no file)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["num_key_value_heads"] = 10**9
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = ["export-scales", str(good_artifact), "--format", "vllm", "--model", str(model), "--out", str(out)]
    outcome, peak, _ = run_bounded(argv)
    assert_contract(outcome, 2, "num_key_value_heads is 1000000000")
    assert peak < PEAK_RSS and snapshot(out) is None


@pytest.mark.parametrize("name", ["x" * 240, "模" * 80], ids=["240-ascii", "80-cjk"])
def test_a_long_legal_out_name_works_and_its_stale_temporaries_are_found(name, good_artifact, tmp_path, capsys):
    """A 240-byte --out name: the temporary name stays within 255 bytes; a killed run's temporary is removed."""
    assert len(name.encode()) == 240
    out = tmp_path / name
    stale = tmp_path / f".{temp_stem(name)}.{_HOST}.999999999.abcd0123.new{TMP_SUFFIX}"
    stale.mkdir()  # a run with a dead pid left it
    outcome = run_in_process(["solve", str(good_artifact), "--recipe", "int8-sym-per-head", "--out", str(out)], capsys)
    assert outcome.code == 0, outcome.stderr
    assert (out / "scales.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the stale temporary gone, no new one left
    assert len(os.fsencode(stale.name)) <= 255


def test_a_name_too_long_keeps_the_reason_and_shortens_the_path(good_artifact, tmp_path, capsys):
    """A 300-byte name is illegal: the one line keeps "File name too long", the path is cut in the middle."""
    (tmp_path / ("z" * 200)).mkdir()
    out = tmp_path / ("z" * 200) / ("y" * 300)  # the path alone is longer than the line may be
    line = assert_contract(run_in_process(["solve", str(good_artifact), "--recipe", "int8-sym-per-head", "--out",
                                           str(out)], capsys), 2, "File name too long")
    assert "..." in line and str(tmp_path)[:20] in line and line.endswith("y")  # the path cut in the middle
    assert list(out.parent.iterdir()) == []  # nothing written, no temporary left


def test_plan_on_a_read_only_artifact_names_the_artifact_not_out(tiny_llama, good_artifact, tmp_path, capsys,
                                                                 monkeypatch):
    """Tests run as root here, so the read-only folder is the kernel's answer played back: EACCES on mkdir."""
    art = tmp_path / "art"
    shutil.copytree(good_artifact, art)
    before = snapshot(art)
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).endswith(TMP_SUFFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    argv = ["plan", str(art), "--model", str(tiny_llama), "--dataset", "pydoc", "--skip", "1", "--samples", "1",
            "--seqlen", "16", "--device", "cpu"]
    outcome = run_in_process(argv, capsys)
    line = assert_contract(outcome, 2, f"cannot write ARTIFACT {art}")
    assert "--out" not in outcome.stderr, outcome.stderr
    assert "Permission denied" in line
    assert snapshot(art) == before


def test_a_ten_megabyte_line_is_tokenized_only_as_far_as_the_sample(tiny_llama, tmp_path):
    """One 10 MB line (one document) for one 64-token sample: seconds and well under 1 GB, not 73 s and 1.7 GB."""
    text = tmp_path / "one-line.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 240_000)  # 10.8 MB, no newline
    out = tmp_path / "out"
    argv = ["calibrate", "--model", str(tiny_llama), "--dataset", str(text), "--samples", "1", "--seqlen", "64",
            "--device", "cpu", "--out", str(out)]
    outcome, seconds, rss = run_in_child(argv, tmp_path)
    assert outcome.code == 0, outcome.stderr[-2000:]
    _assert_bounded(seconds, rss)
    from kvq.artifacts.stats import KVStats

    stats = KVStats.load(out / "stats.safetensors")
    assert (int(stats.metadata["samples"]), int(stats.metadata["tokens"])) == (1, 64)  # one full 64-token sample


def test_a_symbolic_link_as_out_writes_into_its_target_and_says_so(good_artifact, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    argv = ["solve", str(good_artifact), "--recipe", "int8-sym-per-head", "--out", str(link)]
    outcome = run_in_process(argv, capsys)
    assert outcome.code == 0, outcome.stderr
    assert link.is_symlink() and (target / "scales.safetensors").is_file()
    assert f"written into {target}" in " ".join(outcome.stdout.split())
    (target / "notes.txt").write_text("mine")  # the target now holds another file: --force means what it means
    before = snapshot(target)
    assert_contract(run_in_process(argv, capsys), 2, "notes.txt")
    assert snapshot(target) == before
    assert run_in_process([*argv, "--force"], capsys).code == 0
    assert link.is_symlink() and not (target / "notes.txt").exists()
# --- hostile files (issue 20): a partial that kvq did not write as it is, counts and nesting stated in a file ---

PARTIAL_RUN = ("int8-asym-per-head", 6, 16)  # recipe, samples, seqlen of the interrupted run


@pytest.fixture(scope="module")
def good_partial(tiny_llama, tmp_path_factory) -> Path:
    """An --out holding the partial statistics kvq saves on Ctrl-C after 2 of 6 samples."""
    recipe, samples, seqlen = PARTIAL_RUN
    out = tmp_path_factory.mktemp("partial") / "out"
    write_partial(tiny_llama, out, recipe, samples, seqlen, after=2)
    return out


def _resume(model: Path, out: Path) -> list[str]:
    recipe, samples, seqlen = PARTIAL_RUN
    return ["calibrate", "--model", str(model), "--dataset", "pydoc", "--samples", str(samples), "--seqlen",
            str(seqlen), "--device", "cpu", "--recipe", recipe, "--out", str(out), "--resume"]


def _tokens_plus_one(path: Path) -> None:
    _, meta = read(path)
    tokens = json.loads(meta["layer_tokens"])
    rewrite(path, layer_tokens=json.dumps([tokens[0] + 1, *tokens[1:]]))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors, _ = read(path)
    edit(tensors)
    rewrite(path, tensors)


def _narrower(t: dict[str, torch.Tensor]) -> None:  # every statistic one channel short, consistently
    for key in t:
        t[key] = t[key][:, :-1].contiguous()


def _half_precision(t: dict[str, torch.Tensor]) -> None:
    t["layers.0.k.min"] = t["layers.0.k.min"].half()


TAMPERED: list[tuple[str, Callable[[Path], object], str]] = [
    ("done-99", lambda p: rewrite(p, **{"partial.done": "99"}), "partial.done='99' is not a sample count in 1..6"),
    ("done-negative", lambda p: rewrite(p, **{"partial.done": "-1"}), "partial.done='-1'"),
    ("done-not-a-number", lambda p: rewrite(p, **{"partial.done": "abc"}), "partial.done='abc'"),
    ("done-missing", lambda p: rewrite(p, **{"partial.done": None}), "lack the metadata partial.done"),
    ("done-disagrees-with-tokens", lambda p: rewrite(p, **{"partial.done": "1"}), "layer_tokens gives layer 0"),
    ("token-count-disagrees", _tokens_plus_one, "layer_tokens gives layer 0"),
    ("layer-tokens-missing", lambda p: rewrite(p, layer_tokens=None), "lack the metadata layer_tokens"),
    ("tensor-shape", lambda p: _edit_tensors(p, _narrower), "layers.0.k.min is (2, 15)"),
    ("tensor-dtype", lambda p: _edit_tensors(p, _half_precision), "layers.0.k.min is float16"),
    ("layer-missing", lambda p: _edit_tensors(p, _drop_layer), "layer(s) 1 missing"),
    ("layer-tokens-nested", lambda p: rewrite(p, layer_tokens=NESTED), "metadata layer_tokens does not parse"),
    ("fingerprint-missing", lambda p: rewrite(p, **{"partial.samples": None}), "lack the metadata partial.samples"),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_resume_refuses_a_tampered_partial(edit, expected, tiny_llama, good_partial, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(good_partial, out)
    edit(out / PARTIAL_FILE)
    before = snapshot(out)
    start = time.perf_counter()
    line = assert_contract(run_in_process(_resume(tiny_llama, out), capsys), 2, expected)
    assert str(out / PARTIAL_FILE) in line
    assert snapshot(out) == before and not (out / "stats.safetensors").exists()  # no artifact from it
    assert time.perf_counter() - start < SECONDS


def test_resume_continues_the_partial_kvq_wrote(tiny_llama, good_partial, tmp_path, capsys):
    """The checks refuse nothing kvq writes: the untouched partial resumes (tests/calibrate/test_resume.py checks
    the bytes), and the artifact counts the tokens of all 6 samples."""
    out = tmp_path / "out"
    shutil.copytree(good_partial, out)
    assert run_in_process(_resume(tiny_llama, out), capsys).code == 0
    _, meta = read(out / "stats.safetensors")
    assert meta["samples"] == "6" and not (out / PARTIAL_FILE).exists()


def _moved_layer(t: dict[str, torch.Tensor]) -> None:  # layer 2 renamed layer 999999999 (no num_layers stated)
    for key in [k for k in t if k.startswith("layers.2.")]:
        t[key.replace("layers.2.", "layers.999999999.")] = t.pop(key)


# (id, file edited in the artifact, its new metadata (None drops a key), tensor edit, text the error line must hold)
STATED_COUNTS: list[tuple[str, str, dict[str, str | None], Callable | None, str]] = [
    ("stats-num-layers-1e9", "stats", {"num_layers": "1000000000"}, None, "metadata num_layers='1000000000' is not"),
    ("stats-num-layers-float", "stats", {"num_layers": "1e9"}, None, "metadata num_layers='1e9' is not a count"),
    ("stats-num-kv-heads-negative", "stats", {"num_kv_heads": "-4"}, None, "metadata num_kv_heads='-4' is not"),
    ("stats-head-dim-disagrees", "stats", {"head_dim": "4096"}, None,
     "metadata head_dim=4096, but layers.0.k.min is (2, 16)"),
    ("stats-tokens-not-a-count", "stats", {"layer_tokens": None, "tokens": "abc"}, None, "metadata tokens='abc'"),
    ("stats-layer-index-1e9", "stats", {"num_layers": None}, _moved_layer, "layer(s) 2, 3, 4, 5, 6, 7, 8, 9 ..."),
    ("scales-num-layers-1e9", "scales", {"num_layers": "1000000000"}, None, "metadata num_layers='1000000000' is"),
    ("scales-num-layers-stated-65536", "scales", {"num_layers": "65536", "cached_layers": None}, None,
     "layer(s) 3, 4, 5, 6, 7, 8, 9, 10 ... (65533 in all) missing"),
    ("scales-num-kv-heads-1e9", "scales", {"num_kv_heads": "999999999"}, None, "metadata num_kv_heads='999999999'"),
    ("scales-head-dim-negative", "scales", {"head_dim": "-128"}, None, "metadata head_dim='-128' is not"),
    ("scales-num-kv-heads-disagrees", "scales", {"num_kv_heads": "64"}, None,
     "metadata num_kv_heads=64, but layers.0.k_scale is (2,)"),
    ("scales-layer-index-1e9", "scales", {"num_layers": None}, _moved_layer, "layer(s) 2, 3, 4, 5, 6, 7, 8, 9 ..."),
]


@pytest.mark.parametrize("which, meta, edit, expected", [c[1:] for c in STATED_COUNTS], ids=[c[0] for c in STATED_COUNTS])
def test_a_count_stated_in_a_file_bounds_nothing(which, meta, edit, expected, good_artifact, tmp_path):
    """A few-KB file whose metadata (or a tensor name) states a billion layers, heads or channels: refused by
    ``solve`` (statistics) and ``export-scales`` (scales) in bounded time and memory, naming the file and field."""
    artifact = tmp_path / "artifact"
    shutil.copytree(good_artifact, artifact)
    path = artifact / f"{which}.safetensors"
    tensors = None
    if edit is not None:
        tensors, _ = read(path)
        edit(tensors)
    rewrite(path, tensors, **meta)
    assert path.stat().st_size < 1 << 20
    out = tmp_path / "out"
    shutil.copytree(good_artifact, out)
    before = snapshot(out)
    argv = (["solve", str(path), "--recipe", "int8-sym-per-head", "--out", str(out), "--force"] if which == "stats"
            else ["export-scales", str(artifact), "--format", "sglang-json", "--out", str(out / "x.json")])
    outcome, peak, _ = run_bounded(argv)
    line = assert_contract(outcome, 2, expected)
    assert str(path) in line
    assert snapshot(out) == before
    assert peak < PEAK_RSS, peak


def _nested_copy(good: Path, tmp: Path, name: str, **meta: str) -> Path:
    """A copy of the good artifact whose ``name`` file has JSON nested 10^5 deep: the file itself (a JSON file),
    or the metadata keys ``meta`` (a safetensors file)."""
    folder = tmp / "nested"
    shutil.copytree(good, folder)
    if meta:
        rewrite(folder / name, **meta)
    else:
        (folder / name).write_text(NESTED)
    return folder


def _model_with_nested_config(model: Path, tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(model, folder)
    (folder / "config.json").write_text(NESTED)
    return folder


# (id, argv built from (model, good artifact, scratch folder, --out), text the error line must hold)
NESTED_JSON: list[tuple[str, Callable[[Path, Path, Path, Path], list[str]], str]] = [
    ("stats-layer-tokens", lambda m, g, t, o: ["solve", str(_nested_copy(g, t, "stats.safetensors",
                                               layer_tokens=NESTED)), "--recipe", "int8-sym-per-head", "--out", str(o)],
     "metadata layer_tokens does not parse"),
    ("stats-reservoir", lambda m, g, t, o: ["solve", str(_nested_copy(g, t, "stats.safetensors", reservoir=NESTED)),
                                            "--recipe", "int8-sym-per-head", "--out", str(o)],
     "metadata reservoir does not parse"),
    ("scales-recipe-metadata", lambda m, g, t, o: ["export-scales", str(_nested_copy(g, t, "scales.safetensors",
                                                   recipe=NESTED)), "--format", "sglang-json", "--out", str(o / "x.json")],
     "its recipe metadata is not a valid kvq recipe"),
    ("export-model-config", lambda m, g, t, o: ["export-scales", str(g), "--format", "vllm", "--model",
                                                str(_model_with_nested_config(m, t)), "--out", str(o / "v")],
     "its config does not parse"),
    ("calibrate-model-config", lambda m, g, t, o: ["calibrate", "--model", str(_model_with_nested_config(m, t)),
                                                   "--dataset", "pydoc", *FAST, "--device", "cpu", "--out", str(o)],
     "its config does not parse"),
    ("report-eval", lambda m, g, t, o: ["report", str(o), "--eval", str(_nested_copy(g, t, "e.json") / "e.json")],
     "e.json does not parse"),
    ("eval-plan", lambda m, g, t, o: ["eval", "--plan", str(_nested_copy(g, t, "plan.json")), "--model", str(m),
                                      "--dataset", "pydoc", "--device", "cpu", *FAST], "plan.json does not parse"),
]


@pytest.mark.parametrize("argv_of, expected", [c[1:] for c in NESTED_JSON], ids=[c[0] for c in NESTED_JSON])
def test_deeply_nested_json_is_bad_input(argv_of, expected, tiny_llama, good_artifact, tmp_path, capsys):
    """JSON nested 10^5 levels deep (200 KB) wherever kvq reads JSON: exit 2 naming the file, not an internal
    RecursionError."""
    out = tmp_path / "out"
    shutil.copytree(good_artifact, out)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = argv_of(tiny_llama, good_artifact, scratch, out)
    before = snapshot(out), snapshot(scratch)
    start = time.perf_counter()
    assert_contract(run_in_process(argv, capsys), 2, expected)
    assert (snapshot(out), snapshot(scratch)) == before
    assert time.perf_counter() - start < SECONDS


def test_deeply_nested_json_in_exports_and_metadata(tmp_path):
    """The readers the CLI cases above do not reach: a TensorRT-LLM checkpoint's config.json, a safetensors
    index, a ModelOpt hf_quant_config.json (refused, naming the file), and the calibration data record of
    scales' metadata (only ever a warning's input: it records nothing), an existing --out file (not kvq's)."""
    from kvq.errors import UsageError
    from kvq.evaluation.preflight import calibration_files
    from kvq.export.checkpoint_folder import INDEX, read_weights
    from kvq.export.model_check import ModelFiles
    from kvq.export.modelopt import HF_QUANT_CONFIG, _hf_quant_config
    from kvq.export.trtllm import _checkpoint_config
    from kvq.io.out_policy import check_file_out

    for name in ("config.json", INDEX, HF_QUANT_CONFIG):
        (tmp_path / name).write_text(NESTED)
    files = ModelFiles(tmp_path, {})
    for name, read_it in (("config.json", lambda: _checkpoint_config(tmp_path, None, 1)),
                          (INDEX, lambda: read_weights(files)), (HF_QUANT_CONFIG, lambda: _hf_quant_config(files, "FP8"))):
        with pytest.raises(UsageError, match="does not parse") as err:
            read_it()
        assert name in err.value.message
    assert calibration_files({"data_files": NESTED}) == [] and calibration_files({"data_files": "5"}) == []
    with pytest.raises(UsageError, match="existing file of another kind"):  # an --out file: not a kvq JSON
        check_file_out(tmp_path / "config.json", b'{"kvq_version": "x"}', False, "--out")
