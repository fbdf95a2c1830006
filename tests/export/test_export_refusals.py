"""Every (format, number format, symmetry, granularity) combination: exported or refused, by hand table.

The table below is written from the engines' loaders (docs/engines.md), not derived from kvq's code:

* vllm: fp8 e4m3 per tensor or per head; per channel only reduced to per head.
* modelopt, sglang-json: fp8 e4m3, one scale per tensor; finer only with --reduce max (modelopt into a
  ModelOpt FP8 checkpoint; sglang-json and lmdeploy only with --legacy: no current release applies them).
* trtllm: fp8 e4m3 or int8 symmetric, one factor per layer; finer only with --reduce max.
* lmdeploy: int8; symmetric finer scales with --reduce max; asymmetric only per tensor (or one head
  per rank), never merged.
"""

from __future__ import annotations

import pytest
from export_helpers import model_metadata, recipe, synthetic_metadata

from kvq.errors import UsageError
from kvq.export import EXPORT_FORMATS, export_artifact

OK, REDUCE, NO = "ok", "needs --reduce max", "refused"

# (number format, symmetric, granularity) -> outcome per format
TABLE = {
    ("fp8_e4m3", True, "tensor"): {"vllm": OK, "modelopt": OK, "sglang-json": OK, "trtllm": OK, "lmdeploy": NO},
    ("fp8_e4m3", True, "head"): {"vllm": OK, "modelopt": REDUCE, "sglang-json": REDUCE, "trtllm": REDUCE,
                                 "lmdeploy": NO},
    ("fp8_e4m3", True, "channel"): {"vllm": REDUCE, "modelopt": REDUCE, "sglang-json": REDUCE, "trtllm": REDUCE,
                                    "lmdeploy": NO},
    # e4m3fnuz (ROCm): vLLM's compressed-tensors path takes absmax / 224 as it is; ModelOpt's path gets it halved
    ("fp8_e4m3fnuz", True, "tensor"): {"vllm": OK, "modelopt": OK, "sglang-json": NO, "trtllm": NO, "lmdeploy": NO},
    ("fp8_e4m3fnuz", True, "head"): {"vllm": OK, "modelopt": REDUCE, "sglang-json": NO, "trtllm": NO,
                                     "lmdeploy": NO},
    # NVFP4: a ModelOpt checkpoint (kv_cache_quant_algo NVFP4); vLLM 0.33 refuses compressed-tensors NVFP4 KV
    ("nvfp4", True, "tensor"): {"vllm": NO, "modelopt": OK, "sglang-json": NO, "trtllm": NO, "lmdeploy": NO},
    ("fp8_e5m2", True, "tensor"): {f: NO for f in EXPORT_FORMATS},
    ("fp8_e5m2", True, "head"): {f: NO for f in EXPORT_FORMATS},
    ("int8", True, "tensor"): {"vllm": NO, "modelopt": NO, "sglang-json": NO, "trtllm": OK, "lmdeploy": OK},
    ("int8", True, "head"): {"vllm": NO, "modelopt": NO, "sglang-json": NO, "trtllm": REDUCE, "lmdeploy": REDUCE},
    ("int8", True, "channel"): {"vllm": NO, "modelopt": NO, "sglang-json": NO, "trtllm": REDUCE,
                                "lmdeploy": REDUCE},
    ("int8", False, "tensor"): {"vllm": NO, "modelopt": NO, "sglang-json": NO, "trtllm": NO, "lmdeploy": OK},
    ("int8", False, "head"): {f: NO for f in EXPORT_FORMATS},
    ("int8", False, "channel"): {f: NO for f in EXPORT_FORMATS},
    ("int4", True, "tensor"): {f: NO for f in EXPORT_FORMATS},
    ("int4", True, "head"): {f: NO for f in EXPORT_FORMATS},
    ("int4", False, "tensor"): {f: NO for f in EXPORT_FORMATS},
    ("int4", False, "head"): {f: NO for f in EXPORT_FORMATS},
    ("int4", False, "channel"): {f: NO for f in EXPORT_FORMATS},
}
CASES = [(export_format, combo, TABLE[combo][export_format]) for combo in TABLE for export_format in EXPORT_FORMATS]


