"""Gemma 4 (gemma4_text), end to end: wider full-attention layers, KV sharing, attention_k_eq_v.

Small random models from transformers 5.23's Gemma4TextConfig (tests/tiny_models.py GEMMA4_CONFIGS), with
the SmolLM2 tokenizer. Oracles:

* what each layer caches: the cache object the model itself returns (``past_key_values`` of a forward with
  ``use_cache=True``; tests/test_architectures.py ``own_cache``): its layers with keys are the cached ones
  (KV-sharing layers hold a DummyLayer), their K / V shapes are the per-layer shapes, and the statistics'
  absmax per (KV head, channel) must equal that of those keys and values exactly;
* the vllm export's tensor names: vLLM 0.34.0's gemma4 loader, read in its source (cited below);
* ``kvq eval``'s KV bytes per token: hand arithmetic over the real per-layer shapes.
"""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from test_architectures import RECIPES, own_cache

from kvq.artifacts.stats import KVStats
from kvq.cli import main
from kvq.export import export_artifact

pytestmark = pytest.mark.timeout(600)

GEMMA4 = ["gemma4_global", "gemma4_k_eq_v", "gemma4_shared"]  # gemma4_text; gemma4_mm: the multimodal gemma4
SAMPLES, SEQLEN = 2, 32  # as test_architectures.own_cache draws them

# Per layer, what the model's own cache holds (K heads x dim / V heads x dim), by hand from the configs:
# sliding layers 2 KV heads x head_dim 16, full-attention layers global_head_dim 32 (1 KV head with
# attention_k_eq_v: num_global_key_value_heads); KV-sharing layers (3, 4 of gemma4_shared) hold none.
SHAPES = {
    "gemma4_global": {0: ((2, 16), (2, 16)), 1: ((2, 32), (2, 32)), 2: ((2, 16), (2, 16)), 3: ((2, 32), (2, 32))},
    "gemma4_shared": {0: ((2, 16), (2, 16)), 1: ((2, 32), (2, 32)), 2: ((2, 16), (2, 16))},
    "gemma4_k_eq_v": {0: ((2, 16), (2, 16)), 1: ((1, 32), (1, 32)), 2: ((2, 16), (2, 16)), 3: ((1, 32), (1, 32))},
}
NUM_LAYERS = {"gemma4_global": 4, "gemma4_shared": 5, "gemma4_k_eq_v": 4}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("arch", GEMMA4)
def test_statistics_equal_the_models_own_cache_in_every_layer_that_has_one(calibrated_tiny, arch, recipe):
    folder, out = calibrated_tiny(arch, recipe)
    expected, config = own_cache(folder)
    assert {i: (tuple(k.shape), tuple(v.shape)) for i, (k, v) in expected.items()} == {
        i: ((h, d), (vh, vd)) for i, ((h, d), (vh, vd)) in SHAPES[arch].items()}  # the hand table is the cache's
    stats = KVStats.load(out)
    assert sorted(stats.layers) == sorted(expected)
    assert stats.metadata["num_layers"] == str(config.num_hidden_layers) == str(NUM_LAYERS[arch])
    assert stats.metadata["cached_layers"] == ",".join(map(str, sorted(expected)))
    assert stats.metadata["kv_shapes"] == ",".join(f"{k[0]}x{k[1]}/{v[0]}x{v[1]}" for k, v in SHAPES[arch].values())
    for i, (k, v) in expected.items():
        assert torch.equal(stats.layers[i].k.absmax, k), f"layer {i} K"
        assert torch.equal(stats.layers[i].v.absmax, v), f"layer {i} V"
    scales = json.loads((out / "scales.json").read_text())
    assert sorted(map(int, scales["layers"])) == sorted(expected)
    if recipe == "int8":  # per head: one scale per KV head of each layer's own K and V
        for i, (k, v) in SHAPES[arch].items():
            assert len(scales["layers"][str(i)]["k_scale"]) == k[0] and len(scales["layers"][str(i)]["v_scale"]) == v[0]


