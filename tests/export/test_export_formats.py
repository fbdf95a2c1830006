"""Golden tests of sglang-json, trtllm, lmdeploy and modelopt from hand-computed scales.

The scales below are dyadic (exact in float32), so every expected number is exact. Per head,
two layers, four KV heads:

    layer 0: K = [0.5, 0.25, 1.0, 0.125]     V = [0.75, 0.0625, 0.5, 2.0]
    layer 1: K = [0.375, 1.5, 0.25, 0.25]    V = [0.125, 0.5, 3.0, 0.03125]

max(K, V) per head: layer 0 [0.75, 0.25, 1.0, 2.0], layer 1 [0.375, 1.5, 3.0, 0.25].
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from export_helpers import model_metadata, recipe, synthetic_metadata
from safetensors import safe_open
from safetensors.torch import save_file

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.errors import UsageError
from kvq.export import export_artifact
from kvq.export.lmdeploy import lmdeploy_zero_point
from kvq.quant.qparams import choose_qparams, dequantize, quantize

GOLDEN = Path(__file__).parent / "golden"
K = {0: [0.5, 0.25, 1.0, 0.125], 1: [0.375, 1.5, 0.25, 0.25]}
V = {0: [0.75, 0.0625, 0.5, 2.0], 1: [0.125, 0.5, 3.0, 0.03125]}


def per_head_layers(k_zp=None, v_zp=None) -> dict[int, LayerScales]:
    layers = {}
    for i in (0, 1):
        layers[i] = LayerScales(
            torch.tensor(K[i]), torch.tensor(V[i]),
            None if k_zp is None else torch.tensor(k_zp[i], dtype=torch.int32),
            None if v_zp is None else torch.tensor(v_zp[i], dtype=torch.int32),
        )
    return layers


def per_tensor_layers(k, v, k_zp=None, v_zp=None) -> dict[int, LayerScales]:
    return {
        i: LayerScales(torch.tensor(k[i]), torch.tensor(v[i]),
                       None if k_zp is None else torch.tensor(k_zp[i], dtype=torch.int32),
                       None if v_zp is None else torch.tensor(v_zp[i], dtype=torch.int32))
        for i in (0, 1)
    }


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}


# --- sglang-json ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tp,golden", [(2, "sglang_fp8_head_tp2.json"), (8, "sglang_fp8_head_tp8.json")])
def test_sglang_json_golden(make_artifact, tmp_path, tp, golden):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), synthetic_metadata(), per_head_layers())
    out = tmp_path / "kv_cache_scales.json"
    result = export_artifact(artifact, "sglang-json", out=out, tp=tp, reduce="max" if tp == 2 else None,
                           legacy=True)
    assert json.loads(out.read_text()) == json.loads((GOLDEN / golden).read_text())
    assert any("max(K scale, V scale)" in n for n in result.notes)


def test_sglang_json_per_tensor_tp1(make_artifact, tmp_path):
    layers = per_tensor_layers({0: 0.5, 1: 0.125}, {0: 0.25, 1: 1.0})
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), synthetic_metadata(), layers)
    out = tmp_path / "scales.json"
    result = export_artifact(artifact, "sglang-json", out=out, legacy=True)
    assert json.loads(out.read_text()) == {
        "model_type": "llama",
        "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": 0.5, "1": 1.0}}},
    }
    assert not any("--reduce max" in n for n in result.notes)
    assert any(f"--quantization-param-path {out} --tp 1" in s for s in result.serve)


def test_sglang_json_passes_sglang_schema_rules(make_artifact, tmp_path):
    """The checks of SGLang's QuantParamSchema, restated: every rank and layer, dtype, model_type."""
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), synthetic_metadata(layers=2, heads=4), per_head_layers())
    out = tmp_path / "s.json"
    export_artifact(artifact, "sglang-json", out=out, tp=4, legacy=True)
    data = json.loads(out.read_text())
    assert data["kv_cache"]["dtype"] == "float8_e4m3fn"
    table = {int(r): {int(layer): s for layer, s in m.items()} for r, m in data["kv_cache"]["scaling_factor"].items()}
    assert sorted(table) == [0, 1, 2, 3]
    assert all(sorted(m) == [0, 1] for m in table.values())
    assert [table[r][0] for r in range(4)] == [0.75, 0.25, 1.0, 2.0]  # one head per rank: no reduction