LEGACY = ("sglang-json", "lmdeploy")  # no current engine release applies them: --legacy writes them


def _out(tmp_path, export_format):
    return tmp_path / ("out.json" if export_format == "sglang-json" else "out")


def _kwargs(export_format, tiny_llama, modelopt_fp8_model) -> dict:
    """What each format needs besides the artifact: its model, or --legacy."""
    if export_format == "vllm":
        return {"model": str(tiny_llama)}
    if export_format == "modelopt":
        return {"model": str(modelopt_fp8_model)}
    return {"legacy": True} if export_format in LEGACY else {}


@pytest.mark.parametrize("export_format,combo,outcome", CASES, ids=[f"{f}-{c[0]}-{'sym' if c[1] else 'asym'}-{c[2]}"
                                                          for f, c, _ in CASES])
def test_support_matrix(tiny_llama, modelopt_fp8_model, make_artifact, tmp_path, export_format, combo, outcome):
    number, symmetric, granularity = combo
    meta = model_metadata(tiny_llama)  # 3 layers, 2 KV heads, head_dim 16
    artifact = make_artifact(recipe(number, symmetric, granularity), meta)
    kwargs = _kwargs(export_format, tiny_llama, modelopt_fp8_model)
    out = _out(tmp_path, export_format)
    if outcome == OK:
        export_artifact(artifact, export_format, out=out, **kwargs)
        assert out.exists()
        return
    with pytest.raises(UsageError) as err:
        export_artifact(artifact, export_format, out=out, **kwargs)
    assert not out.exists()
    if outcome == REDUCE:
        assert "--reduce max" in (err.value.hint or "")
        export_artifact(artifact, export_format, out=out, reduce="max", **kwargs)
        assert out.exists()
    else:  # refused even with --reduce max
        with pytest.raises(UsageError):
            export_artifact(artifact, export_format, out=out, reduce="max", **kwargs)
        assert not out.exists()


@pytest.mark.parametrize("export_format", EXPORT_FORMATS)
def test_mixed_k_and_v_formats_are_refused(tiny_llama, modelopt_fp8_model, make_artifact, tmp_path, export_format):
    artifact = make_artifact(recipe("int8", True, "tensor", v_fmt="fp8_e4m3"), model_metadata(tiny_llama))
    kwargs = _kwargs(export_format, tiny_llama, modelopt_fp8_model)
    with pytest.raises(UsageError, match="K as int8 and V as fp8_e4m3"):
        export_artifact(artifact, export_format, out=_out(tmp_path, export_format), **kwargs)


def test_vllm_reduces_channel_to_head_not_tensor(tiny_llama, make_artifact, tmp_path):
    import json

    artifact = make_artifact(recipe("fp8_e4m3", True, "channel"), model_metadata(tiny_llama))
    out = tmp_path / "out"
    export_artifact(artifact, "vllm", out=out, model=str(tiny_llama), reduce="max")
    scheme = json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert scheme["strategy"] == "attn_head"


@pytest.mark.parametrize("export_format,tp,heads,message", [
    ("sglang-json", 3, 4, "not divisible by 3"),
    ("trtllm", 3, 4, "not divisible by 3"),
    ("lmdeploy", 3, 4, "not divisible by 3"),
    ("lmdeploy", 8, 4, "cannot replicate heads"),
    ("sglang-json", 6, 4, "not a multiple"),
])
def test_tp_that_cannot_split_heads_is_refused(make_artifact, tmp_path, export_format, tp, heads, message):
    number = "int8" if export_format == "lmdeploy" else "fp8_e4m3"
    artifact = make_artifact(recipe(number, True, "tensor"), synthetic_metadata(heads=heads))
    with pytest.raises(UsageError, match=message):
        export_artifact(artifact, export_format, out=_out(tmp_path, export_format), tp=tp,
                      legacy=export_format in LEGACY)


