"""Each defect, planted one at a time into a clean input, is found (exit 1) with its layer and tensor named.

The clean inputs are the compressed-tensors checkpoint (written by compressed-tensors' own code) and
kvq's own exports; each test edits one tensor, JSON entry or file and checks the one defect reported.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from export_helpers import model_metadata, recipe
from inspect_helpers import inspect_json
from safetensors.torch import load_file, save_file

from kvq.artifacts.stats import KVStats
from kvq.export import export_artifact

K1 = "model.layers.1.self_attn.k_scale"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    """Load every tensor of a safetensors file, let ``edit`` change the dict, write it back (metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(path)
    edit(tensors)
    path.unlink()  # never write through a hard link into another checkpoint
    save_file(tensors, path, metadata=metadata)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.unlink()
    path.write_text(json.dumps(data))


def _only(report: dict, kind: str) -> list[dict]:
    """The report's defects, after checking that every one is of ``kind``."""
    defects = report["defects"]
    assert defects and {d["kind"] for d in defects} == {kind}, defects
    return defects


@pytest.mark.parametrize("value,kind", [(0.0, "zero"), (-0.5, "negative"), (math.nan, "nan"), (math.inf, "inf")])
def test_bad_value(ct_checkpoint, tmp_path, capsys, value, kind):
    ckpt = _copy(ct_checkpoint, tmp_path)
    _edit_tensors(ckpt / "model.safetensors", lambda t: t[K1].fill_(value))
    code, report, out = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, kind)
    assert (defect["layer"], defect["tensor"]) == (1, K1)
    assert K1 in out


def test_all_scales_one_is_uncalibrated(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)

    def ones(t):
        for name in t:
            if name.endswith(("k_scale", "v_scale")):
                t[name].fill_(1.0)

    _edit_tensors(ckpt / "model.safetensors", ones)
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    defects = _only(report, "uncalibrated")
    assert {d["tensor"] for d in defects} == {"model.layers.0.self_attn.k_scale", "model.layers.0.self_attn.v_scale"}
    assert all("not calibrated" in d["message"] for d in defects)


def test_one_layer_at_one(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)
    _edit_tensors(ckpt / "model.safetensors", lambda t: t["model.layers.2.self_attn.v_scale"].fill_(1.0))
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "uncalibrated")
    assert (defect["layer"], defect["tensor"]) == (2, "model.layers.2.self_attn.v_scale")


def test_missing_layer(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)
    _edit_tensors(ckpt / "model.safetensors", lambda t: t.pop("model.layers.2.self_attn.v_scale"))
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "missing-layer")
    assert (defect["layer"], defect["tensor"]) == (2, "model.layers.2.self_attn.v_scale")


def test_layer_beyond_the_model(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)

    def extra(t):
        t["model.layers.3.self_attn.k_scale"] = torch.tensor([0.5])
        t["model.layers.3.self_attn.v_scale"] = torch.tensor([0.5])

    _edit_tensors(ckpt / "model.safetensors", extra)
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    assert {(d["layer"], d["tensor"]) for d in _only(report, "extra-layer")} == {
        (3, "model.layers.3.self_attn.k_scale"), (3, "model.layers.3.self_attn.v_scale")}


def test_shape_not_the_models_heads(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)
    _edit_tensors(ckpt / "model.safetensors", lambda t: t.__setitem__(K1, torch.full((3,), 0.5)))
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "shape")
    assert (defect["layer"], defect["tensor"]) == (1, K1)
    assert "2 KV heads" in defect["message"]


def test_per_head_scales_cannot_split_over_tp(ct_head_checkpoint, tmp_path, capsys):
    code, report, _ = inspect_json([ct_head_checkpoint, "--tp", "3"], tmp_path, capsys)  # 2 KV heads
    assert code == 1
    (defect,) = _only(report, "tp")
    assert (defect["layer"], defect["tensor"]) == (0, "model.layers.0.self_attn.k_scale")
    code, _, _ = inspect_json([ct_head_checkpoint, "--tp", "4"], tmp_path, capsys)  # replicated heads: fine
    assert code == 0


def test_rank_files_for_another_tp(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), model_metadata(tiny_llama))
    out = tmp_path / "scales.json"
    export_artifact(artifact, "sglang-json", out=out, tp=2, legacy=True)
    code, report, _ = inspect_json([out, "--tp", "1"], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "tp")
    assert defect["tensor"] == "scales.json" and "2 tensor-parallel rank(s)" in defect["message"]


def test_tensors_without_a_scheme(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c["quantization_config"].pop("kv_cache_scheme"))
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "config")
    assert defect["tensor"].startswith("model.layers.") and "no KV-cache scheme" in defect["message"]


def test_scheme_without_tensors(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)

    def drop(t):
        for name in [n for n in t if n.endswith(("k_scale", "v_scale"))]:
            del t[name]

    _edit_tensors(ckpt / "model.safetensors", drop)
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "config")
    assert defect["tensor"] == "config.json quantization_config.kv_cache_scheme"
    assert "no K/V scale tensors" in defect["message"]


def test_strategy_disagrees_with_shape(ct_checkpoint, tmp_path, capsys):
    ckpt = _copy(ct_checkpoint, tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c["quantization_config"]["kv_cache_scheme"].update(strategy="attn_head"))
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1
    defects = _only(report, "config")
    assert {(d["layer"], d["tensor"]) for d in defects} == {
        (i, f"model.layers.{i}.self_attn.{w}_scale") for i in range(3) for w in "kv"}


