"""The engine's scale convention for an MLA latent cache: one scale for the whole cached row.

vLLM 0.34.0 writes an MLA layer's row ``[latent | rotary key]`` into its fp8 cache with one scale, ``_k_scale``
(``concat_and_cache_mla(kv_c_normed, k_pe, ..., scale=k_scale)``: v1/attention/backend.py:1088-1110, called from
model_executor/layers/attention/mla_attention.py:962-969), and reads it back with the same (Triton MLA
``k_scale=layer._k_scale, v_scale=layer._k_scale``, v1/attention/backends/mla/triton_mla.py:372-373; FlashMLA
``descale_k=layer._k_scale``, flashmla.py:322). kvq holds the latent as K and the rotary part as V
(kvq.model.mla), so for an fp8 recipe that is per tensor on both, the solver gives K and V of an MLA layer one
scale: the larger of the two, i.e. max |x| over the row / qmax for the minmax observer. Evaluation then
fake-quantizes both parts with it, as the engine does.

Recipes the engine cannot apply to MLA (per-head / per-channel, integer or nvfp4 formats, K and V in different
formats) keep their own K and V scales: they calibrate, solve and evaluate as written, and the engine exports
refuse them with the reason (kvq.export.mla_export).
"""

from __future__ import annotations

import torch

from kvq.artifacts.scales import LayerScales
from kvq.errors import UsageError
from kvq.recipe.schema import KVRecipe


def shares_row_scale(recipe: KVRecipe) -> bool:
    """Whether ``recipe`` is one the engine applies to an MLA row: K and V fp8 of one format, per tensor."""
    key, value = recipe.key, recipe.value
    return key.is_fp8 and key.format == value.format and key.granularity == value.granularity == "tensor"


def row_scales(layers: dict[int, LayerScales], recipe: KVRecipe) -> dict[int, LayerScales]:
    """Each layer's K and V scale replaced by their maximum (a larger scale never clips what either chose),
    when ``recipe`` :func:`shares_row_scale`; the scales as they are otherwise."""
    if not shares_row_scale(recipe):
        return layers
    out = {}
    for i, layer in layers.items():
        scale = torch.maximum(layer.k_scale, layer.v_scale)
        out[i] = LayerScales(scale, scale.clone(), layer.k_zero_point, layer.v_zero_point, layer.q_scale)
    return out


def refuse_row_observers(recipe: KVRecipe) -> None:
    """Refuse, for an MLA model, a recipe whose observer scores attention (``attention``, ``loss``): they multiply
    the captured queries with the captured keys, but an MLA layer's captured "keys" are its latent, which the
    per-head keys are expanded from by kv_b_proj only after the cache (kvq.model.mla)."""
    used = sorted({recipe.key.observer, recipe.value.observer} & {"attention", "loss"})
    if used:
        raise UsageError(f"recipe {recipe.name} uses observer {' and '.join(used)}, which scores attention with the "
                         "cached keys, but an MLA model caches a latent row (the per-head keys are expanded from it "
                         "by kv_b_proj after the cache)", hint="use observer minmax, percentile or mse for MLA models")
