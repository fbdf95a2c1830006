"""Bad usage of `kvq inspect` exits 2 with one line naming the thing at fault, and writes nothing."""

from __future__ import annotations

import json

import torch
from bad_input import assert_contract, run_in_process, run_subprocess, snapshot
from export_helpers import model_metadata, recipe
from safetensors.torch import save_file

from kvq.artifacts.stats import KVStats


def test_missing_path_in_a_shell(tmp_path):
    missing = tmp_path / "nope"
    assert_contract(run_subprocess(["inspect", str(missing)]), 2, "nope")


def test_unrecognised_folder(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    before = snapshot(tmp_path)
    line = assert_contract(run_in_process(["inspect", str(folder)], capsys), 2, "holds no KV-cache scales")
    assert str(folder) in line
    assert snapshot(tmp_path) == before


def test_json_that_is_not_a_scales_file(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"kv_cache": {"dtype": "float8_e4m3fn"}}))
    assert_contract(run_in_process(["inspect", str(path)], capsys), 2, "kv_cache.scaling_factor")
    path.write_text("{not json")
    assert_contract(run_in_process(["inspect", str(path)], capsys), 2, "other.json")


def test_safetensors_without_kvq_metadata(tmp_path, capsys):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.ones(2)}, path)
    assert_contract(run_in_process(["inspect", str(path)], capsys), 2, "recipe metadata")


def test_tp_below_one(ct_checkpoint, capsys):
    assert_contract(run_in_process(["inspect", str(ct_checkpoint), "--tp", "0"], capsys), 2, "--tp")


def test_stats_of_another_shape(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    stats = KVStats()
    for i in range(3):
        stats.observe(i, -torch.ones(4, 8), torch.ones(4, 8), -torch.ones(4, 8), torch.ones(4, 8), tokens=1)
    stats.save(tmp_path / "stats")
    report = tmp_path / "report.json"
    argv = ["inspect", str(artifact), "--stats", str(tmp_path / "stats"), "--json", str(report)]
    assert_contract(run_in_process(argv, capsys), 2, "--stats holds 4 KV heads")
    assert not report.exists()