# Golden names, from vLLM 0.34.0's gemma4 loader (vllm/model_executor/models/gemma4.py):
# * gemma4.py:523-540: every decoder layer's Gemma4Attention builds `self.attn = Attention(..., prefix=f"{prefix}.attn")`,
#   so `model.layers.{i}.self_attn.attn` holds each layer's k_scale / v_scale; Gemma4ForCausalLM (gemma4.py:1463)
#   and Gemma4Model (gemma4.py:1018) set `self.quant_config` and load through `AutoWeightsLoader(self)`
#   (gemma4.py:1420, 1527), which applies base_config.py:232-262 `get_cache_scale_mapper`
#   (`(?<!\.attn)\.([qkv])_scale$` -> `.attn.\1_scale`; utils.py:472-478): `model.layers.{i}.self_attn.k_scale`
#   loads onto that attention layer. The layer mapper (gemma4.py:89-130) renames / drops only `*_proj.` and
#   `k_norm.` names, never a scale.
# * KV sharing, gemma4.py:495-515: a layer among the last num_kv_shared_layers gets
#   `kv_sharing_target_layer_name` = the `self_attn.attn` of the last earlier layer of its layer type; it writes no
#   cache (attention.py:570-600, `kv_sharing_target_layer_name is None`) but reads the target's with its *own*
#   scale: `unified_attention_with_output` calls `self.impl.forward(self, ...)` with the reading layer
#   (attention.py:816-820), FlashAttention descales by `layer._k_scale` (v1/attention/backends/flash_attn.py:1328),
#   and a layer given no scale uses 1.0 (quantization/kv_cache.py:118-122). So the export names the sharing layers
#   too, with the scales of the layer whose cache they read (kvq never calibrates or counts them).
# * attention_k_eq_v (gemma4.py:100-110, 556-576): K's weights load into both the K and V shards of qkv_proj,
#   V = v_norm(k_proj x) is cached as its own tensor: each layer still has its own k_scale and v_scale.
GOLDEN = {
    "gemma4_global": {0: 0, 1: 1, 2: 2, 3: 3},
    "gemma4_shared": {0: 0, 1: 1, 2: 2, 3: 2, 4: 1},  # layer -> the layer whose scales it carries
    "gemma4_k_eq_v": {0: 0, 1: 1, 2: 2, 3: 3},
}


@pytest.mark.parametrize("arch", GEMMA4)
def test_vllm_export_names_every_attention_layer_as_vllm_loads_them(calibrated_tiny, arch, tmp_path):
    folder, out = calibrated_tiny(arch, "fp8")
    result = export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    written = load_file(tmp_path / "export" / "kvq-kv-scales.safetensors")
    assert set(written) == {f"model.layers.{i}.self_attn.{w}_scale" for i in GOLDEN[arch] for w in ("k", "v")}
    scales = json.loads((out / "scales.json").read_text())["layers"]
    for i, source in GOLDEN[arch].items():
        for w in ("k", "v"):
            assert written[f"model.layers.{i}.self_attn.{w}_scale"].tolist() == [scales[str(source)][f"{w}_scale"]]
    assert not [w for w in result.warnings if "ignores KV scales for model type" in w]  # vLLM / SGLang load them
    if arch == "gemma4_shared":
        assert any("KV-sharing layers 3 (reads layer 2), 4 (reads layer 1)" in note for note in result.notes)


def test_per_head_vllm_export_has_each_layers_own_heads(calibrated_tiny, tmp_path):
    """A per-head fp8 export of gemma4_k_eq_v: (heads, 1, 1) per layer, 2 heads on sliding layers, 1 on full."""
    folder, out = calibrated_tiny("gemma4_k_eq_v", "fp8")
    per_head = tmp_path / "per-head"
    assert main(["solve", str(out), "--recipe", "fp8-e4m3-per-head", "--out", str(per_head)]) == 0
    export_artifact(per_head, "vllm", out=tmp_path / "export", model=str(folder))
    written = load_file(tmp_path / "export" / "kvq-kv-scales.safetensors")
    for i, (k, v) in SHAPES["gemma4_k_eq_v"].items():
        assert tuple(written[f"model.layers.{i}.self_attn.k_scale"].shape) == (k[0], 1, 1)
        assert tuple(written[f"model.layers.{i}.self_attn.v_scale"].shape) == (v[0], 1, 1)