def test_scales_from_another_model(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # same shapes, another model
    (other / "config.json").write_text(json.dumps(config))
    code, report, _ = inspect_json([artifact, "--model", other], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "other-model")
    assert defect["tensor"] == "scales.safetensors" and "config_hash" in defect["message"]
    code, _, _ = inspect_json([artifact, "--model", tiny_llama], tmp_path, capsys)
    assert code == 0


def test_zero_in_a_kvq_artifact(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("int8", False, "head"), model_metadata(tiny_llama))
    _edit_tensors(artifact / "scales.safetensors", lambda t: t["layers.1.v_scale"].__setitem__(1, 0.0))
    code, report, _ = inspect_json([artifact], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "zero")
    assert (defect["layer"], defect["tensor"]) == (1, "layers.1.v_scale") and "index 1" in defect["message"]


def test_sglang_json_zero_and_missing_layer(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), model_metadata(tiny_llama))
    out = tmp_path / "scales.json"
    export_artifact(artifact, "sglang-json", out=out, tp=2, legacy=True)
    _edit_json(out, lambda d: d["kv_cache"]["scaling_factor"]["0"].update({"1": 0.0}))
    code, report, _ = inspect_json([out], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "zero")
    assert (defect["layer"], defect["tensor"]) == (1, "kv_cache.scaling_factor.0.1")
    _edit_json(out, lambda d: (d["kv_cache"]["scaling_factor"]["0"].update({"1": 0.5}),
                               d["kv_cache"]["scaling_factor"]["1"].pop("2")))
    code, report, _ = inspect_json([out, "--model", tiny_llama], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "missing-layer")
    assert (defect["layer"], defect["tensor"]) == (2, "kv_cache.scaling_factor.1.2")


def test_trtllm_rank_missing_a_layer(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    out = tmp_path / "trt"
    export_artifact(artifact, "trtllm", out=out, tp=2)
    name = "transformer.layers.0.attention.kv_cache_scaling_factor"
    _edit_tensors(out / "rank1.safetensors", lambda t: t.pop(name))
    code, report, out_text = inspect_json([out, "--model", tiny_llama], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "missing-layer")
    assert (defect["layer"], defect["tensor"]) == (0, name) and "rank 1" in defect["message"]


def test_lmdeploy_file_of_the_wrong_size(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("int8", True, "tensor"), model_metadata(tiny_llama))
    out = tmp_path / "lmdeploy"
    export_artifact(artifact, "lmdeploy", out=out, legacy=True)
    bad = out / "layers.1.past_kv_scale.0.weight"
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[:12])
    code, report, _ = inspect_json([out, "--model", tiny_llama], tmp_path, capsys)
    assert code == 1
    kinds = {(d["kind"], d["tensor"]) for d in report["defects"]}
    assert ("config", bad.name) in kinds  # the file itself, and layer 1 then counts as missing
    assert {(d["layer"], d["kind"]) for d in report["defects"] if d["kind"] != "config"} == {(1, "missing-layer")}


def _stats(folder: Path, k_peak: float) -> Path:
    """Statistics of tiny Llama's KV shape (3 layers, 2 heads, head_dim 16): every range [-1, 1] except
    layer 1 K head 1 channel 5, whose max is ``k_peak``."""
    stats = KVStats()
    for i in range(3):
        k_max = torch.ones(2, 16)
        if i == 1:
            k_max[1, 5] = k_peak
        stats.observe(i, -torch.ones(2, 16), k_max, -torch.ones(2, 16), torch.ones(2, 16), tokens=10)
    stats.save(folder)
    return folder / "stats.safetensors"


def test_stats_overshoot(tiny_llama, make_artifact, tmp_path, capsys):
    # fp8 e4m3 per tensor: layer 1 K scale 0.0625 * 2 = 0.125 represents |x| <= 448 * 0.125 = 56
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    code, report, _ = inspect_json([artifact, "--stats", _stats(tmp_path / "over", 3 * 56.0)], tmp_path, capsys)
    assert code == 1
    (defect,) = _only(report, "clipping")
    assert (defect["layer"], defect["tensor"]) == (1, "layers.1.k_scale")
    row = next(c for c in report["clipping"] if (c["layer"], c["role"]) == (1, "k"))
    assert row["share"] == pytest.approx(1 / 32) and row["worst"] == pytest.approx(3.0)
    code, report, _ = inspect_json([artifact, "--stats", _stats(tmp_path / "within", 56.0)], tmp_path, capsys)
    assert code == 0, report["defects"]
    rows = {(c["layer"], c["role"]): c for c in report["clipping"]}
    assert rows[(1, "k")]["share"] == 0 and rows[(1, "k")]["worst"] == pytest.approx(1.0)
    assert rows[(0, "v")]["worst"] == pytest.approx(1 / (448 * 0.03125))  # |x| <= 1 against 14


def test_modelopt_declarations_disagree(tmp_path, capsys):
    """A ModelOpt-style checkpoint written by hand: config.json says FP8, hf_quant_config.json INT8."""
    ckpt = tmp_path / "modelopt"
    ckpt.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "hidden_size": 8, "quantization_config": {"quant_method": "modelopt", "kv_cache_quant_algo": "FP8"}}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {"kv_cache_quant_algo": "INT8"}}))
    save_file({"model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.5),
               "model.layers.0.self_attn.v_proj.v_scale": torch.tensor(0.25)}, ckpt / "model.safetensors")
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 1 and report["kind"] == "modelopt"
    (defect,) = _only(report, "config")
    assert defect["tensor"] == "hf_quant_config.json" and "INT8" in defect["message"] and "FP8" in defect["message"]
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": {"kv_cache_quant_algo": "FP8"}}))
    code, report, _ = inspect_json([ckpt], tmp_path, capsys)
    assert code == 0, report["defects"]
