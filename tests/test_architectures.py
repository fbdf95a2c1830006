"""Hybrid linear-attention models (Qwen3-Next, Qwen3.5, Granite 4.0-H) and fused QKV (Phi-3), end to end.

Small random models from the transformers 5.23 configs, with the SmolLM2 tokenizer. Oracles:

* which layers hold a KV cache, and what they hold: the cache object the model itself returns
  (``past_key_values`` of a forward with ``use_cache=True``): layers with keys are the cached ones, and
  the statistics' absmax per (KV head, channel) must equal that of those keys and values exactly;
* the vllm export's tensor names: vLLM's loaders, read in their source (cited at each golden name);
* ``kvq eval``'s KV bytes per token: hand arithmetic over the cached layers only.
"""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from kvq.artifacts.stats import KVStats
from kvq.cli import main
from kvq.export import export_artifact

pytestmark = pytest.mark.timeout(600)

HYBRIDS = sorted(tiny_models.HYBRID_CONFIGS)
RECIPES, SAMPLES, SEQLEN = tiny_models.CAL_RECIPES, tiny_models.CAL_SAMPLES, tiny_models.CAL_SEQLEN


def own_cache(folder) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], object]:
    """Per layer with a KV cache, the absmax per (KV head, channel) of the K and V the model itself caches
    over the calibration samples kvq picks (pydoc, seed 0), one sample per forward as ``--batch-size 1``."""
    return (tiny_models.own_cache_absmax(folder, tiny_models.calibration_token_ids(folder), whole_windows=False),
            AutoConfig.from_pretrained(folder))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("arch", [*HYBRIDS, "phi3"])
def test_statistics_equal_the_models_own_cache_in_every_cached_layer(calibrated_tiny, arch, recipe):
    folder, out = calibrated_tiny(arch, recipe)
    expected, config = own_cache(folder)
    stats = KVStats.load(out)
    assert sorted(stats.layers) == sorted(expected)  # exactly the layers the model caches
    if arch in HYBRIDS:
        assert len(expected) < config.num_hidden_layers
    assert stats.metadata["cached_layers"] == ",".join(map(str, sorted(expected)))
    assert stats.metadata["num_layers"] == str(config.num_hidden_layers)
    for i, (k, v) in expected.items():
        assert torch.equal(stats.layers[i].k.absmax, k), f"layer {i} K"
        assert torch.equal(stats.layers[i].v.absmax, v), f"layer {i} V"
    scales = json.loads((out / "scales.json").read_text())
    assert sorted(map(int, scales["layers"])) == sorted(expected)
    assert scales["metadata"]["cached_layers"] == stats.metadata["cached_layers"]


# Golden names, from vLLM's loaders (vllm-project/vllm main, read for issue 21):
# * vllm/model_executor/layers/quantization/base_config.py `get_cache_scale_mapper`: renames
#   `.self_attn.k_scale` / `.v_scale` to `.self_attn.attn.k_scale`, applied by AutoWeightsLoader.load_weights
#   (vllm/model_executor/models/utils.py, since vLLM PR 43167, 0.23.0) to every model whose top module or a
#   child carries `quant_config`.
# * qwen3_next.py: `Qwen3NextAttention` builds `self.attn = Attention(..., prefix=f"{prefix}.attn")` only in
#   the "full_attention" layers (`Qwen3NextDecoderLayer(layer_type=config.layer_types[...])`); the
#   "linear_attention" layers hold `linear_attn` (QwenGatedDeltaNetAttention), a Mamba-style state.
# * granitemoehybrid.py: `GraniteMoeHybridForCausalLM` sets `self.quant_config` and loads through
#   `AutoWeightsLoader(self)` (so the mapper applies); `GraniteMoeHybridModel.load_weights` loads any name
#   that is no expert / q,k,v shard as is (`_load(n, p)` into `params_dict[n]`): the attention layers'
#   `self_attn.attn.k_scale`; Mamba layers (`mamba`) have none. Before 0.23.0 (no mapper) that `_load` of
#   `self_attn.k_scale` would be a KeyError (not run on a GPU).
# * qwen3_5.py: the same layer split; the full-attention layers load self_attn.k_scale (the engine matrix's
#   qwen3_5 row: vLLM 0.17.0-0.34.0 applied; issue 54623's claim not borne out by the 0.34.0 source).
GOLDEN = {
    "qwen3_next": [1, 3],
    "granitemoehybrid": [0, 2],
    "qwen3_5_text": [3],
}


