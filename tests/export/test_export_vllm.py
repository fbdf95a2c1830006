"""--format vllm: loaded by a real client (transformers + compressed-tensors), validated by its models."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from export_helpers import model_metadata, recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvq.artifacts.scales import KVScales
from kvq.errors import UsageError
from kvq.export import export_artifact


def _attention_scales(model) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """k_scale / v_scale of every attention module compressed-tensors set up, by layer index."""
    found = {}
    for layer_index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        found[layer_index] = (attn.k_scale.detach().clone(), attn.v_scale.detach().clone())
    return found


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_transformers_loads_the_export_with_the_artifact_scales(tiny_llama, make_artifact, tmp_path, granularity):
    artifact = make_artifact(recipe("fp8_e4m3", True, granularity), model_metadata(tiny_llama))
    out = tmp_path / "fp8kv"
    result = export_artifact(artifact, "vllm", out=out, model=str(tiny_llama))
    assert result.out == out

    scales = KVScales.load(artifact)
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = _attention_scales(model)
    heads = model.config.num_key_value_heads
    assert sorted(loaded) == sorted(scales.layers)
    for i, (k, v) in loaded.items():
        if granularity == "tensor":
            assert k.shape == (1,) and v.shape == (1,)
            assert torch.equal(k, scales.layers[i].k_scale.reshape(1))
            assert torch.equal(v, scales.layers[i].v_scale.reshape(1))
        else:
            assert k.shape == (heads, 1, 1)
            assert torch.equal(k.flatten(), scales.layers[i].k_scale)
            assert torch.equal(v.flatten(), scales.layers[i].v_scale)
    # Every attention module got a kv-cache quantization scheme from compressed-tensors.
    for layer in model.model.layers:
        args = layer.self_attn.quantization_scheme.input_activations
        assert args.type == "float" and args.num_bits == 8
        assert args.strategy == ("tensor" if granularity == "tensor" else "attn_head")

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 6
    assert tokenizer.decode(generated[0, ids.shape[1]:]).strip()

    # The client quantizes the cache with these scales: the logits differ from the plain model's.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base(ids).logits)


def test_weights_are_linked_untouched(tiny_llama, make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    out = tmp_path / "fp8kv"
    result = export_artifact(artifact, "vllm", out=out, model=str(tiny_llama))
    source = tiny_llama / "model.safetensors"
    linked = out / "model-00001-of-00001.safetensors"
    assert os.stat(linked).st_ino == os.stat(source).st_ino  # same filesystem: hard link
    assert _sha256(linked) == _sha256(source)
    assert result.copied == 0 and result.linked >= 2
    assert not (out / "model.safetensors").exists()  # transformers would ignore the index beside it
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    scale_names = {n for n in index["weight_map"] if n.endswith(("k_scale", "v_scale"))}
    assert scale_names == {f"model.layers.{i}.self_attn.{w}_scale" for i in range(layers) for w in "kv"}
    assert {index["weight_map"][n] for n in scale_names} == {"kvq-kv-scales.safetensors"}
    # total_size: the model's tensor bytes plus 2 * layers float32 scalars
    # oracle: the bytes of every tensor the model file holds, loaded by safetensors itself
    from safetensors.torch import load_file

    model_bytes = sum(t.numel() * t.element_size() for t in load_file(source).values())
    assert index["metadata"]["total_size"] == model_bytes + 2 * layers * 4


@pytest.mark.parametrize("granularity,strategy", [("tensor", "tensor"), ("head", "attn_head")])
def test_config_validates_with_compressed_tensors(tiny_llama, make_artifact, tmp_path, granularity, strategy):
    artifact = make_artifact(recipe("fp8_e4m3", True, granularity), model_metadata(tiny_llama))
    out = tmp_path / "fp8kv"
    export_artifact(artifact, "vllm", out=out, model=str(tiny_llama))
    config = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    assert qc.quant_method == "compressed-tensors"
    assert qc.config_groups == {}
    assert qc.kv_cache_scheme == QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                                                  strategy=strategy)
    # The rest of config.json is the model's, key for key.
    original = json.loads((tiny_llama / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == original


def test_existing_compressed_tensors_config_is_merged(tiny_llama, make_artifact, tmp_path):
    model = tmp_path / "fp8-weights"
    model.mkdir()
    for path in tiny_llama.iterdir():
        os.link(path, model / path.name)
    config = json.loads((tiny_llama / "config.json").read_text())
    existing = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                      "dynamic": True},
            }
        },
        "ignore": ["lm_head"],
    }
    config["quantization_config"] = existing
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(config))
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(model))
    out = tmp_path / "out"
    export_artifact(artifact, "vllm", out=out, model=str(model))
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in written.items() if k != "kv_cache_scheme"} == existing
    qc = QuantizationConfig.model_validate(written)
    assert qc.kv_cache_scheme.strategy == "tensor" and qc.kv_cache_scheme.type == "float"
    assert list(qc.config_groups) == ["group_0"]


def test_other_quant_method_is_refused_not_clobbered(tiny_llama, make_artifact, tmp_path):
    model = tmp_path / "fp8-other"
    model.mkdir()
    for path in tiny_llama.iterdir():
        if path.name != "config.json":
            os.link(path, model / path.name)
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (model / "config.json").write_text(json.dumps(config))
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(model))
    with pytest.raises(UsageError, match="quant_method 'fp8'"):
        export_artifact(artifact, "vllm", out=tmp_path / "out", model=str(model))
    assert not (tmp_path / "out").exists()


def test_export_of_an_export_is_refused(tiny_llama, make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    first = tmp_path / "first"
    export_artifact(artifact, "vllm", out=first, model=str(tiny_llama))
    with pytest.raises(UsageError, match="already carries KV-cache scales"):
        export_artifact(artifact, "vllm", out=tmp_path / "second", model=str(first))


def test_smollm2_end_to_end(make_artifact, tmp_path):
    """The default model: export, load with transformers + compressed-tensors, check 30 layers, generate text."""
    from kvq.model.loading import resolve_model

    folder = resolve_model(None)[2]
    metadata = model_metadata(folder)
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), metadata)
    out = tmp_path / "smollm2-fp8kv"
    export_artifact(artifact, "vllm", out=out)  # --model defaults to the embedded SmolLM2
    scales = KVScales.load(artifact)
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = _attention_scales(model)
    assert len(loaded) == int(metadata["num_layers"]) == 30
    for i, (k, v) in loaded.items():
        assert torch.equal(k, scales.layers[i].k_scale.reshape(1))
        assert torch.equal(v, scales.layers[i].v_scale.reshape(1))
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:])
    assert text.strip()


def _written(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for path in out.glob("*.safetensors"):
        found.update(load_file(str(path)))
    return found


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_query_scales_are_written_where_vllm_reads_them(tiny_llama, make_artifact, tmp_path, granularity):
    from kvq.artifacts.scales import LayerScales
    from kvq.recipe.schema import QuantSpec

    meta = model_metadata(tiny_llama)
    spec = QuantSpec(format="fp8_e4m3", symmetric=True, granularity=granularity)
    rec = recipe("fp8_e4m3", True, granularity).model_copy(update={"query": spec})
    kv = int(meta["num_kv_heads"])
    layers = {}
    for i in range(int(meta["num_layers"])):
        k = torch.full((), 0.5 + i) if granularity == "tensor" else torch.arange(1.0, kv + 1) * (i + 1)
        q = torch.full((), 0.25 + i) if granularity == "tensor" else torch.tensor([1.0, 1.0, 3.0, 3.0]) * (i + 1)
        layers[i] = LayerScales(k, k * 2, q_scale=q)
    artifact = make_artifact(rec, meta, layers)
    out = tmp_path / "q"
    result = export_artifact(artifact, "vllm", out=out, model=str(tiny_llama))
    written = _written(out)
    for i, layer in layers.items():
        got = written[f"model.layers.{i}.self_attn.q_scale"]
        want = layer.q_scale.reshape(1) if granularity == "tensor" else layer.q_scale.reshape(-1, 1, 1)
        assert torch.equal(got, want)  # (1,) per tensor; (num_attention_heads, 1, 1) with attn_head
    assert any("q_scale" in w for w in result.warnings)


def test_query_granularity_must_match_the_kv_strategy(tiny_llama, make_artifact, tmp_path):
    from kvq.artifacts.scales import LayerScales
    from kvq.recipe.schema import QuantSpec

    meta = model_metadata(tiny_llama)
    rec = recipe("fp8_e4m3", True, "tensor").model_copy(
        update={"query": QuantSpec(format="fp8_e4m3", symmetric=True, granularity="head")})
    layers = {i: LayerScales(torch.tensor(1.0), torch.tensor(1.0), q_scale=torch.ones(4))
              for i in range(int(meta["num_layers"]))}
    artifact = make_artifact(rec, meta, layers)
    with pytest.raises(UsageError, match="the query is solved per head but K/V per tensor"):
        export_artifact(artifact, "vllm", out=tmp_path / "x", model=str(tiny_llama))
    assert not (tmp_path / "x").exists()


def test_fnuz_scales_export_for_rocm(tiny_llama, make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3fnuz", True, "tensor"), model_metadata(tiny_llama))
    result = export_artifact(artifact, "vllm", out=tmp_path / "rocm", model=str(tiny_llama))
    written = _written(tmp_path / "rocm")
    scales = KVScales.load(artifact)
    assert torch.equal(written["model.layers.0.self_attn.k_scale"], scales.layers[0].k_scale.reshape(1))
    assert any("absmax / 224" in w for w in result.warnings)
