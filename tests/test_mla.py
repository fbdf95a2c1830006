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
import tiny_models
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

    for arch in tiny_models.MLA_CONFIGS:
        config = tiny_models.MLA_CONFIGS[arch]()
        dims = latent_dims(config.get_text_config(decoder=True))
        assert dims == LatentDims(32, 8), arch
        assert (dims.k, dims.v, dims.row) == ((1, 32), (1, 8), 40)
    assert latent_dims(tiny_models.CONFIGS["llama"]()) is None


def test_the_kv_shape_of_an_mla_config_is_one_latent_row_per_layer():

    from kvq.model.kv_config import kv_shape
    from kvq.model.model_spec import LayerKV

    shape = kv_shape(tiny_models.MLA_CONFIGS["deepseek_v3"]())
    assert [shape.of(i) for i in shape.kv_layers] == [LayerKV((1, 32), (1, 8))] * 3
    assert shape.elements_per_token == 3 * (32 + 8)  # layers x (kv_lora_rank + qk_rope_head_dim), by hand


def test_a_multimodal_configs_latent_row_is_its_text_models():
    """Kimi K2.5: a DeepSeek-V3 text model under a vision config. (transformers 5.23 builds it only as an
    image-text-to-text model, not AutoModelForCausalLM, which kvq loads: it is not calibrated here.)"""

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