@pytest.mark.parametrize("arch", HYBRIDS)
def test_vllm_export_names_only_the_attention_layers(calibrated_tiny, arch, tmp_path):
    folder, out = calibrated_tiny(arch, "fp8")
    result = export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    written = load_file(tmp_path / "export" / "kvq-kv-scales.safetensors")
    want = {f"model.layers.{i}.self_attn.{w}_scale" for i in GOLDEN[arch] for w in ("k", "v")}
    assert set(written) == want
    scales = json.loads((out / "scales.json").read_text())["layers"]
    for i in GOLDEN[arch]:
        assert written[f"model.layers.{i}.self_attn.k_scale"].tolist() == [scales[str(i)]["k_scale"]]
        assert written[f"model.layers.{i}.self_attn.v_scale"].tolist() == [scales[str(i)]["v_scale"]]
    assert not [w for w in result.warnings if w.startswith("vLLM") and "for model type" in w]
    # SGLang 0.5.23: granitemoehybrid.py:734 `_load(n, p)` is a KeyError for self_attn.k_scale (get_cache_scale
    # maps only k_proj.output_scale); qwen3_next.py:1266 refuses too; qwen3_5.py:1694 remaps (applied).
    refused = [w for w in result.warnings if w.startswith("SGLang 0.5.23 refuses KV scales")]
    assert len(refused) == (arch in ("granitemoehybrid", "qwen3_next")), result.warnings


def test_phi3_fused_qkv_exports_the_attention_modules_scales(calibrated_tiny, tmp_path):
    """vLLM's Phi3ForCausalLM is a LlamaForCausalLM (vllm/model_executor/models/phi3.py: `class
    Phi3ForCausalLM(LlamaForCausalLM)`) whose LlamaAttention keeps its `Attention` at `self_attn.attn`
    (llama.py: `self.attn = Attention(..., prefix=f"{prefix}.attn")`); the checkpoint's fused
    `self_attn.qkv_proj.weight` loads as is. The scale names are those of any Llama:
    `model.layers.{i}.self_attn.k_scale`, which base_config.py `get_cache_scale_mapper` (and, in loaders
    that call it, weight_utils.py `maybe_remap_kv_scale_name`: `.k_scale` -> `.attn.k_scale`) maps to
    `self_attn.attn.k_scale`."""
    folder, out = calibrated_tiny("phi3", "fp8")
    export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    written = load_file(tmp_path / "export" / "kvq-kv-scales.safetensors")
    assert set(written) == {f"model.layers.{i}.self_attn.{w}_scale" for i in range(3) for w in ("k", "v")}
    # transformers + compressed-tensors, an independent client, loads them onto the attention modules.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    scales = json.loads((out / "scales.json").read_text())["layers"]
    for i, layer in enumerate(model.model.layers):
        assert layer.self_attn.k_scale.tolist() == [scales[str(i)]["k_scale"]]
        assert layer.self_attn.v_scale.tolist() == [scales[str(i)]["v_scale"]]


@pytest.mark.parametrize("arch", [a for a in HYBRIDS if a != "qwen3_5_text"])
def test_transformers_loads_the_hybrid_export_onto_the_attention_layers(calibrated_tiny, arch, tmp_path):
    folder, out = calibrated_tiny(arch, "fp8")
    export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    scales = json.loads((out / "scales.json").read_text())["layers"]
    for i in GOLDEN[arch]:
        attn = model.model.layers[i].self_attn
        assert attn.k_scale.tolist() == [scales[str(i)]["k_scale"]]
        assert attn.v_scale.tolist() == [scales[str(i)]["v_scale"]]


@pytest.mark.parametrize("arch", [*HYBRIDS, "phi3"])
def test_eval_counts_the_memory_of_the_cached_layers_only(calibrated_tiny, arch, tmp_path):
    folder, fp8 = calibrated_tiny(arch, "fp8")
    _, int8 = calibrated_tiny(arch, "int8")
    table, rows = tiny_models.eval_rows(folder, [fp8, int8], tmp_path / "eval.json")
    layers = {"qwen3_next": [1, 3], "granitemoehybrid": [0, 2], "qwen3_5_text": [3], "phi3": [0, 1, 2]}[arch]
    assert table["model"]["cached_layers"] == layers
    cached = len(layers)
    heads, head_dim = (2, 16)  # every tiny model here: 2 KV heads of 16 channels
    elements = 2 * cached * heads * head_dim  # K and V of each cached layer, per token
    assert rows["baseline (float32)"]["kv_bytes_per_token"] == elements * 4
    assert rows["fp8-e4m3-per-tensor"]["kv_bytes_per_token"] == elements  # one byte per code
    assert rows["int8-asym-per-head"]["kv_bytes_per_token"] == elements
    per_layer = rows["fp8-e4m3-per-tensor"]["attention_error"]["per_layer"]
    assert len(per_layer) == cached


@pytest.mark.parametrize("arch", HYBRIDS)
def test_inspect_finds_no_missing_layer_in_the_artifact_or_its_export(calibrated_tiny, arch, tmp_path, capsys):
    folder, out = calibrated_tiny(arch, "fp8")
    tiny_models.inspect_artifact_and_export(folder, out, tmp_path / "export", capsys)