@pytest.mark.parametrize("arch", GEMMA4)
def test_inspect_finds_no_defect_in_the_artifact_or_its_export(calibrated_tiny, arch, tmp_path, capsys):
    folder, out = calibrated_tiny(arch, "fp8")
    for text in tiny_models.inspect_artifact_and_export(folder, out, tmp_path / "export", capsys):
        assert "K/V heads x dim per layer 0: 2x16/2x16" in text


@pytest.mark.parametrize("arch", GEMMA4)
def test_eval_counts_the_memory_of_each_cached_layer_at_its_own_shape(calibrated_tiny, arch, tmp_path):
    folder, fp8 = calibrated_tiny(arch, "fp8")
    _, int8 = calibrated_tiny(arch, "int8")
    table, rows = tiny_models.eval_rows(folder, [fp8, int8], tmp_path / "eval.json")
    # by hand: K and V elements per token of each cached layer, summed
    elements = {"gemma4_global": 2 * (2 * 16 + 2 * 32 + 2 * 16 + 2 * 32),  # 384
                "gemma4_shared": 2 * (2 * 16 + 2 * 32 + 2 * 16),  # 256: layers 3, 4 read layers 2, 1's cache
                "gemma4_k_eq_v": 2 * (2 * 16 + 1 * 32 + 2 * 16 + 1 * 32)}[arch]  # 256
    assert table["model"]["cached_layers"] == sorted(SHAPES[arch])
    assert rows["baseline (float32)"]["kv_bytes_per_token"] == elements * 4
    assert rows["fp8-e4m3-per-tensor"]["kv_bytes_per_token"] == elements  # one byte per code
    assert rows["int8-asym-per-head"]["kv_bytes_per_token"] == elements
    assert len(rows["fp8-e4m3-per-tensor"]["attention_error"]["per_layer"]) == len(SHAPES[arch])