def test_mla_attention_modules_are_named_after_the_latent_projection_without_the_mtp_layer():
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer model.layers.{num_hidden_layers}, which vLLM's
    DeepSeek loader skips (deepseek_v2.py:1650-1652@0.34.0): no scale for it."""
    from kvq.export.checkpoint_folder import WeightIndex, attention_module_names

    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(4) for p in ("kv_a_proj_with_mqa", "kv_b_proj")]
    index = WeightIndex(dict.fromkeys(names, "model.safetensors"), {}, {})
    assert attention_module_names(index, [0, 1, 2], "vllm", mla=True) == {
        i: f"model.layers.{i}.self_attn" for i in range(3)}
    with pytest.raises(UsageError, match="k_proj"):
        attention_module_names(index, [0, 1, 2], "vllm")  # without mla: MLA has no k_proj


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


# --- end to end, through the CLI ---------------------------------------------------------------------------------

ARCHS = sorted(tiny_models.MLA_CONFIGS)  # deepseek_v2, deepseek_v3, kimi_linear
RECIPES, LAYERS = tiny_models.CAL_RECIPES, 3
# the layers with a KV cache: every one of DeepSeek's 3; Kimi Linear's MLA layers 1 and 3 (delta attention elsewhere)
KV_LAYERS = {"kimi_linear": [1, 3]}
# the oracle is the model's own cache (its config's): Kimi Linear's holds the delta-attention state, and those of
# DeepSeek-V3.2 / glm_moe_dsa hold their sparse-attention indexer's keys; the others a plain DynamicCache
OWN_CACHE = {"kimi_linear", "deepseek_v32", "glm_moe_dsa"}
KV_LORA_RANK, ROPE_DIM = 32, 8  # tiny_models._MLA


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_equal_the_models_own_cache(calibrated_tiny, arch, recipe_name):
    """Per layer and channel, the latent (K) and the rotary part (V) exactly as the model's own cache holds them."""


    folder, out = calibrated_tiny(arch, recipe_name)
    token_ids = tiny_models.calibration_token_ids(folder)  # the samples `kvq calibrate` picks (seed 0)
    # the model's own cache (a hybrid model's own: its delta-attention layers keep a recurrent state in it)
    expected = tiny_models.own_cache_absmax(folder, token_ids, whole_windows=arch not in OWN_CACHE)
    layers = KV_LAYERS.get(arch, list(range(LAYERS)))
    assert sorted(expected) == layers
    stats = KVStats.load(out)
    assert stats.metadata[KV_LAYOUT_KEY] == MLA_LAYOUT
    assert sorted(stats.layers) == layers
    for i, (k, v) in expected.items():
        assert k.shape == (1, KV_LORA_RANK) and v.shape == (1, ROPE_DIM)
        assert torch.equal(stats.layers[i].k.absmax, k), f"layer {i} latent"
        assert torch.equal(stats.layers[i].v.absmax, v), f"layer {i} rotary part"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_export_writes_one_row_scale_per_layer(calibrated_tiny, arch, tmp_path):
    """The names every vLLM attention loads (model.layers.{i}.self_attn.k_scale / v_scale: the cache-scale mapper,
    quantization/base_config.py:261@0.34.0), both the row's absmax / 448 (concat_and_cache_mla's one scale,
    v1/attention/backend.py:1088-1110); and the warning that vLLM 0.34.0 does not load them for MLA
    (compressed_tensors.py:213: MLAAttention, mla_attention.py:434, is no Attention)."""
    from safetensors.torch import load_file

    from kvq.cli import main
    from kvq.export import export_artifact

    folder, out = calibrated_tiny(arch, "fp8")
    result = export_artifact(out, "vllm", out=tmp_path / "x", model=str(folder))
    written = load_file(tmp_path / "x" / "kvq-kv-scales.safetensors")
    layers = KV_LAYERS.get(arch, list(range(LAYERS)))
    assert set(written) == {f"model.layers.{i}.self_attn.{w}_scale" for i in layers for w in "kv"}
    stats = KVStats.load(out)
    for i in layers:
        row_absmax = max(float(stats.layers[i].k.absmax.max()), float(stats.layers[i].v.absmax.max()))
        k, v = written[f"model.layers.{i}.self_attn.k_scale"], written[f"model.layers.{i}.self_attn.v_scale"]
        assert k.shape == (1,) and torch.equal(k, v)
        assert k.item() == pytest.approx(row_absmax / 448, rel=1e-6)
    assert [w for w in result.warnings if w.startswith(f"vLLM 0.34.0 ignores KV scales for model type {arch}")]
    assert [n for n in result.notes if n.startswith("MLA: one scale per layer")]
    config = __import__("json").loads((tmp_path / "x" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "tensor"
    for path in (out, tmp_path / "x"):
        assert main(["inspect", str(path)]) == 0
    from kvq.inspection import inspect_path

    assert [n for n in inspect_path(out).found.notes if n.startswith("an MLA latent cache")]
    exported = inspect_path(tmp_path / "x").found.notes  # the per-model loader rows of the engine matrix
    assert [n for n in exported if n.startswith(f"vLLM 0.34.0 ignores KV scales for model type {arch}")]


@pytest.mark.timeout(600)
def test_exports_the_engine_cannot_apply_are_refused(calibrated_tiny, tmp_path, capsys):
    from kvq.cli import main

    folder, int8 = calibrated_tiny("deepseek_v3", "int8")
    code = main(["export-scales", str(int8), "--format", "vllm", "--model", str(folder), "--out", str(tmp_path / "a")])
    assert code == 2 and not (tmp_path / "a").exists()
    assert "no integer or fp4 MLA cache" in capsys.readouterr().err
    _, fp8 = calibrated_tiny("deepseek_v3", "fp8")
    code = main(["export-scales", str(fp8), "--format", "modelopt", "--model", str(folder), "--out", str(tmp_path / "b")])
    assert code == 2 and "for an MLA (latent) KV cache" in capsys.readouterr().err


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ["deepseek_v3"])
def test_eval_validate_plan_and_report(calibrated_tiny, arch, tmp_path):
    """eval counts the real cache: layers x (kv_lora_rank + qk_rope_head_dim) x bytes per token, by hand."""
    import json

    from kvq.cli import main

    folder, fp8 = calibrated_tiny(arch, "fp8")
    _, int8 = calibrated_tiny(arch, "int8")
    report = tmp_path / "eval.json"
    code = main(["eval", "--model", str(folder), "--dataset", "pydoc", "--scales", str(fp8), "--scales", str(int8),
                 "--samples", "2", "--seqlen", "32", "--device", "cpu", "--json", str(report)])
    assert code == 0
    rows = {row["name"]: row for row in json.loads(report.read_text())["rows"]}
    elements = LAYERS * (KV_LORA_RANK + ROPE_DIM)  # 3 x (32 + 8) = 120 per token
    assert rows["baseline (float32)"]["kv_bytes_per_token"] == elements * 4
    assert rows["fp8-e4m3-per-tensor"]["kv_bytes_per_token"] == elements
    assert rows["int8-asym-per-head"]["kv_bytes_per_token"] == elements
    assert main(["validate", str(fp8), "--model", str(folder), "--dataset", "pydoc", "--samples", "2", "--seqlen",
                 "32", "--device", "cpu"]) == 0
    assert main(["plan", str(fp8), "--model", str(folder), "--dataset", "pydoc", "--samples", "2", "--seqlen", "32",
                 "--device", "cpu", "--skip", "1"]) == 0
    plan = json.loads((fp8 / "plan.json").read_text())
    assert plan  # the plan's bytes: 1 layer float32 (40 x 4) + 2 layers fp8 (2 x 40) = 240
    assert main(["report", str(fp8), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "channels.png").is_file()