# --- trtllm --------------------------------------------------------------------------------------


def test_trtllm_fp8_golden(make_artifact, tmp_path):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), synthetic_metadata(), per_head_layers())
    out = tmp_path / "trt"
    export_artifact(artifact, "trtllm", out=out, tp=2, reduce="max")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    assert json.loads((out / "config.json").read_text()) == json.loads((GOLDEN / "trtllm_fp8_tp2_config.json").read_text())
    expected = {0: {0: 0.75, 1: 1.5}, 1: {0: 2.0, 1: 3.0}}
    for rank in (0, 1):
        tensors = tensors_of(out / f"rank{rank}.safetensors")
        assert sorted(tensors) == [f"transformer.layers.{i}.attention.kv_cache_scaling_factor" for i in (0, 1)]
        for i in (0, 1):
            t = tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]
            assert t.dtype == torch.float32 and t.shape == (1,)
            assert t.item() == expected[rank][i]


def test_trtllm_int8_symmetric_per_tensor(make_artifact, tmp_path):
    layers = per_tensor_layers({0: 0.5, 1: 0.125}, {0: 0.25, 1: 1.0})
    artifact = make_artifact(recipe("int8", True, "tensor"), synthetic_metadata(), layers)
    out = tmp_path / "trt"
    export_artifact(artifact, "trtllm", out=out)
    assert json.loads((out / "config.json").read_text())["quantization"] == {"kv_cache_quant_algo": "INT8"}
    tensors = tensors_of(out / "rank0.safetensors")
    assert [tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"].item() for i in (0, 1)] == [0.5, 1.0]


def _trt_checkpoint(folder: Path, tp: int) -> dict[int, dict[str, torch.Tensor]]:
    folder.mkdir()
    config = {
        "architecture": "LlamaForCausalLM", "dtype": "float16", "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 16, "head_size": 2,
        "vocab_size": 32, "hidden_act": "silu",
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    (folder / "config.json").write_text(json.dumps(config))
    ranks = {}
    for r in range(tp):
        torch.manual_seed(r)
        ranks[r] = {f"transformer.layers.{i}.attention.qkv.weight": torch.randn(8, 16).half() for i in (0, 1)}
        save_file(ranks[r], str(folder / f"rank{r}.safetensors"))
    return ranks


def test_trtllm_merges_into_a_checkpoint(make_artifact, tmp_path):
    ckpt = tmp_path / "trt_ckpt"
    original = _trt_checkpoint(ckpt, tp=2)
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), synthetic_metadata(), per_head_layers())
    out = tmp_path / "merged"
    export_artifact(artifact, "trtllm", out=out, tp=2, reduce="max", trtllm_checkpoint=ckpt)
    config = json.loads((out / "config.json").read_text())
    before = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": "FP8"}
    assert {k: v for k, v in config.items() if k != "quantization"} == {k: v for k, v in before.items() if k != "quantization"}
    expected = {0: {0: 0.75, 1: 1.5}, 1: {0: 2.0, 1: 3.0}}
    for r in (0, 1):
        tensors = tensors_of(out / f"rank{r}.safetensors")
        for name, value in original[r].items():
            assert torch.equal(tensors[name], value)
        for i in (0, 1):
            assert tensors[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"].item() == expected[r][i]


def test_trtllm_checkpoint_mismatch_is_refused(make_artifact, tmp_path):
    ckpt = tmp_path / "trt_ckpt"
    _trt_checkpoint(ckpt, tp=2)
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), synthetic_metadata(heads=2))
    with pytest.raises(UsageError, match=r"num_kv_heads 2 .* vs 4"):
        export_artifact(artifact, "trtllm", out=tmp_path / "o", tp=2, trtllm_checkpoint=ckpt)
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), synthetic_metadata())
    with pytest.raises(UsageError, match="tp_size 2, but --tp is 1"):
        export_artifact(artifact, "trtllm", out=tmp_path / "o", tp=1, trtllm_checkpoint=ckpt)
    assert not (tmp_path / "o").exists()


# --- lmdeploy ------------------------------------------------------------------------------------


def _params(path: Path) -> tuple[float, ...]:
    data = path.read_bytes()
    assert len(data) == 16  # TurboMind's loadArrayFromBin({4}) rejects any other size
    return struct.unpack("<4f", data)


