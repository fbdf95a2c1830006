"""The model check, atomic output, --force, and the CLI command."""

from __future__ import annotations

import json
import os

import pytest
import torch
from bad_input import snapshot
from export_helpers import model_metadata, recipe, synthetic_metadata

from kvq.artifacts.scales import LayerScales
from kvq.cli import main
from kvq.errors import KvqError, UsageError
from kvq.export import export_artifact


@pytest.mark.parametrize("key,wrong", [
    ("num_layers", "7"), ("num_kv_heads", "5"), ("head_dim", "32"), ("model_type", "qwen2"),
    ("config_hash", "ffffffffffffffff"),
])
@pytest.mark.parametrize("export_format", ["vllm", "sglang-json"])
def test_artifact_from_another_model_is_refused_with_both_values(tiny_llama, make_artifact, tmp_path, key, wrong, export_format):
    meta = model_metadata(tiny_llama)
    right = meta[key]
    meta[key] = wrong
    layers = None
    if key in ("num_kv_heads", "head_dim"):  # tensors of the right shape: only the metadata lies
        good = model_metadata(tiny_llama)
        layers = {i: LayerScales(torch.tensor(0.5), torch.tensor(0.25)) for i in range(int(good["num_layers"]))}
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), meta, layers)
    out = tmp_path / ("o.json" if export_format == "sglang-json" else "o")
    with pytest.raises(UsageError) as err:
        export_artifact(artifact, export_format, out=out, model=str(tiny_llama), legacy=export_format == "sglang-json")
    message = str(err.value)
    assert f"{key} {wrong} (artifact) vs {right} (model {tiny_llama})" in message
    assert not out.exists()


def test_tensor_shapes_are_checked_against_the_model(tiny_llama, make_artifact, tmp_path):
    meta = model_metadata(tiny_llama)
    for key in ("num_kv_heads", "head_dim", "num_layers", "config_hash"):
        del meta[key]
    layers = {i: LayerScales(torch.ones(5), torch.ones(5)) for i in range(3)}  # 5 heads; the model has 2
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), meta, layers)
    with pytest.raises(UsageError, match=r"layer 0 K scale has shape \(5,\).*needs \(2,\)"):
        export_artifact(artifact, "vllm", out=tmp_path / "o", model=str(tiny_llama))


def test_missing_layers_are_refused(make_artifact, tmp_path):
    meta = synthetic_metadata(layers=3)
    layers = {i: LayerScales(torch.tensor(0.5), torch.tensor(0.5)) for i in (0, 2)}
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), meta, layers)
    with pytest.raises(UsageError, match=r"scales\.safetensors: layer\(s\) 1 missing \(layers 0\.\.2 must"):
        export_artifact(artifact, "sglang-json", out=tmp_path / "o.json", legacy=True)


def test_no_model_and_no_shape_in_metadata_is_refused(make_artifact, tmp_path):
    meta = synthetic_metadata()
    layers = {i: LayerScales(torch.tensor(0.5), torch.tensor(0.5)) for i in (0, 1)}
    del meta["num_kv_heads"]
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), meta, layers)
    with pytest.raises(UsageError, match="records no num_kv_heads") as err:
        export_artifact(artifact, "trtllm", out=tmp_path / "o")
    assert "--model" in err.value.hint


def test_sglang_needs_a_model_type(make_artifact, tmp_path):
    meta = synthetic_metadata()
    del meta["model_type"]
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), meta)
    with pytest.raises(UsageError, match="model_type"):
        export_artifact(artifact, "sglang-json", out=tmp_path / "o.json", legacy=True)


