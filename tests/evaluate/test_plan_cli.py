"""``kvq plan`` -> ``kvq eval --plan`` -> the vLLM export's serve line, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from bad_input import assert_contract, run_in_process, snapshot

from kvq.artifacts.scales import KVScales
from kvq.cli import main
from kvq.export.model_check import model_shape_and_files
from kvq.export.request import ExportRequest
from kvq.export.vllm import build

COMMON = ["--dataset", "pydoc", "--samples", "2", "--seqlen", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def planned(tiny_llama, tiny_artifacts, tmp_path_factory):
    """A copy of the tiny fp8 artifact with a --skip 1 plan in it, and what kvq plan printed."""
    art = tmp_path_factory.mktemp("planned") / "fp8"
    shutil.copytree(tiny_artifacts["fp8"], art)
    argv = ["plan", str(art), "--model", str(tiny_llama), "--skip", "1", *COMMON]
    code = main(argv)
    assert code == 0
    return art, json.loads((art / "plan.json").read_text())


def test_plan_is_evaluated_with_honest_bytes_and_exported_with_the_vllm_flag(planned, tiny_llama, tmp_path):
    art, plan = planned
    (skipped,) = plan["skip_layers"]
    assert plan["sensitivity"]["order"][0] == skipped and plan["budget"] == {"skip": 1}
    assert plan["engines"]["vllm"]["flags"] == f"--kv-cache-dtype-skip-layers {skipped}"
    table = tmp_path / "table.json"
    code = main(["eval", "--plan", str(art), "--model", str(tiny_llama), *COMMON, "--json", str(table)])
    assert code == 0
    rows = json.loads(table.read_text())["rows"]
    assert [r["name"] for r in rows] == ["baseline (float32)", "fp8-e4m3-per-tensor", "fp8-e4m3-scale-1.0",
                                         f"fp8-e4m3-per-tensor skip {skipped}"]
    full, row = rows[1], rows[3]
    assert row["skip_layers"] == [skipped] and full["skip_layers"] is None
    per_layer = 2 * 2 * 16  # K and V x KV heads x head_dim
    assert row["kv_bytes_per_token"] == 2 * per_layer * 1 + per_layer * 4 == plan["kv_bytes_per_token"]["plan"]
    # the skipped layer is exact: its attention error is 0, the others' is the full artifact's
    errors, full_errors = row["attention_error"]["per_layer"], full["attention_error"]["per_layer"]
    assert errors[str(skipped)] == 0.0
    assert all(errors[k] == full_errors[k] > 0 for k in errors if k != str(skipped))
    # the vLLM export of these scales serves the plan: the flag in its serve line
    shape, files = model_shape_and_files(str(tiny_llama), True, "vllm")
    export = build(ExportRequest(scales=KVScales.load(art), shape=shape, files=files, tp=1, reduce=None,
                                 skip_layers=(skipped,)))
    vllm_lines = [line for line in export.serve if line.startswith("vllm ")]
    assert vllm_lines and all(f"--kv-cache-dtype fp8 --kv-cache-dtype-skip-layers {skipped} " in line
                              for line in vllm_lines)
    assert any("SGLang" in w and "not the plan" in w for w in export.warnings)


@pytest.mark.parametrize(("extra", "code", "words"), [
    (["--skip", "3"], 2, "--skip 3: the scales hold 3 layers"),
    (["--skip", "0"], 2, "--skip"),
    (["--skip", "-2"], 2, "--skip"),
    ([], 2, "give one budget"),
    (["--skip", "1", "--bytes-per-token", "500"], 2, "give one budget"),
    (["--bytes-per-token", "nan"], 2, "must be a positive number"),
    (["--bytes-per-token", "50"], 2, "the recipe alone takes 192 bytes per token"),
    (["--bytes-per-token", "768"], 2, "holds the whole unquantized cache"),
    (["--skip", "1", "--by", "entropy"], 2, "--by"),
])
def test_kvq_plan_bad_budgets(planned, tiny_llama, capsys, extra, code, words):
    art, _ = planned
    before = snapshot(art)
    outcome = run_in_process(["plan", str(art), "--model", str(tiny_llama), *COMMON, *extra], capsys)
    assert_contract(outcome, code, words)
    assert snapshot(art) == before


def test_kvq_plan_bad_artifacts(planned, tiny_llama, tmp_path, capsys):
    art, _ = planned
    outcome = run_in_process(["plan", str(tmp_path / "absent"), "--skip", "1", *COMMON], capsys)
    assert_contract(outcome, 2, "absent")
    crowded = tmp_path / "crowded"
    shutil.copytree(art, crowded)
    (crowded / "notes.txt").write_text("mine")
    before = snapshot(crowded)
    outcome = run_in_process(["plan", str(crowded), "--model", str(tiny_llama), "--skip", "1", *COMMON], capsys)
    assert_contract(outcome, 2, "holds files this command does not write")
    assert snapshot(crowded) == before


def _plan_copy(art, folder, edit=None, text=None):
    shutil.copytree(art, folder)
    if text is None:
        data = json.loads((folder / "plan.json").read_text())
        edit(data)
        text = json.dumps(data)
    (folder / "plan.json").write_text(text)
    return folder


def test_kvq_eval_bad_plans(planned, tiny_llama, tiny_artifacts, tmp_path, capsys):
    art, _ = planned
    other_scales = tmp_path / "other"
    _plan_copy(art, other_scales, edit=lambda d: None)
    shutil.copy(tiny_artifacts["int8"] / "scales.safetensors", other_scales / "scales.safetensors")
    cases = [
        (tmp_path / "absent.json", "absent.json"),
        (_plan_copy(art, tmp_path / "garbled", text="{not json"), "is not JSON"),
        (_plan_copy(art, tmp_path / "layers", edit=lambda d: d.update(num_layers=5)),
         "is for a model of 5 layers; the model has 3"),
        (_plan_copy(art, tmp_path / "range", edit=lambda d: d.update(skip_layers=[7])), "skips layer(s) 7"),
        (_plan_copy(art, tmp_path / "twice", edit=lambda d: d.update(skip_layers=[1, 1])), "lists a layer twice"),
        (_plan_copy(art, tmp_path / "kind", edit=lambda d: d.update(skip_layers="0,1")), "'skip_layers'"),
        (_plan_copy(art, tmp_path / "noplan", edit=lambda d: d.pop("plan")), "is not a kvq plan"),
        (other_scales, "was made for other scales"),
    ]
    for plan, words in cases:
        outcome = run_in_process(["eval", "--plan", str(plan), "--model", str(tiny_llama), *COMMON], capsys)
        assert_contract(outcome, 2, words)


def test_keep_sliding_window_skips_the_configs_sliding_layers(tiny_model_factory, tmp_path, capsys):
    gemma3 = tiny_model_factory("gemma3")
    art = tmp_path / "art"
    assert main(["calibrate", "--model", str(gemma3), *COMMON, "--out", str(art)]) == 0
    capsys.readouterr()
    assert main(["plan", str(art), "--model", str(gemma3), "--keep-sliding-window", *COMMON]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((art / "plan.json").read_text())
    # the oracle: the config tiny_models.py writes (sliding, full, sliding)
    assert plan["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert plan["skip_layers"] == [0, 2] and plan["budget"] == {"keep_sliding_window": True}
    assert plan["engines"]["vllm"]["flags"] == "--kv-cache-dtype-skip-layers 0 2"
    assert "--keep-sliding-window" in printed and "--kv-cache-dtype-skip-layers 0 2" in printed


def test_keep_sliding_window_refuses_a_model_without_one(planned, tiny_llama, capsys):
    art, _ = planned
    before = snapshot(art)
    outcome = run_in_process(["plan", str(art), "--model", str(tiny_llama), "--keep-sliding-window", *COMMON], capsys)
    assert_contract(outcome, 2, "has no sliding-window layer")
    assert snapshot(art) == before
    outcome = run_in_process(["plan", str(art), "--model", str(tiny_llama), "--keep-sliding-window", "--skip", "1",
                              *COMMON], capsys)
    assert_contract(outcome, 2, "give one budget")