def test_lmdeploy_asymmetric_heads_merged_on_a_rank_are_refused(make_artifact, tmp_path):
    artifact = make_artifact(recipe("int8", False, "head"), synthetic_metadata(heads=4))
    with pytest.raises(UsageError, match="merging asymmetric parameters is not exact"):
        export_artifact(artifact, "lmdeploy", out=tmp_path / "o", tp=2, reduce="max", legacy=True)
    export_artifact(artifact, "lmdeploy", out=tmp_path / "o", tp=4, legacy=True)  # one head per rank: exact
    assert len(list((tmp_path / "o").iterdir())) == 2 * 4


# --- engine truth: what no current release applies is refused, naming the releases that do --------
# (vLLM 0.33.0, SGLang 0.5.23, TensorRT-LLM main, LMDeploy 0.18.0 read for issue 9; docs/engines.md)


@pytest.mark.parametrize("export_format,number,says", [
    # SGLang models/llama.py load_kv_cache_scales + flashinfer_backend.py@0.5.23; vLLM removed the flag in 0.7.0
    ("sglang-json", "fp8_e4m3", ["SGLang 0.5.2-0.5.23", "vLLM >= 0.7.0", "SGLang <= 0.5.1"]),
    # LMDeploy commit e5aaca541 (#1377, v0.4.0): TurboMind quantizes online and reads no file
    ("lmdeploy", "int8", ["LMDeploy >= 0.4.0", "LMDeploy 0.0.4-0.3.0"]),
])
def test_formats_no_current_release_applies_need_legacy(tiny_llama, make_artifact, tmp_path, export_format,
                                                        number, says):
    artifact = make_artifact(recipe(number, True, "tensor"), model_metadata(tiny_llama))
    out = _out(tmp_path, export_format)
    with pytest.raises(UsageError) as err:
        export_artifact(artifact, export_format, out=out)
    assert all(text in err.value.message for text in says), err.value.message
    assert "--legacy" in err.value.hint and not out.exists()
    result = export_artifact(artifact, export_format, out=out, legacy=True)
    assert out.exists() and any("--legacy" in w for w in result.warnings) and result.serve


def test_modelopt_kv_only_export_is_refused(tiny_llama, make_artifact, tmp_path):
    """vLLM 0.33 / SGLang 0.5.23 do not recognise quant_algo null; TensorRT-LLM's PyTorch backend uses 1.0."""
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    with pytest.raises(UsageError, match="not a ModelOpt checkpoint") as err:
        export_artifact(artifact, "modelopt", out=tmp_path / "o", model=str(tiny_llama))
    assert "--format vllm" in err.value.hint and not (tmp_path / "o").exists()


def test_modelopt_export_into_a_kv_only_modelopt_config_is_refused(tiny_llama, make_artifact, tmp_path):
    import json
    import os

    model = tmp_path / "kv-only"
    model.mkdir()
    for path in tiny_llama.iterdir():
        os.link(path, model / path.name)
    (model / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": None}}))
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    with pytest.raises(UsageError, match="declares no quant_algo"):
        export_artifact(artifact, "modelopt", out=tmp_path / "o", model=str(model))


@pytest.mark.parametrize("granularity,serve,warns", [
    # per tensor: vLLM >= 0.20 on FLASH_ATTN / FLASHINFER / TRITON_ATTN; SGLang >= 0.5.19
    ("tensor", ["vllm serve", "--kv-cache-dtype fp8", "sglang.launch_server", "fp8_e4m3"],
     ["0.15-0.19", "FLASHINFER", "MI300", "Qwen2"]),
    # per head: only vLLM's FLASH_ATTN (FA3 Hopper >= 0.15, FA4 SM100 >= 0.28)
    ("head", ["--attention-backend FLASH_ATTN"], ["FLASH_ATTN", "refuses to start", "SGLang ignores"]),
])
def test_vllm_export_prints_the_serve_command_that_applies_the_scales(tiny_llama, make_artifact, tmp_path,
                                                                      granularity, serve, warns):
    artifact = make_artifact(recipe("fp8_e4m3", True, granularity), model_metadata(tiny_llama))
    out = tmp_path / "o"
    result = export_artifact(artifact, "vllm", out=out, model=str(tiny_llama))
    assert all(any(text in line and str(out) in line for line in result.serve) for text in serve), result.serve
    assert all(any(text in w for w in result.warnings) for text in warns), result.warnings
