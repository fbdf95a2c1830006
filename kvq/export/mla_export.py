"""What the engine exports can do with the scales of an MLA latent cache (kvq.model.mla), read in their source.

vLLM 0.34.0 (the only format kvq writes for MLA, ``--format vllm``):

* one scale per layer for the whole cached row ``[latent | rotary key]``: ``concat_and_cache_mla`` takes the
  layer's ``_k_scale`` only (v1/attention/backend.py:1088-1110, from model_executor/layers/attention/
  mla_attention.py:962-969); ``_v_scale`` is never read (triton_mla.py:372-373 passes ``v_scale=layer._k_scale``).
  A scalar: ``BaseKVCacheMethod.process_weights_after_loading`` refuses any other ("Only support per-tensor
  scaling factor for fp8 KV cache", model_executor/layers/quantization/kv_cache.py:136-137).
* cache dtypes: the dense MLA backends take ``auto`` / bf16 / fp16 / ``fp8`` / ``fp8_e4m3`` (triton_mla.py:113-119,
  flashmla.py:48-54, cutlass_mla.py:40-46, flashinfer_mla.py:195-201; ROCm AITER MLA also fp8_e5m2,
  rocm_aiter_mla.py:720-726; FLASH_ATTN_MLA no fp8, flashattn_mla.py:42-46); the sparse (DeepSeek-V3.2) backends
  use ``fp8_ds_mla``, whose scales are computed per 128-value tile at run time (flashmla_sparse.py:156-162,
  mla_attention.py:367-384). No integer or fp4 format takes a static scale.
* the query: with an fp8 cache the absorbed decode query ``[q_nope . W_UK | q_pe]`` (kv_lora_rank + rope dims per
  head) is cast to fp8 with ``_q_scale`` (mla_attention.py:1373-1377; MLACommonImpl.supports_quant_query_input
  is True, mla_attention.py:3587; FlashMLA ``descale_q``, flashmla.py:321). kvq captures the per-head query of
  transformers' expanded attention (qk_nope_head_dim + qk_rope_head_dim), not that one: query scales are refused.
* the loader: ``MLAAttention`` is not an ``Attention`` (mla_attention.py:434), and compressed-tensors gives a KV-cache
  method (hence a ``k_scale`` parameter) only to ``Attention`` layers (quantization/compressed_tensors/
  compressed_tensors.py:213-214): vLLM 0.34.0 loads no KV scale for an MLA model from this checkpoint and serves
  its fp8 cache at scale 1.0 (the engine matrix row for these model types; the export warns). kvq writes the
  names every other vLLM attention loads (``model.layers.{i}.self_attn.k_scale`` / ``.v_scale``, the same value)
  so that a release whose loader maps them applies the calibrated scale.

SGLang 0.5.23: the DeepSeek loader maps only ``self_attn.k_proj.k_scale`` onto its MLA attention
``self_attn.attn_mqa`` (models/deepseek_common/deepseek_weight_loader.py:515-523; ``self_attn.k_scale`` is skipped
as "not found in params_dict", :527-532), and the MLA KV pool writes the cache by a plain cast, without any scale
(mem_cache/memory_pool.py:4970-4978, ``set_mla_kv_buffer`` :5026-5049), while FlashMLA reads it back with
``descale_k = layer.k_scale`` (layers/attention/flashmla_backend.py:461-464): a calibrated scale other than 1.0
would be applied on read only.
"""

from __future__ import annotations

import torch

from kvq.artifacts.scales import KVScales
from kvq.errors import UsageError
from kvq.export.request import ExportPlan
from kvq.model.mla import is_mla

MLA_FORMAT = "vllm"  # the one format kvq writes for an MLA cache
# Why each other format is refused for MLA.
MLA_REFUSED = {
    "modelopt": (
        "vLLM 0.34.0 gives MLA attention a k_scale under ModelOpt (modelopt.py:239) but its cache-scale mapper renames "
        "every KV scale to .attn.k_scale (quantization/base_config.py:261, applied by AutoWeightsLoader, "
        "models/utils.py:478), which maybe_remap_kv_scale_name turns into .attn.attn.k_scale (model_loader/"
        "weight_utils.py:1854), not the parameter self_attn.mla_attn.mla_attn.k_scale: dropped; SGLang 0.5.23 loads "
        "k_proj.k_scale into its MLA attention (deepseek_weight_loader.py:515-523) but writes the MLA cache "
        "without a scale (memory_pool.py:4970-4978) and reads it with k_scale (flashmla_backend.py:461-464)"
    ),
    "sglang-json": (
        "SGLang 0.5.23 writes the MLA cache by a plain cast, without any scale (mem_cache/memory_pool.py:4970-4978), "
        "and FlashMLA reads it back with k_scale (layers/attention/flashmla_backend.py:461-464): a calibrated scale "
        "would be applied on read only"
    ),
    "trtllm": "how TensorRT-LLM applies KV-cache scales to MLA (DeepSeek) attention has not been read in its source",
    "lmdeploy": "how LMDeploy applies KV-cache scales to MLA (DeepSeek) attention has not been read in its source",
}
_SOLVE_HINT = "kvq still calibrates, solves and evaluates this recipe; for the engine solve an fp8_e4m3 per-tensor " \
    "recipe without a query: section (e.g. --recipe fp8-e4m3-per-tensor)"