def test_lmdeploy_asymmetric_per_tensor(make_artifact, tmp_path):
    # layer 0: K scale 0.5, z -3 -> zp 1.5; V scale 0.25, z 10 -> zp -2.5
    # layer 1: K scale 0.125, z 0 -> zp 0.0; V scale 2.0, z -128 -> zp 256.0
    layers = per_tensor_layers({0: 0.5, 1: 0.125}, {0: 0.25, 1: 2.0}, {0: -3, 1: 0}, {0: 10, 1: -128})
    artifact = make_artifact(recipe("int8", False, "tensor"), synthetic_metadata(), layers)
    out = tmp_path / "tm"
    export_artifact(artifact, "lmdeploy", out=out, tp=2, legacy=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"layers.{i}.past_kv_scale.{r}.weight" for i in (0, 1) for r in (0, 1))
    for r in (0, 1):  # per tensor: every rank holds the same parameters
        assert (out / f"layers.0.past_kv_scale.{r}.weight").read_bytes() == struct.pack("<4f", 0.5, 1.5, 0.25, -2.5)
        assert (out / f"layers.1.past_kv_scale.{r}.weight").read_bytes() == struct.pack("<4f", 0.125, 0.0, 2.0, 256.0)


def test_lmdeploy_asymmetric_per_head_one_head_per_rank(make_artifact, tmp_path):
    k_zp = {0: [-3, 0, 127, -128], 1: [1, 1, 1, 1]}
    v_zp = {0: [1, 2, -1, 0], 1: [0, 0, 0, 0]}
    artifact = make_artifact(recipe("int8", False, "head"), synthetic_metadata(), per_head_layers(k_zp, v_zp))
    out = tmp_path / "tm"
    export_artifact(artifact, "lmdeploy", out=out, tp=4, legacy=True)
    expected_l0 = [  # [k_scale, -k_z * k_scale, v_scale, -v_z * v_scale] of head r
        (0.5, 1.5, 0.75, -0.75), (0.25, 0.0, 0.0625, -0.125), (1.0, -127.0, 0.5, 0.5), (0.125, 16.0, 2.0, 0.0),
    ]
    for r in range(4):
        assert _params(out / f"layers.0.past_kv_scale.{r}.weight") == expected_l0[r]
    assert _params(out / "layers.1.past_kv_scale.2.weight") == (0.25, -0.25, 3.0, 0.0)


def test_lmdeploy_symmetric_reduced(make_artifact, tmp_path):
    artifact = make_artifact(recipe("int8", True, "head"), synthetic_metadata(), per_head_layers())
    out = tmp_path / "tm"
    result = export_artifact(artifact, "lmdeploy", out=out, tp=2, reduce="max", legacy=True)
    assert _params(out / "layers.0.past_kv_scale.0.weight") == (0.5, 0.0, 0.75, 0.0)
    assert _params(out / "layers.0.past_kv_scale.1.weight") == (1.0, 0.0, 2.0, 0.0)
    assert _params(out / "layers.1.past_kv_scale.0.weight") == (1.5, 0.0, 0.5, 0.0)
    assert _params(out / "layers.1.past_kv_scale.1.weight") == (0.25, 0.0, 3.0, 0.0)
    assert any("--reduce max" in n for n in result.notes)


def test_lmdeploy_convention_reproduces_kvq_dequantization():
    """TurboMind's s = round(clamp((x - zp) / scale)), x_hat = s * scale + zp with zp = -z * scale
    gives kvq's codes and values (kvq: q = clamp(round(x / scale) + z), x_hat = (q - z) * scale)."""
    torch.manual_seed(0)
    x = torch.randn(4096) * 3 + 1.25  # float32, as the cache sees it
    spec = recipe("int8", False, "tensor").key
    scale, z = choose_qparams(x.min().float(), x.max().float(), spec)
    zp = lmdeploy_zero_point(scale, z).double()
    q_kvq = quantize(x, scale, z, "int8").to(torch.int32)
    s_lmdeploy = torch.round(((x.double() - zp) / scale.double()).clamp(-128, 127)).to(torch.int32)
    assert torch.equal(q_kvq, s_lmdeploy)
    x_kvq = dequantize(q_kvq, scale, z, "int8").double()
    x_lmdeploy = s_lmdeploy.double() * scale.double() + zp
    # equal up to the float32 rounding of kvq's product and of zp (a few ulps of the range)
    assert (x_kvq - x_lmdeploy).abs().max() <= 4 * torch.finfo(torch.float32).eps * x.abs().max()


