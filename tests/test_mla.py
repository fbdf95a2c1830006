"""MLA (multi-head latent attention: DeepSeek-V2 / V3, issue 21) end to end.

What an MLA layer caches, and what the engines do with its scales, read in their source (docs/engines.md,
"MLA: the latent cache"):

* transformers 5.23 hands ``Cache.update`` the normalized latent as keys, (batch, 1, seq, kv_lora_rank), and the
  rotary key part after RoPE as values, (batch, 1, seq, qk_rope_head_dim)
  (models/deepseek_v3/modeling_deepseek_v3.py:444-459, models/deepseek_v2/modeling_deepseek_v2.py:385-394);
* vLLM 0.34.0 writes that row with one scale per layer, ``_k_scale`` (v1/attention/backend.py:1088-1110 via
  model_executor/layers/attention/mla_attention.py:962-969), and reads both parts with it
  (v1/attention/backends/mla/triton_mla.py:372-373).

Oracles: the model's own cache object (``past_key_values``, tiny_models.own_cache_absmax), hand arithmetic, and the
engine source cited above.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.export.mla_export import MLA_REFUSED, check_mla_export
from kvq.model.mla import (
    KV_LAYOUT_KEY,
    MLA_LAYOUT,
    LatentDims,
    config_latent_dims,
    latent_dims,
    layout_metadata,
)
from kvq.recipe.schema import KVRecipe, QuantSpec
from kvq.solving.solver import solve_scales

MLA_META = {KV_LAYOUT_KEY: MLA_LAYOUT}


def spec(fmt: str, granularity: str = "tensor", symmetric: bool = True) -> QuantSpec:
    return QuantSpec(format=fmt, symmetric=symmetric, granularity=granularity)


def recipe(key: QuantSpec, value: QuantSpec | None = None, query: QuantSpec | None = None) -> KVRecipe:
    return KVRecipe(name="t", key=key, value=value or key, query=query)


# --- the config -------------------------------------------------------------------------------------------------

def test_latent_dims_are_read_from_the_config_attributes():
    import tiny_models

    for arch in tiny_models.MLA_CONFIGS:
        config = tiny_models.MLA_CONFIGS[arch]()
        dims = latent_dims(config.get_text_config(decoder=True))
        assert dims == LatentDims(32, 8), arch
        assert (dims.k, dims.v, dims.row) == ((1, 32), (1, 8), 40)
    assert latent_dims(tiny_models.CONFIGS["llama"]()) is None


def test_a_multimodal_configs_latent_row_is_its_text_models():
    """Kimi K2.5: a DeepSeek-V3 text model under a vision config. (transformers 5.23 builds it only as an
    image-text-to-text model, not AutoModelForCausalLM, which kvq loads: it is not calibrated here.)"""
    import tiny_models

    config = AutoConfig.for_model("kimi_k25", text_config=dict(tiny_models._MLA, model_type="deepseek_v3"))
    assert config_latent_dims(config) == LatentDims(32, 8)
    assert layout_metadata(config) == MLA_META
    assert layout_metadata(tiny_models.CONFIGS["llama"]()) == {}


def test_a_half_stated_latent_config_is_refused():
    config = AutoConfig.for_model("llama")
    config.kv_lora_rank = 0
    config.qk_rope_head_dim = 8
    with pytest.raises(UsageError, match="kv_lora_rank is 0"):
        latent_dims(config)


# --- the solver: one scale for the row --------------------------------------------------------------------------

def mla_stats(metadata: dict | None = None) -> KVStats:
    """One MLA layer: the latent (K, 1 x 4) spans [-8, 3], the rotary part (V, 1 x 2) [-1, 5]."""
    stats = KVStats()
    stats.observe(0, torch.tensor([[-8.0, -1.0, 0.0, 1.0]]), torch.tensor([[1.0, 3.0, 2.0, 2.0]]),
                  torch.tensor([[-1.0, 0.0]]), torch.tensor([[5.0, 1.0]]), tokens=4)
    stats.metadata = dict(MLA_META if metadata is None else metadata)
    return stats


def test_fp8_per_tensor_gives_k_and_v_the_rows_scale():
    layer = solve_scales(mla_stats(), recipe(spec("fp8_e4m3"))).layers[0]
    # the row's absmax is |-8| (the latent); fp8 e4m3's largest value 448: vLLM's one _k_scale
    assert layer.k_scale.item() == pytest.approx(8.0 / 448)
    assert torch.equal(layer.k_scale, layer.v_scale)


def test_other_models_and_recipes_keep_their_own_k_and_v_scales():
    plain = solve_scales(mla_stats({}), recipe(spec("fp8_e4m3"))).layers[0]  # not MLA
    assert plain.v_scale.item() == pytest.approx(5.0 / 448)
    per_head = solve_scales(mla_stats(), recipe(spec("fp8_e4m3", "head"))).layers[0]
    assert per_head.k_scale.tolist() == pytest.approx([8.0 / 448]) and per_head.v_scale.tolist() == pytest.approx([5.0 / 448])
    int8 = solve_scales(mla_stats(), recipe(spec("int8"))).layers[0]
    assert int8.k_scale.item() == pytest.approx(8.0 / 127) and int8.v_scale.item() == pytest.approx(5.0 / 127)


# --- what the exports refuse -------------------------------------------------------------------------------------

def mla_scales(rec: KVRecipe, k: float = 0.5, v: float = 0.5, q: torch.Tensor | None = None) -> KVScales:
    shape = () if rec.key.granularity == "tensor" else (1,)
    layer = LayerScales(torch.full(shape, k), torch.full(shape, v), q_scale=q)
    return KVScales(recipe=rec, layers={0: layer, 1: layer}, metadata=dict(MLA_META))


def test_vllm_export_takes_fp8_per_tensor_with_one_row_scale():
    notes = check_mla_export(mla_scales(recipe(spec("fp8_e4m3"))), "vllm")
    assert "one scale per layer" in notes[0]
    assert check_mla_export(KVScales(recipe=recipe(spec("int8")), layers={}, metadata={}), "trtllm") == []  # not MLA


@pytest.mark.parametrize(("scales", "message"), [
    (mla_scales(recipe(spec("int8"))), "no integer or fp4 MLA cache"),
    (mla_scales(recipe(spec("fp8_e4m3"), spec("fp8_e5m2"))), "K fp8_e4m3 / V fp8_e5m2"),
    (mla_scales(recipe(spec("fp8_e4m3", "head"))), "one scale per layer"),
    (mla_scales(recipe(spec("fp8_e4m3"), query=spec("fp8_e4m3")), q=torch.tensor(1.0)), "absorbed query"),
    (mla_scales(recipe(spec("fp8_e4m3")), k=0.5, v=0.25), "layer 0 has K scale 0.5 and V scale 0.25"),
])
def test_vllm_export_refuses_what_vllms_mla_cannot_apply(scales, message):
    with pytest.raises(UsageError, match=message) as caught:
        check_mla_export(scales, "vllm")
    assert "MLA" in str(caught.value)


@pytest.mark.parametrize("export_format", sorted(MLA_REFUSED))
def test_other_formats_are_refused_for_mla_with_the_reason(export_format):
    with pytest.raises(UsageError, match=f"--format {export_format} for an MLA") as caught:
        check_mla_export(mla_scales(recipe(spec("fp8_e4m3"))), export_format)
    assert caught.value.hint == "export --format vllm"


@pytest.mark.parametrize("observer", ["attention", "loss"])
def test_observers_that_score_attention_are_refused_for_mla(observer):
    """Their q . k needs per-head keys; an MLA layer caches the latent they are expanded from (kv_b_proj)."""
    with pytest.raises(UsageError, match=f"observer {observer}.*MLA model caches a latent row"):
        solve_scales(mla_stats(), recipe(QuantSpec(format="int8", symmetric=False, granularity="head",
                                                   observer=observer)))
