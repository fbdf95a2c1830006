"""The command line: artifacts, `kvq solve` == `kvq calibrate`, one-line errors and exit codes."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from kvq.cli import main


def read_safetensors(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def calibrate_args(model, data, out, *extra, **replace):
    flags = {"--model": str(model), "--dataset": "c4", "--data-files": str(data), "--samples": "3",
             "--seqlen": "32", "--out": str(out)}
    flags.update(replace)
    return ["calibrate", *(x for kv in flags.items() for x in kv), *extra]


@pytest.fixture
def c4_file(tmp_path):
    """A small C4-shaped jsonl ({"text": ...} per line) made here: these tests need no corpus."""
    from kvq.data import load_documents

    docs = [d.text for d in load_documents("pydoc").documents[:8]]
    path = tmp_path / "c4-like.jsonl"
    path.write_text("".join(json.dumps({"text": t, "url": f"doc{i}"}) + "\n" for i, t in enumerate(docs)))
    return path


def test_calibrate_writes_the_artifacts(tiny_llama, c4_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(calibrate_args(tiny_llama, c4_file, out, "--recipe", "int8-asym-per-channel", "--batch-size", "2")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scales.json", "scales.safetensors", "stats.safetensors"]
    stats, meta = read_safetensors(out / "stats.safetensors")
    assert len(stats) == 3 * 6 and stats["layers.2.v.absmax"].shape == (2, 16)
    assert all(t.dtype == torch.float32 for t in stats.values())
    for key in ("model", "config_hash", "dataset", "data_files", "samples", "seqlen", "seed", "tokens", "dtype",
                "capture_point", "kvq_version"):
        assert key in meta, key
    assert meta["samples"] == "3" and meta["seqlen"] == "32" and meta["dataset"] == "c4"
    assert json.loads(meta["data_files"])[0]["sha256"] == hashlib.sha256(c4_file.read_bytes()).hexdigest()
    scales, smeta = read_safetensors(out / "scales.safetensors")
    assert scales["layers.0.k_scale"].shape == (2, 16) and scales["layers.0.k_zero_point"].dtype == torch.int32
    assert json.loads(smeta["recipe"])["name"] == "int8-asym-per-channel"
    doc = json.loads((out / "scales.json").read_text())
    assert doc["layers"]["1"]["v_scale"] == scales["layers.1.v_scale"].tolist()
    assert doc["metadata"]["tokens"] == meta["tokens"]
    assert "kvq calibration" in capsys.readouterr().out


@pytest.mark.parametrize("histograms", [[], ["--histograms", "head"], ["--histograms", "channel"]])
def test_solve_on_saved_stats_equals_calibrate(tiny_llama, c4_file, tmp_path, histograms):
    """docs/artifacts.md: the same tensors, metadata and scales.json, with or without histograms in the statistics."""
    cal, solved = tmp_path / "cal", tmp_path / "solved"
    assert main(calibrate_args(tiny_llama, c4_file, cal, "--recipe", "int4-asym-per-head", *histograms)) == 0
    assert main(["solve", str(cal / "stats.safetensors"), "--recipe", "int4-asym-per-head", "--out", str(solved)]) == 0
    a, a_meta = read_safetensors(cal / "scales.safetensors")
    b, b_meta = read_safetensors(solved / "scales.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a_meta == b_meta
    assert (cal / "scales.json").read_bytes() == (solved / "scales.json").read_bytes()


def one_line_error(capsys, code, argv, expected):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    err = err[next(i for i, line in enumerate(err) if line.startswith("kvq: error: ")):]  # after any progress bar
    assert expected in err[0], err
    assert len(err) <= 2 and (len(err) == 1 or err[1].startswith("  hint: "))


@pytest.mark.parametrize(
    "argv_tail, expected",
    [
        ({"--recipe": "int3-per-head"}, "unknown recipe 'int3-per-head'"),
        ({"--samples": "0"}, "Invalid value for '--samples': Input should be greater than or equal to 1 (got '0')"),
        ({"--dataset": "c5", "--data-files": None}, "unknown dataset 'c5'"),
        ({"--data-files": "missing.jsonl"}, "Invalid value for '--data-files': path 'missing.jsonl' does not exist"),
        ({"--model": "no/such/dir/"}, "model path no/such/dir/ does not exist"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(tiny_llama, c4_file, tmp_path, capsys, argv_tail, expected):
    out = tmp_path / "out"
    argv = calibrate_args(tiny_llama, c4_file, out, **{k: v for k, v in argv_tail.items() if v is not None})
    if "--data-files" in argv_tail and argv_tail["--data-files"] is None:
        i = argv.index("--data-files")
        del argv[i : i + 2]
    one_line_error(capsys, 2, argv, expected)
    assert not out.exists()


def test_bad_recipe_file_exits_2(tiny_llama, c4_file, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("format: fp8_e4m3\nsymmetric: false\ngranularity: tensor\n")
    out = tmp_path / "out"
    one_line_error(capsys, 2, calibrate_args(tiny_llama, c4_file, out, "--recipe", str(recipe)),
                   f"recipe {recipe}: (top level): format fp8_e4m3 is symmetric by construction")
    assert not out.exists()


def test_failure_exits_1_and_writes_nothing(tiny_llama, tmp_path, c4_file, capsys):
    from tiny_models import with_nan_projection

    broken = with_nan_projection(tiny_llama, tmp_path / "nan-model", 2, "v_proj")
    out = tmp_path / "out"
    one_line_error(capsys, 1, calibrate_args(broken, c4_file, out), "layer 2: V holds NaN or inf (batch 0)")
    assert not out.exists()


def test_model_without_attention_is_refused(tmp_path, c4_file, capsys):
    from transformers import AutoModelForCausalLM, MambaConfig

    AutoModelForCausalLM.from_config(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1)).save_pretrained(
        tmp_path / "mamba")
    one_line_error(capsys, 2, calibrate_args(tmp_path / "mamba", c4_file, tmp_path / "out"),
                   "model type 'mamba' has no attention layers")


def test_solve_errors(tmp_path, capsys):
    one_line_error(capsys, 2, ["solve", str(tmp_path / "nope"), "--recipe", "int8-sym-per-head", "--out", str(tmp_path)],
                   f"Invalid value for 'STATS': path '{tmp_path / 'nope'}' does not exist")
    one_line_error(capsys, 2, ["solve", str(tmp_path), "--out", str(tmp_path)], "Missing option '--recipe'")


def test_debug_variable_shows_the_traceback(tmp_path):
    env = {"KVQ_DEBUG": "1", "PATH": "", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kvq", "solve", str(tmp_path), "--recipe", "int3",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "kvq: error: unknown recipe 'int3'" in proc.stderr


def test_debug_traceback_keeps_the_cause_chain(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("format: int8\ngranularity: head\nformat: int4\n")
    env = {"KVQ_DEBUG": "1", "PATH": "", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kvq", "solve", str(tmp_path), "--recipe", str(recipe),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    # the frame where it really failed (PyYAML's constructor), then kvq's message: not `from None`
    assert "yaml.constructor.ConstructorError" in proc.stderr and "direct cause" in proc.stderr
    assert proc.stderr.strip().splitlines()[-2].startswith("kvq: error: recipe ")


def test_help_and_version_come_from_typer():
    out = subprocess.run([sys.executable, "-m", "kvq", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("calibrate", "solve", "validate", "eval", "export-scales"):
        assert command in out.stdout
    version = subprocess.run([sys.executable, "-m", "kvq", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip().startswith("kvq ")
    # `kvq --help` must not pay for torch: the commands import it in their bodies
    probe = subprocess.run([sys.executable, "-c", "import sys; from kvq.cli import main; main(['--help']); "
                            "print('torch' in sys.modules, 'transformers' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip().splitlines()[-1] == "False False", probe.stdout[-500:]


def test_several_data_files_after_one_flag(tmp_path):
    from kvq.cli.params import spread_values

    assert spread_values(["calibrate", "--data-files", "a", "b", "c", "--samples", "3"]) == [
        "calibrate", "--data-files", "a", "--data-files", "b", "--data-files", "c", "--samples", "3"]
    assert spread_values(["--data-files", "a", "--data-files", "b"]) == ["--data-files", "a", "--data-files", "b"]
    assert spread_values(["--data-files=a", "b"]) == ["--data-files=a", "b"]
    assert spread_values(["--data-files", "a", "--", "b"]) == ["--data-files", "a", "--", "b"]


def test_force_never_replaces_what_the_command_reads(tiny_llama, c4_file, tmp_path, capsys):
    """--force replaces a folder of other files, never the recipe, the model or the data the run reads."""
    from bad_input import snapshot

    out = tmp_path / "out"
    assert main(calibrate_args(tiny_llama, c4_file, out)) == 0
    recipe = out / "mine.yaml"
    recipe.write_text("format: int8\ngranularity: head\n")
    before = snapshot(out)
    argv = ["solve", str(out), "--recipe", str(recipe), "--out", str(out), "--force"]
    assert main(argv) == 2 and "mine.yaml, which this command reads" in capsys.readouterr().err
    assert snapshot(out) == before
    model_before = snapshot(tiny_llama)
    assert main(calibrate_args(tiny_llama, c4_file, tiny_llama, "--force")) == 2
    assert "which this command reads from" in capsys.readouterr().err
    assert main(calibrate_args(tiny_llama, c4_file, tiny_llama / "sub", "--force")) == 2
    assert snapshot(tiny_llama) == model_before


def test_a_report_path_of_another_kind_is_refused_before_the_model_runs(tiny_llama, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"mine": 1}\n')
    code = main(["eval", "--model", str(tmp_path / "no-such-model"), "--dataset", "pydoc", "--samples", "1",
                 "--seqlen", "32", "--device", "cpu", "--json", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "is an existing file of another kind" in err  # not "model path ... does not exist"
    assert other.read_text() == '{"mine": 1}\n'