# --- modelopt ------------------------------------------------------------------------------------


def test_modelopt_golden(modelopt_fp8_model, make_artifact, tmp_path):
    """ModelOpt 0.47.0's layout (modelopt/torch/export/unified_export_hf.py, quant_utils.py): hf_quant_config
    gains kv_cache_quant_algo FP8; k_proj.k_scale / v_proj.v_scale float32 scalars = amax / 448."""
    meta = model_metadata(modelopt_fp8_model)
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), meta)
    out = tmp_path / "mo"
    result = export_artifact(artifact, "modelopt", out=out, model=str(modelopt_fp8_model), reduce="max")
    golden = (GOLDEN / "modelopt_hf_quant_config.json").read_text()
    assert json.loads((out / "hf_quant_config.json").read_text()) == json.loads(golden)
    # config.json is the model's own file, linked
    assert os.stat(out / "config.json").st_ino == os.stat(modelopt_fp8_model / "config.json").st_ino
    scales = KVScales.load(artifact)
    tensors = tensors_of(out / "kvq-kv-scales.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for i in range(int(meta["num_layers"])):
        for w in "kv":
            name = f"model.layers.{i}.self_attn.{w}_proj.{w}_scale"
            assert tensors[name].shape == () and tensors[name].dtype == torch.float32
            assert tensors[name].item() == scales.layers[i].scale(w).max().item()
            assert index[name] == "kvq-kv-scales.safetensors"
    assert any("--reduce max" in n for n in result.notes)


@pytest.mark.parametrize(("number", "algo", "factor"), [("nvfp4", "NVFP4", 1.0), ("fp8_e4m3fnuz", "FP8", 0.5)])
def test_modelopt_nvfp4_and_fnuz(modelopt_fp8_model, make_artifact, tmp_path, number, algo, factor):
    """NVFP4: kv_cache_quant_algo NVFP4 and the global scale absmax / 448 as k_scale / v_scale (ModelOpt >= 0.42);
    fnuz: half of kvq's absmax / 224, which vLLM's and SGLang's ModelOpt path double on ROCm."""
    meta = model_metadata(modelopt_fp8_model)
    artifact = make_artifact(recipe(number, True, "tensor"), meta)
    out = tmp_path / "mo"
    result = export_artifact(artifact, "modelopt", out=out, model=str(modelopt_fp8_model))
    written = json.loads((out / "hf_quant_config.json").read_text())
    assert written["quantization"]["kv_cache_quant_algo"] == algo
    if number == "nvfp4":  # ModelOpt 0.47.0's layout for an NVFP4 KV cache on an FP8 checkpoint
        assert written == json.loads((GOLDEN / "modelopt_nvfp4_hf_quant_config.json").read_text())
    scales = KVScales.load(artifact)
    tensors = tensors_of(out / "kvq-kv-scales.safetensors")
    for i in range(int(meta["num_layers"])):
        for w in "kv":
            assert tensors[f"model.layers.{i}.self_attn.{w}_proj.{w}_scale"].item() == pytest.approx(
                scales.layers[i].scale(w).item() * factor, rel=1e-7)
    if number == "nvfp4":
        assert any("--kv-cache-dtype nvfp4" in line for line in result.serve)


def test_modelopt_merges_an_existing_hf_quant_config(tiny_llama, make_artifact, tmp_path):
    model = tmp_path / "mo-fp8"
    model.mkdir()
    for path in tiny_llama.iterdir():
        os.link(path, model / path.name)
    existing = {"producer": {"name": "modelopt", "version": "0.29.0"},
                "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}
    (model / "hf_quant_config.json").write_text(json.dumps(existing))
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(model))
    out = tmp_path / "out"
    export_artifact(artifact, "modelopt", out=out, model=str(model))
    written = json.loads((out / "hf_quant_config.json").read_text())
    assert written == {"producer": {"name": "modelopt", "version": "0.29.0"},
                       "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                                        "exclude_modules": ["lm_head"]}}
