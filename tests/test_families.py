"""The families that already worked keep working (issue 21): Llama, Qwen2, Qwen3, Gemma 3, GPT-OSS, Mistral,
Phi-3 and GLM-4, end to end through the CLI, fp8 and int8 recipes.

Small random models from the transformers 5.23 configs (tests/tiny_models.py), with the SmolLM2 tokenizer.
Oracles:

* the statistics: the K/V the model itself caches (tiny_models.own_cache_absmax, the model's own
  ``past_key_values``), absmax per (KV head, channel) equal exactly in every layer;
* the vllm export's tensor names: vLLM 0.34.0's loaders, read in their source (cited at GOLDEN_SOURCE);
* ``kvq eval``'s KV bytes per token: hand arithmetic (layers x K and V x KV heads x head_dim x bytes).
"""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from kvq.artifacts.stats import KVStats
from kvq.cli import main

pytestmark = pytest.mark.timeout(600)

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "gpt_oss", "mistral", "phi3", "glm4"]
RECIPES, SAMPLES, SEQLEN = tiny_models.CAL_RECIPES, tiny_models.CAL_SAMPLES, tiny_models.CAL_SEQLEN
LAYERS = 3  # every tiny model here (tiny_models.COMMON)
KV_HEADS = {"mistral": 1}  # the others: 2

# Where vLLM 0.34.0 puts `model.layers.{i}.self_attn.{k,v}_scale` (the names kvq's vllm export writes):
# vllm/model_executor/layers/quantization/base_config.py:261 `get_cache_scale_mapper`, the default rule
# `(?<!\.attn)\.([qkv])_scale$` -> `.attn.\1_scale`, applied by AutoWeightsLoader.load_weights
# (vllm/model_executor/models/utils.py:476-484) to every model whose top module or a child has a quant_config
# (the export's compressed-tensors config). Each family's attention then holds its `Attention` at that name:
GOLDEN_SOURCE = {
    "llama": "llama.py:221 `self.attn = Attention(..., prefix=f\"{prefix}.attn\")` in LlamaAttention (self_attn)",
    "qwen2": "qwen2.py:204 Qwen2Attention.attn",
    "qwen3": "qwen3.py:149 Qwen3Attention.attn",
    "gemma3": "gemma3.py:186 Gemma3Attention.attn",
    "mistral": "mistral.py:236 `class MistralForCausalLM(LlamaForCausalLM)`",
    "phi3": "phi3.py:10 `class Phi3ForCausalLM(LlamaForCausalLM)`",
    "glm4": "glm4.py:124 Glm4Attention.attn",
    # gpt_oss.py:1377 hf_to_vllm_mapper `.self_attn.` -> `.attn.` after the cache-scale rule:
    # model.layers.{i}.attn.attn.k_scale, the Attention at gpt_oss.py:185 inside OAIAttention (gpt_oss.py:443).
    "gpt_oss": "gpt_oss.py:1377 + gpt_oss.py:185",
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("arch", FAMILIES)
def test_statistics_equal_the_models_own_cache(calibrated_tiny, arch, recipe):
    folder, out = calibrated_tiny(arch, recipe)
    expected = tiny_models.own_cache_absmax(folder, tiny_models.calibration_token_ids(folder))
    assert sorted(expected) == list(range(LAYERS))
    stats = KVStats.load(out)
    assert sorted(stats.layers) == sorted(expected)
    for i, (k, v) in expected.items():
        assert torch.equal(stats.layers[i].k.absmax, k), f"layer {i} K"
        assert torch.equal(stats.layers[i].v.absmax, v), f"layer {i} V"


@pytest.mark.parametrize("arch", FAMILIES)
def test_vllm_export_names_every_attention_layer(calibrated_tiny, arch, tmp_path):
    folder, out = calibrated_tiny(arch, "fp8")
    code = main(["export-scales", str(out), "--format", "vllm", "--model", str(folder), "--out", str(tmp_path / "x")])
    assert code == 0
    written = load_file(tmp_path / "x" / "kvq-kv-scales.safetensors")
    assert set(written) == {f"model.layers.{i}.self_attn.{w}_scale" for i in range(LAYERS) for w in "kv"}, \
        GOLDEN_SOURCE[arch]
    scales = json.loads((out / "scales.json").read_text())["layers"]
    # fp8 e4m3 per tensor: the layer's absmax / 448 (vLLM's cache stores x / k_scale), the absmax read from the
    # model's own cache (not from kvq's statistics)
    own = tiny_models.own_cache_absmax(folder, tiny_models.calibration_token_ids(folder))
    for i in range(LAYERS):
        k, v = written[f"model.layers.{i}.self_attn.k_scale"], written[f"model.layers.{i}.self_attn.v_scale"]
        assert k.tolist() == [scales[str(i)]["k_scale"]] and v.tolist() == [scales[str(i)]["v_scale"]]
        assert k.item() == pytest.approx(float(own[i][0].max()) / 448, rel=1e-6)
        assert v.item() == pytest.approx(float(own[i][1].max()) / 448, rel=1e-6)
    for path in (out, tmp_path / "x"):
        assert main(["inspect", str(path)]) == 0


def test_vllm_export_of_gpt_oss_warns_that_sglang_drops_its_scales(calibrated_tiny, tmp_path):
    """SGLang 0.5.23's GptOssForCausalLM.load_weights has no remap of `self_attn.k_scale` (its attention is
    `self_attn.attn`): sglang/srt/models/gpt_oss.py:1287 `if name not in params_dict: continue`."""
    from kvq.export import export_artifact

    folder, out = calibrated_tiny("gpt_oss", "fp8")
    result = export_artifact(out, "vllm", out=tmp_path / "x", model=str(folder))
    assert [w for w in result.warnings if w.startswith("SGLang 0.5.23 ignores KV scales for model type gpt_oss")]
    assert not [w for w in result.warnings if w.startswith("vLLM") and "for model type" in w]


@pytest.mark.parametrize("arch", FAMILIES)
def test_eval_counts_the_real_cache(calibrated_tiny, arch, tmp_path):
    folder, fp8 = calibrated_tiny(arch, "fp8")
    _, int8 = calibrated_tiny(arch, "int8")
    _, rows = tiny_models.eval_rows(folder, [fp8, int8], tmp_path / "eval.json")
    config = json.loads((folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    elements = 2 * LAYERS * KV_HEADS.get(arch, 2) * head_dim  # K and V of every layer, per token
    assert rows["baseline (float32)"]["kv_bytes_per_token"] == elements * 4
    assert rows["fp8-e4m3-per-tensor"]["kv_bytes_per_token"] == elements
    assert rows["int8-asym-per-head"]["kv_bytes_per_token"] == elements
    for name in ("fp8-e4m3-per-tensor", "int8-asym-per-head"):
        ppl, base = rows[name]["ppl"], rows["baseline (float32)"]["ppl"]
        assert abs(ppl / base - 1) < 0.05, (name, ppl, base)  # 8-bit caches of a random model: within 5%