def test_existing_output_needs_force_and_is_replaced_whole(make_artifact, tmp_path):
    artifact = make_artifact(recipe("int8", True, "tensor"), synthetic_metadata())
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="--force") as err:
        export_artifact(artifact, "lmdeploy", out=out, legacy=True)
    assert (out / "stale.txt").read_text() == "old"
    assert "--force" in err.value.hint
    export_artifact(artifact, "lmdeploy", out=out, force=True, legacy=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == [f"layers.{i}.past_kv_scale.0.weight" for i in (0, 1)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_earlier_export_of_the_same_kind_is_replaced_without_force(make_artifact, tmp_path):
    artifact = make_artifact(recipe("int8", True, "tensor"), synthetic_metadata())
    out = tmp_path / "out"
    export_artifact(artifact, "lmdeploy", out=out, tp=1, legacy=True)  # 2 layers x 1 rank
    export_artifact(artifact, "lmdeploy", out=out, tp=2, legacy=True)  # the new export writes every name the folder holds
    names = sorted(f"layers.{i}.past_kv_scale.{r}.weight" for i in (0, 1) for r in (0, 1))
    assert sorted(p.name for p in out.iterdir()) == names
    with pytest.raises(UsageError, match="holds files this command does not write"):
        export_artifact(artifact, "lmdeploy", out=out, tp=1, legacy=True)  # rank 1's files would be left over: --force
    assert sorted(p.name for p in out.iterdir()) == names
    fp8 = make_artifact(recipe("fp8_e4m3", True, "tensor"), synthetic_metadata())
    json_out = tmp_path / "scales.json"
    export_artifact(fp8, "sglang-json", out=json_out, legacy=True)
    export_artifact(fp8, "sglang-json", out=json_out, tp=2, legacy=True)  # an earlier sglang-json file: same kind
    assert sorted(json.loads(json_out.read_text())["kv_cache"]["scaling_factor"]) == ["0", "1"]
    other = tmp_path / "config.json"
    other.write_text('{"model_type": "llama"}')
    with pytest.raises(UsageError, match="existing file of another kind"):
        export_artifact(fp8, "sglang-json", out=other, legacy=True)
    assert other.read_text() == '{"model_type": "llama"}'
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".kvq-tmp")] == []


def test_empty_existing_folder_is_used(make_artifact, tmp_path):
    artifact = make_artifact(recipe("int8", True, "tensor"), synthetic_metadata())
    out = tmp_path / "out"
    out.mkdir()
    export_artifact(artifact, "lmdeploy", out=out, legacy=True)
    assert len(list(out.iterdir())) == 2


def test_failed_export_leaves_nothing_behind(tiny_llama, make_artifact, tmp_path):
    """A broken model folder (a dangling link) fails mid-write: no output, no temporary, old output kept."""
    model = tmp_path / "broken-model"
    model.mkdir()
    for path in tiny_llama.iterdir():
        os.link(path, model / path.name)
    os.symlink(tmp_path / "does-not-exist", model / "vocab.json")
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(model))
    out = tmp_path / "exports" / "fp8kv"
    with pytest.raises(KvqError, match="vocab.json"):
        export_artifact(artifact, "vllm", out=out, model=str(model))
    assert list((tmp_path / "exports").iterdir()) == []
    # With --force over an earlier output, the earlier output survives the failure intact.
    out.mkdir()
    (out / "keep.txt").write_text("earlier export")
    with pytest.raises(KvqError):
        export_artifact(artifact, "vllm", out=out, model=str(model), force=True)
    assert (out / "keep.txt").read_text() == "earlier export"
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["fp8kv"]


def test_output_inside_the_model_folder_is_refused(tiny_llama, make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    with pytest.raises(UsageError, match="overlaps"):
        export_artifact(artifact, "vllm", out=tiny_llama / "export", model=str(tiny_llama))
    with pytest.raises(UsageError, match="overlaps"):
        export_artifact(artifact, "vllm", out=tiny_llama.parent, model=str(tiny_llama), force=True)
    assert not (tiny_llama / "export").exists()


def test_output_over_the_artifact_is_refused(make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), synthetic_metadata())
    before = snapshot(artifact)
    with pytest.raises(UsageError, match="scales.safetensors is a file this command reads"):
        export_artifact(artifact / "scales.safetensors", "sglang-json", out=artifact / "scales.safetensors", force=True, legacy=True)
    with pytest.raises(UsageError, match=r"would replace .*scales\.safetensors, which this command reads"):
        export_artifact(artifact, "trtllm", out=artifact, force=True)
    assert snapshot(artifact) == before


def test_hub_id_for_a_checkpoint_format_is_refused(make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), synthetic_metadata())
    with pytest.raises(UsageError, match="hub id"):
        export_artifact(artifact, "vllm", out=tmp_path / "o", model="someone/some-model")


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_exports_and_reports(make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), synthetic_metadata())
    out = tmp_path / "kv_cache_scales.json"
    code = main(["export-scales", str(artifact), "--format", "sglang-json", "--tp", "2", "--reduce", "max",
                 "--legacy", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert sorted(data["kv_cache"]["scaling_factor"]) == ["0", "1"]
    printed = capsys.readouterr().out
    assert "sglang-json" in printed and "--reduce max" in printed
    assert "warning:" in printed and "serve:" in printed and "SGLang <= 0.5.1" in printed


def test_cli_refusal_exits_2_with_reason_and_flag(make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), synthetic_metadata())
    code = main(["export-scales", str(artifact), "--format", "trtllm", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("kvq: error: --format trtllm holds one K scale per tensor")
    assert "hint: pass --reduce max" in err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_unknown_format(capsys, tmp_path):
    code = main(["export-scales", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("kvq: error: ") and "'onnx'" in err.splitlines()[0]