def test_scales_of_another_layer_shape_are_refused_in_one_line(calibrated_tiny, tmp_path, capsys):
    """gemma4_global's artifact on gemma4_k_eq_v (same layer count, other full-attention heads): eval refuses."""
    _, out = calibrated_tiny("gemma4_global", "int8")
    folder, _ = calibrated_tiny("gemma4_k_eq_v", "int8")
    capsys.readouterr()
    code = main(["eval", "--model", str(folder), "--dataset", "pydoc", "--scales", str(out), "--samples", "1",
                 "--seqlen", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "layer 1 K/V 2x32/2x32 vs 1x32/1x32" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("engine", ["vLLM", "SGLang"])
@pytest.mark.parametrize("model_type", ["gemma4", "gemma4_text"])
def test_engine_matrix_records_that_the_gemma4_loaders_apply_the_scales(engine, model_type):
    """vLLM 0.34.0 gemma4.py:1420 (AutoWeightsLoader + cache-scale mapper, utils.py:478); SGLang 0.5.23
    gemma4_causal.py:1419 (maybe_remap_kv_scale_name): both load self_attn.k_scale onto the attention layer."""
    from kvq.engines.matrix import loader_warnings, model_type_verdicts
    from kvq.inspection.found import COMPRESSED_TENSORS

    version = {"vLLM": "0.34.0", "SGLang": "0.5.23"}[engine]
    assert [r.verdict for r in model_type_verdicts(engine, version, model_type, COMPRESSED_TENSORS)] == ["applied"]
    assert not [w for w in loader_warnings(COMPRESSED_TENSORS, model_type) if w.startswith(engine)]


def test_transformers_and_compressed_tensors_cannot_load_the_export_and_export_says_so(calibrated_tiny, tmp_path):
    """transformers 5.23 + compressed-tensors 0.20.1, run here (the oracle): initialize_attn_qparams reads
    config.head_dim (compressed_tensors/utils/helpers.py:481), which Gemma 4's per-layer config refuses. The
    engine matrix records it, and the export warns."""
    from transformers import AutoModelForCausalLM

    folder, out = calibrated_tiny("gemma4_global", "fp8")
    result = export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    with pytest.raises(RuntimeError, match="'head_dim' is a per-layer attribute"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert [w for w in result.warnings if w.startswith("transformers + compressed-tensors 0.20.1 refuses KV scales "
                                                       "for model type gemma4_text")]


def test_multimodal_gemma4_calibrates_its_text_model_and_exports_the_names_vllm_maps(calibrated_tiny, tmp_path):
    """model_type gemma4 (Gemma4ForConditionalGeneration): the text model's layers are
    ``model.language_model.layers.{i}``; vLLM 0.34.0 gemma4_mm.py:1080-1092 maps ``model.language_model.`` to
    ``language_model.model.`` and loads through AutoWeightsLoader (gemma4_mm.py:2458-2462, its ``quant_config``
    set at gemma4_mm.py:1101, so the cache-scale mapper applies): ``...self_attn.k_scale`` lands on
    ``language_model.model.layers.{i}.self_attn.attn.k_scale``. KV sharing as in gemma4_shared."""
    folder, out = calibrated_tiny("gemma4_mm", "fp8")
    _, text_out = calibrated_tiny("gemma4_shared", "fp8")  # the text model alone: the same layer shapes
    stats, text_stats = KVStats.load(out), KVStats.load(text_out)
    assert stats.metadata["model_type"] == "gemma4" and stats.metadata["cached_layers"] == "0,1,2"
    assert stats.metadata["kv_shapes"] == text_stats.metadata["kv_shapes"]
    export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    written = load_file(tmp_path / "export" / "kvq-kv-scales.safetensors")
    assert set(written) == {f"model.language_model.layers.{i}.self_attn.{w}_scale"
                            for i in GOLDEN["gemma4_shared"] for w in ("k", "v")}
    scales = json.loads((out / "scales.json").read_text())["layers"]
    for i, source in GOLDEN["gemma4_shared"].items():
        assert written[f"model.language_model.layers.{i}.self_attn.k_scale"].tolist() == [scales[str(source)]["k_scale"]]
    assert main(["inspect", str(tmp_path / "export")]) == 0


def test_validate_plan_and_report_read_each_layer_at_its_own_shape(calibrated_tiny, tmp_path, capsys):
    """gemma4_k_eq_v: sliding layers 0, 2 hold 2 KV heads, full-attention layers 1, 3 one (of 32 channels): the
    report's grids are 4 layers x 2 heads, the second head of layers 1 and 3 empty (null)."""
    folder, out = calibrated_tiny("gemma4_k_eq_v", "int8")
    run = ["--model", str(folder), "--dataset", "pydoc", "--samples", "2", "--seqlen", "32", "--device", "cpu"]
    assert main(["validate", str(out), *run]) == 0
    heads = {int(row["layer"]): row for row in json.loads((out / "validate.json").read_text())["heads"]}
    assert sorted(heads) == [0, 1, 2, 3]
    assert main(["plan", str(out), *run, "--skip", "1", "--force"]) == 0
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    figures = {f["file"]: f for f in json.loads((tmp_path / "report" / "figures.json").read_text())["figures"]}
    for name in ("absmax.png", "scales.png", "sqnr.png"):
        assert figures[name]["axes"][0]["images"] == [[4, 2]], name
        for w in ("k", "v"):
            grid = figures[name]["data"][w]
            assert [row[1] is None for row in grid] == [False, True, False, True], (name, w)
            assert all(row[0] is not None for row in grid)
    channels = figures["channels.png"]["axes"][0]["images"]
    assert channels == [[4, 2 * 32]]  # the widest layer: 2 heads of 32 channels (full layers 1 head x 32, sliding 2 x 16)


def test_inspect_flags_a_kv_sharing_layer_without_scales(calibrated_tiny, tmp_path, capsys):
    """A compressed-tensors Gemma 4 checkpoint whose KV-sharing layers carry no scale: vLLM would read their
    target's fp8 cache at scale 1.0 (see GOLDEN's notes); inspect names each such layer."""
    from safetensors.torch import save_file

    folder, out = calibrated_tiny("gemma4_shared", "fp8")
    export = tmp_path / "export"
    export_artifact(out, "vllm", out=export, model=str(folder))
    path = export / "kvq-kv-scales.safetensors"
    kept = {k: v for k, v in load_file(path).items() if ".layers.3." not in k and ".layers.4." not in k}
    path.unlink()  # a hard-linked export: replace the files, never write through a link
    save_file(kept, path)
    index_path = export / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in kept or "_scale" not in k}
    index_path.unlink()
    index_path.write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["inspect", str(export)]) == 1
    text = capsys.readouterr().out
    assert "layer 3 reads layer 2's KV cache (KV sharing) but has no K scale" in text, text
    assert "layer 4 reads layer 1's KV cache (KV sharing) but has no V scale" in text, text


def test_query_scales_of_a_kv_sharing_model(tiny_model_factory, tmp_path):
    """A recipe with a query: section on gemma4_shared: the layers with a KV cache get q_scale; the KV-sharing
    layers write no K/V, so kvq calibrates no query there, and the export says vLLM runs them at 1.0."""
    folder = tiny_model_factory("gemma4_shared")
    recipe = tmp_path / "fp8-query.yaml"
    recipe.write_text("name: fp8-query\nformat: fp8_e4m3\nsymmetric: true\ngranularity: tensor\nobserver: minmax\n"
                      "query:\n  format: fp8_e4m3\n  granularity: tensor\n")
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(folder), "--dataset", "pydoc", "--samples", "2", "--seqlen", "32",
                 "--device", "cpu", "--recipe", str(recipe), "--out", str(out)]) == 0
    stats = KVStats.load(out)
    assert sorted(stats.layers) == [0, 1, 2] and all(layer.q is not None for layer in stats.layers.values())
    assert tuple(stats.layers[1].q.min.shape) == (4, 32)  # 4 query heads of the full layer's head_dim 32
    result = export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    written = load_file(tmp_path / "export" / "kvq-kv-scales.safetensors")
    assert {n for n in written if n.endswith("q_scale")} == {f"model.layers.{i}.self_attn.q_scale" for i in range(3)}
    assert any("KV-sharing layers 3, 4 have no calibrated query" in note for note in result.notes)
    # eval runs the KV-sharing layers' queries at vLLM's q_scale 1.0 (no calibrated one), the others calibrated
    assert main(["eval", "--model", str(folder), "--dataset", "pydoc", "--scales", str(out), "--samples", "1",
                 "--seqlen", "16", "--device", "cpu"]) == 0


def test_inspect_reads_clipping_per_layer_and_checks_each_layers_shape_against_the_model(calibrated_tiny, tmp_path, capsys):
    folder, out = calibrated_tiny("gemma4_k_eq_v", "fp8")
    other, _ = calibrated_tiny("gemma4_global", "fp8")
    export_artifact(out, "vllm", out=tmp_path / "export", model=str(folder))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "export"), "--stats", str(out), "--tp", "2"]) == 0
    assert "K clip" in capsys.readouterr().out
    assert main(["inspect", str(out), "--model", str(other)]) == 1  # full layers: 1 KV head here, 2 there
    text = capsys.readouterr().out
    assert "layer 1 K heads x dim (1, 32) vs (2, 32)" in text and "layer 3 V heads x dim (1, 32) vs (2, 32)" in text