def test_plan_ranks_only_the_cached_layers_and_counts_their_bytes(calibrated_tiny, tmp_path):
    """qwen3_next caches layers 1 and 3: the plan skips one of them; bytes by hand (2 heads x 16 channels)."""
    folder, int8 = calibrated_tiny("qwen3_next", "int8")
    code = main(["plan", str(int8), "--model", str(folder), "--dataset", "pydoc", "--samples", "2", "--seqlen", "32",
                 "--device", "cpu", "--skip", "1", "--force"])
    assert code == 0
    plan = json.loads((int8 / "plan.json").read_text())
    assert plan["skip_layers"] in ([1], [3])
    assert sorted(map(int, plan["sensitivity"]["per_layer"])) == [1, 3]
    per_layer_elements = 2 * 2 * 16  # K and V x KV heads x head_dim
    assert plan["kv_bytes_per_token"] == {"plan": per_layer_elements * 4 + per_layer_elements,
                                          "all_quantized": 2 * per_layer_elements,
                                          "unquantized": 2 * per_layer_elements * 4}


def test_report_draws_the_kv_cache_layers_of_a_hybrid_model(calibrated_tiny, tmp_path, capsys):
    """granitemoehybrid caches layers 0 and 2 of 4: every heatmap has those two rows, labelled 0 and 2, and the
    validate / eval reports of the same model are read onto them."""
    folder, out = calibrated_tiny("granitemoehybrid", "fp8")
    common = ["--model", str(folder), "--dataset", "pydoc", "--samples", "2", "--seqlen", "32", "--device", "cpu"]
    assert main(["validate", str(out), *common]) == 0
    assert main(["eval", *common, "--scales", str(out), "--json", str(tmp_path / "eval.json")]) == 0
    target = tmp_path / "report"
    code = main(["report", str(out), "--eval", str(tmp_path / "eval.json"), "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 0, err
    figures = {f["file"]: f for f in json.loads((target / "figures.json").read_text())["figures"]}
    for name in ("absmax.png", "scales.png", "sqnr.png"):
        assert figures[name]["axes"][0]["images"] == [[2, 2]], name  # 2 KV-cache layers x 2 KV heads
        assert figures[name]["axes"][0]["y_ticks"] == ["0", "2"], name
        assert figures[name]["data"]["layers"] == [0, 2]
    assert "attention_error.png" in figures
    sqnr = figures["sqnr.png"]["data"]["k"]
    assert all(value is None or value > 0 for row in sqnr for value in row)  # every row read from validate.json
    assert "KV cache in 2 of 4 layers (0,2)" in (target / "report.md").read_text()


@pytest.mark.parametrize("export_format", ["sglang-json", "lmdeploy"])
def test_per_decoder_layer_formats_refuse_a_hybrid_model_in_one_line(calibrated_tiny, tmp_path, capsys, export_format):
    folder, out = calibrated_tiny("qwen3_next", "fp8" if export_format == "sglang-json" else "int8")
    target = tmp_path / "export"
    code = main(["export-scales", str(out), "--format", export_format, "--legacy", "--model", str(folder),
                 "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "only layers 1, 3 of the model's 4 hold a KV cache" in err, err
    assert len([line for line in err.splitlines() if line.startswith("kvq: error:")]) == 1
    assert "Traceback" not in err and not target.exists()


def test_layers_with_a_kv_cache_come_from_layer_types_and_kv_sharing():
    from types import SimpleNamespace

    from kvq.model.loading import kv_shape

    def config(**extra):
        return SimpleNamespace(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               hidden_size=64, **extra)

    assert kv_shape(config()).kv_layers == (0, 1, 2, 3) and kv_shape(config()).cached_layers is None
    hybrid = kv_shape(config(layer_types=["linear_attention", "full_attention", "sliding_attention", "mamba"]))
    assert hybrid.kv_layers == (1, 2) and hybrid.elements_per_token == 2 * 2 * 2 * 16
    shared = kv_shape(config(kv_sharing_modes=["store", "store", "reuse", "reuse"]))
    assert shared.kv_layers == (0, 1)
    assert shared.without_layers([1]).kv_layers == (0,) and shared.only_layers([1, 3]).kv_layers == (1,)


def test_a_model_without_any_kv_cache_layer_is_refused_before_loading(tmp_path, capsys):
    folder = tmp_path / "all-mamba"
    config = tiny_models.HYBRID_CONFIGS["granitemoehybrid"]()
    config.layer_types = ["linear_attention"] * config.num_hidden_layers
    config.save_pretrained(folder)  # a config and no weights: refused before any weight is read
    out = tmp_path / "out"
    code = main(["calibrate", "--model", str(folder), "--dataset", "pydoc", "--samples", "1", "--seqlen", "16",
                 "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "has no layer with a KV cache" in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["1,x", "3,1", "1,1", "9", "-1"])
def test_an_artifact_with_malformed_cached_layers_is_refused(calibrated_tiny, tmp_path, bad):
    from kvq.artifacts.scales import KVScales
    from kvq.errors import UsageError

    _, out = calibrated_tiny("qwen3_next", "fp8")
    scales = KVScales.load(out)
    scales.metadata["cached_layers"] = bad
    scales.save(tmp_path / "bad")
    with pytest.raises(UsageError, match="cached_layers"):
        KVScales.load(tmp_path / "bad")
