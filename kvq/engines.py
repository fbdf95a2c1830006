"""Which serving engines apply, ignore, refuse or break on which KV-cache scales: the engine matrix as data.

One :class:`EngineRow` per (engine, versions, backend, checkpoint kind, granularity, number format),
with a verdict and the source it was read from (``path@version``). `kvq inspect` looks rows up with
:func:`engine_verdicts`; docs/engines.md explains them. Edit the rows here, in one place.

Checkpoint kinds are those of :mod:`kvq.inspection.found`: ``compressed-tensors``, ``modelopt``,
``sglang-json``, ``trtllm``, ``lmdeploy`` (``kvq-artifact`` and ``hf-checkpoint`` have no rows: no
engine reads them as KV scales). Granularity: ``tensor``, ``head``, ``channel``, ``rank`` (one value
per tensor-parallel rank), or ``any``; number format: kvq's names (``fp8_e4m3``, ``int8``, ...) or ``any``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["applied", "ignored", "refused", "broken"]
ANY = "any"


@dataclass(frozen=True)
class EngineRow:
    engine: str
    versions: str
    backend: str
    kind: str  # checkpoint kind / export format
    granularity: str
    number: str
    verdict: Verdict
    note: str
    source: str  # "path@version"


_VLLM_CT = "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py"
_SGL_LOADER = "python/sglang/srt/model_loader/weight_utils.py"
_TRT_LINEAR = "tensorrt_llm/_torch/modules/linear.py"
_TD = "src/turbomind/models/llama/LlamaDecoderLayerWeight.cc"

# Seeded from docs/engines.md as it stands; to be corrected from the engines' current sources.
ENGINE_MATRIX: tuple[EngineRow, ...] = (
    EngineRow("vLLM", "0.33.0", "all attention backends", "compressed-tensors", "tensor", "fp8_e4m3", "applied",
              "serve with --kv-cache-dtype fp8; the cache stores k / k_scale",
              "vllm/v1/attention/ops/triton_reshape_and_cache_flash.py@0.33.0"),
    EngineRow("vLLM", "0.33.0", "FlashAttention (FA3)", "compressed-tensors", "head", "fp8_e4m3", "applied",
              "per-head (attn_head) scales, sliced per rank by the TP-aware loader", f"{_VLLM_CT}@0.33.0"),
    EngineRow("vLLM", "0.33.0", "other backends", "compressed-tensors", "head", "fp8_e4m3", "ignored",
              "per-attention-head scales are used only by the FlashAttention backend",
              "docs/features/quantization/quantized_kvcache.md@0.33.0"),
    EngineRow("vLLM", "older releases", "all", "compressed-tensors", "head", "fp8_e4m3", "refused",
              "'Only support per-tensor scaling factor for compressed-tensors KV cache'", f"{_VLLM_CT}@older"),
    EngineRow("vLLM", "0.33.0", "ROCm (fp8 e4m3fnuz)", "compressed-tensors", "tensor", "fp8_e4m3", "applied",
              "vLLM doubles the e4m3fn scales itself for e4m3fnuz",
              "vllm/model_executor/layers/quantization/kv_cache.py@0.33.0"),
    EngineRow("vLLM", "0.33.0", "all", "modelopt", "tensor", "fp8_e4m3", "refused",
              "a ModelOpt checkpoint needs a quant_algo ('Missing quant_algo'); KV scales alone: use --format vllm",
              "vllm/model_executor/layers/quantization/modelopt.py@0.33.0"),
    EngineRow("vLLM", "old releases (--quantization-param-path)", "all", "sglang-json", "rank", "fp8_e4m3",
              "applied", "per-tensor scales per rank", "vllm/model_executor/model_loader/weight_utils.py@old"),
    EngineRow("vLLM", "0.33.0", "all", "sglang-json", ANY, ANY, "refused",
              "--quantization-param-path no longer exists", "vllm/engine/arg_utils.py@0.33.0"),
    EngineRow("transformers + compressed-tensors", "5.x / 0.20", "eager (fake-quantized cache)", "compressed-tensors",
              ANY, "fp8_e4m3", "applied", "QuantizedKVCache fake-quantizes K/V with the loaded scales",
              "compressed_tensors/modeling/kvcache.py@0.20.1"),
    EngineRow("SGLang", "0.5.23", "all", "compressed-tensors", "tensor", "fp8_e4m3", "applied",
              "static symmetric per-tensor fp8 only",
              "python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py@0.5.23"),
    EngineRow("SGLang", "0.5.23", "all", "compressed-tensors", "head", ANY, "ignored",
              "any other kv_cache_scheme is ignored with a warning: scales fall back to 1.0",
              "python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py@0.5.23"),
    EngineRow("SGLang", "0.5.23", "all", "sglang-json", "rank", "fp8_e4m3", "applied",
              "--quantization-param-path with --kv-cache-dtype fp8_e4m3; a bad file is logged and 1.0 used",
              f"{_SGL_LOADER}@0.5.23"),
    EngineRow("SGLang", "0.5.23", "all", "sglang-json", "rank", "fp8_e5m2", "refused",
              "kv_cache.dtype must be float8_e4m3fn (check_is_fp8)", f"{_SGL_LOADER}@0.5.23"),
    EngineRow("TensorRT-LLM", "PyTorch backend, TRTLLM_LOAD_KV_SCALES=1", "PyTorch", "modelopt", "tensor",
              "fp8_e4m3", "applied", "k_scale / v_scale of the K/V projections", f"{_TRT_LINEAR}@ed53795b33"),
    EngineRow("TensorRT-LLM", "PyTorch backend, TRTLLM_LOAD_KV_SCALES unset", "PyTorch", "modelopt", "tensor",
              "fp8_e4m3", "ignored", "scales loaded only with TRTLLM_LOAD_KV_SCALES=1; unquantized projections "
              "ignore k_scale", f"{_TRT_LINEAR}@ed53795b33"),
    EngineRow("TensorRT-LLM", "trtllm-build", "TensorRT engine", "trtllm", "rank", "fp8_e4m3", "applied",
              "kv_cache_quant_algo FP8; one factor for K and V", "tensorrt_llm/layers/attention.py@ed53795b33"),
    EngineRow("TensorRT-LLM", "trtllm-build", "TensorRT engine", "trtllm", "rank", "int8", "applied",
              "kv_cache_quant_algo INT8; factor = amax / 127", "tensorrt_llm/models/llama/convert.py@ed53795b33"),
    EngineRow("LMDeploy", "0.0.4-0.3.0", "TurboMind", "lmdeploy", "rank", "int8", "applied",
              "quant_policy 4; [k_scale, k_zp, v_scale, v_zp] per layer and rank", f"{_TD}@v0.3.0"),
    EngineRow("LMDeploy", ">= 0.4.0", "TurboMind", "lmdeploy", "rank", "int8", "ignored",
              "online KV quantization: parameter files are not read", f"{_TD}@v0.4.0"),
)


def _matches(field: str, wanted: str | None) -> bool:
    return field == ANY or wanted is None or field == wanted


def engine_verdicts(kind: str, number: str | None, granularity: str | None,
                    rows: tuple[EngineRow, ...] = ENGINE_MATRIX) -> list[EngineRow]:
    """The rows for scales of checkpoint ``kind`` in ``number`` format at ``granularity`` (None: any)."""
    return [row for row in rows if row.kind == kind and _matches(row.number, number)
            and _matches(row.granularity, granularity)]
