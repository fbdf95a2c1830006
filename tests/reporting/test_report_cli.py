"""`kvq report` on the command line: a report from a real (tiny) calibration, and the one-line error contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report_helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bad_input
from bad_input import assert_contract, run_in_process, snapshot  # noqa: E402
from report_helpers import even_absmax, png_size, stats_from, validation_json, write_json  # noqa: E402


@pytest.fixture
def artifact(tmp_path) -> Path:
    folder = tmp_path / "art"
    stats_from(even_absmax()).save(folder)
    return folder


def test_report_of_a_tiny_calibration(tiny_llama, tmp_path, capsys):
    from kvq.calibration import CalibrationConfig, run_calibration
    from kvq.data.data_spec import DataSpec
    from kvq.model.model_spec import ModelSpec
    from kvq.recipe.schema import load_recipe

    cfg = CalibrationConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), samples=2, seqlen=32, histograms="head")
    run_calibration(cfg, load_recipe("int8-asym-per-head"), tmp_path / "cal")
    out = run_in_process(["report", str(tmp_path / "cal")], capsys)
    assert out.code == 0, out.stderr
    report = tmp_path / "cal" / "report"
    config = json.loads((tiny_llama / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert png_size(report / "absmax.png") == (1000, round(100 * max(4.0, 1.5 + 0.25 * layers)))
    assert (report / "subnormal.png").is_file() and (report / "scales.png").is_file()
    figures = json.loads((report / "figures.json").read_text())["figures"]
    absmax = next(f for f in figures if f["file"] == "absmax.png")
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    assert absmax["axes"][0]["images"] == [[layers, heads]]
    assert "report.html" in out.stdout
    # the report belongs to the artifact: a new calibration into the folder needs no --force and drops it
    # (drawn from the old scales), and `kvq calibrate --report` draws a new one
    again = run_in_process(["calibrate", "--model", str(tiny_llama), "--dataset", "pydoc", "--samples", "2",
                            "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path / "cal")], capsys)
    assert again.code == 0, again.stderr
    assert not report.exists()
    third = run_in_process(["calibrate", "--model", str(tiny_llama), "--dataset", "pydoc", "--samples", "2",
                            "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path / "cal"), "--report"], capsys)
    assert third.code == 0, third.stderr
    assert (report / "report.html").is_file() and (report / "absmax.png").is_file()


def test_no_statistics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_contract(run_in_process(["report", str(tmp_path / "empty")], capsys), 2, "holds no stats.safetensors")
    assert snapshot(tmp_path / "empty") == {}


@pytest.mark.parametrize(("content", "expected"), [
    (b"{not json", "is not JSON"),
    (b"\xff\xfe\x00", "is not JSON"),
    (json.dumps({"kvq_version": "0.1.0", "report": "eval", "rows": []}).encode(), "is a kvq eval report, not a kvq "
     "validate report"),
    (json.dumps([1, 2]).encode(), "is not a kvq report"),
])
def test_bad_validation_file_leaves_the_previous_report(artifact, tmp_path, capsys, content, expected):
    assert run_in_process(["report", str(artifact)], capsys).code == 0
    before = snapshot(artifact)
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    assert_contract(run_in_process(["report", str(artifact), "--validation", str(bad)], capsys), 2, expected)
    assert snapshot(artifact) == before


def test_report_of_another_model_shape(artifact, tmp_path, capsys):
    other = write_json(tmp_path / "v.json", validation_json({}, layers=7))
    assert_contract(run_in_process(["report", str(artifact), "--validation", str(other)], capsys), 2, "num_layers 7")


def test_malformed_eval_row(artifact, tmp_path, capsys):
    data = {"kvq_version": "x", "report": "eval", "model": {"num_layers": 5, "num_kv_heads": 4, "head_dim": 8},
            "rows": [{"name": "a", "kind": "static", "delta_pct": "much"}]}
    bad = write_json(tmp_path / "e.json", data)
    assert_contract(run_in_process(["report", str(artifact), "--eval", str(bad)], capsys), 2, "rows[0]")
    assert not (artifact / "report").exists()


def test_report_folder_holding_other_files_needs_force(artifact, capsys):
    (artifact / "report").mkdir()
    (artifact / "report" / "notes.txt").write_text("mine")
    assert_contract(run_in_process(["report", str(artifact)], capsys), 2, "notes.txt")
    assert (artifact / "report" / "notes.txt").read_text() == "mine"
    assert run_in_process(["report", str(artifact), "--force"], capsys).code == 0
    assert not (artifact / "report" / "notes.txt").exists()


def test_report_path_is_a_file(artifact, capsys):
    (artifact / "report").write_text("a file")
    assert_contract(run_in_process(["report", str(artifact)], capsys), 2, "is a file")
    assert (artifact / "report").read_text() == "a file"


def test_unwritable_out_dir(artifact, capsys):
    """A path under a regular file cannot be created, whoever runs the test (root included): ENOTDIR."""
    (artifact / "plain").write_text("x")
    out = artifact / "plain" / "report"
    assert_contract(run_in_process(["report", str(artifact), "--out", str(out)], capsys), 2, "cannot write --out")
    assert (artifact / "plain").read_text() == "x"