def check_mla_export(scales: KVScales, export_format: str) -> list[str]:
    """Refuse (UsageError with the engine source) what the engine cannot apply to an MLA latent cache; return
    the notes of an export it can apply. Nothing for a model that is not MLA."""
    if not is_mla(scales.metadata):
        return []
    if export_format != MLA_FORMAT:
        raise UsageError(f"--format {export_format} for an MLA (latent) KV cache: {MLA_REFUSED[export_format]}",
                         hint=f"export --format {MLA_FORMAT}")
    recipe = scales.recipe
    where = f"--format {export_format} for an MLA (latent) KV cache"
    formats = {recipe.key.format, recipe.value.format}
    if formats - {"fp8_e4m3", "fp8_e4m3fnuz"} or len(formats) > 1:
        raise UsageError(f"{where}: the recipe is K {recipe.key.format} / V {recipe.value.format}, but vLLM 0.34.0's "
                         "MLA backends cache the row [latent | rotary key] in one fp8 e4m3 type with a static scale "
                         "(triton_mla.py:113-119, flashmla.py:48-54, cutlass_mla.py:40-46), or fp8_ds_mla with run-"
                         "time tile scales; no integer or fp4 MLA cache", hint=_SOLVE_HINT)
    granularities = {recipe.key.granularity, recipe.value.granularity}
    if granularities != {"tensor"}:
        raise UsageError(f"{where}: the recipe is per {'/'.join(sorted(granularities))}, but vLLM 0.34.0 writes the "
                         "whole row with one scale per layer (concat_and_cache_mla(..., scale=layer._k_scale), "
                         "v1/attention/backend.py:1088-1110) and takes only a scalar (quantization/kv_cache.py:136)",
                         hint=_SOLVE_HINT)
    if recipe.query is not None:
        raise UsageError(f"{where}: the recipe has query scales, but vLLM 0.34.0's MLA quantizes the absorbed query "
                         "[q_nope . W_UK | q_pe] (mla_attention.py:1373-1377), which kvq does not capture (it "
                         "records transformers' per-head query)", hint=_SOLVE_HINT)
    unequal = [i for i, layer in sorted(scales.layers.items()) if not torch.equal(layer.k_scale, layer.v_scale)]
    if unequal:
        raise UsageError(f"{where}: layer {unequal[0]} has K scale {float(scales.layers[unequal[0]].k_scale):.6g} and "
                         f"V scale {float(scales.layers[unequal[0]].v_scale):.6g}, but vLLM writes the row [latent | "
                         "rotary key] with one scale (v1/attention/backend.py:1088-1110)",
                         hint="solve the statistics again with this kvq (it gives an MLA layer one scale)")
    return ["MLA: one scale per layer for the cached row [latent | rotary key], written as both self_attn.k_scale "
            "and self_attn.v_scale (vLLM uses _k_scale only: v1/attention/backend.py:1088-1110, triton_mla.py:372-373)"]


# How to serve the vllm export of an MLA model, and what happens there (the loader rows of kvq's engine matrix).
SERVE_MLA = [
    "vllm serve {out} --kv-cache-dtype fp8   (MLA backends FLASHMLA, CUTLASS_MLA, FLASHINFER_MLA, TRITON_MLA: one "
    "scale per layer for the row; vLLM 0.34.0's loader drops it, so the cache runs at scale 1.0 there)",
]
WARN_MLA_QUERY = (
    "vLLM's MLA backends but TRITON_MLA cast the absorbed decode query to fp8 with q_scale 1.0 whenever the cache is "
    "fp8 (mla_attention.py:1373-1377, supports_quant_query_input mla_attention.py:3587, triton_mla.py:253): "
    "kvq eval does not model that cast"
)


def mla_serving(plan: ExportPlan, scales: KVScales) -> ExportPlan:
    """The vllm export's plan for an MLA model: its own serve line and warnings (those of the per-head KV layouts
    the plain attention backends read do not apply). The plan as it is for any other model."""
    if is_mla(scales.metadata):
        plan.serve = list(SERVE_MLA)
        plan.warnings = [WARN_MLA_QUERY]
    return plan
