"""The solver: statistics + recipe -> scales. Pure: no model, no files.

Granularity reduces the (num_kv_heads, head_dim) statistics before the scale is chosen:
``tensor`` takes the min / max over all heads and channels of a layer (shape ()), ``head`` over
the channels of each head (shape (num_kv_heads,)), ``channel`` keeps them (shape
(num_kv_heads, head_dim)). The recipe's observer chooses the range inside the observed one
(kvq/solving/observers.py: ``minmax`` uses it as it is; ``percentile`` and ``mse`` read the histograms).
"""

from __future__ import annotations

import torch

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.artifacts.stats import KVStats
from kvq.errors import KvqError, UsageError
from kvq.model.mla import is_mla
from kvq.quant.qparams import choose_qparams
from kvq.recipe.schema import KVRecipe, transforms_json
from kvq.solving.attention import attention_ranges
from kvq.solving.observers import observed_range
from kvq.solving.row_scale import refuse_row_observers, row_scales


def layer_ranges(stats: KVStats, i: int, recipe: KVRecipe) -> tuple[tuple, tuple]:
    """((k_lo, k_hi), (v_lo, v_hi)): the ranges the recipe's observers choose for layer i (min/max for ``loss``,
    whose choice needs the model: kvq.solving.loss)."""
    layer = stats.layers[i]
    k_range, v_range = observed_range(layer.k, recipe.key), observed_range(layer.v, recipe.value)
    if "attention" in (recipe.key.observer, recipe.value.observer):
        k_range, v_range = attention_ranges(layer, rows_of(stats, i), stats.reservoir.scaling.get(i),
                                            recipe.key, recipe.value, k_range, v_range)
    return k_range, v_range


def solve_scales(stats: KVStats, recipe: KVRecipe, ranges: dict[int, tuple[tuple, tuple]] | None = None) -> KVScales:
    """Scales and zero-points of every layer in ``stats`` under ``recipe``; ``ranges`` (layer -> K and V ranges)
    replaces what the observers choose (the loss observer's choices, kvq.solving.loss)."""
    if is_mla(stats.metadata):
        refuse_row_observers(recipe)
    if ranges is None and "loss" in (recipe.key.observer, recipe.value.observer):
        raise UsageError(f"recipe {recipe.name} uses observer loss, which runs the model on calibration windows",
                         hint="give the model (kvq solve --model, kvq.solve(model=...)), or calibrate with the recipe")
    if not stats.layers:
        raise KvqError("the statistics hold no layers")
    calibrated_with = stats.metadata.get("transforms", "[]")
    if calibrated_with != transforms_json(recipe.transforms):
        raise UsageError(
            f"recipe {recipe.name} lists transforms {transforms_json(recipe.transforms)}, but the statistics were "
            f"calibrated on a model transformed with {calibrated_with}: transforms change the K/V themselves",
            hint="calibrate again with this recipe, or solve a recipe with the statistics' transforms",
        )
    layers: dict[int, LayerScales] = {}
    for i in sorted(stats.layers):
        layer = stats.layers[i]
        if layer.tokens == 0:
            raise KvqError(f"layer {i} was never observed (0 tokens): no scale can be chosen")
        try:
            k_range, v_range = layer_ranges(stats, i, recipe) if ranges is None else ranges[i]
            k_scale, k_zp = choose_qparams(*k_range, recipe.key)
            v_scale, v_zp = choose_qparams(*v_range, recipe.value)
            q_scale = None
            if recipe.query is not None:
                q_scale, _ = choose_qparams(*observed_range(_query_ranges(layer, i), recipe.query), recipe.query)
                if recipe.query.granularity == "head":
                    q_scale = per_kv_group(q_scale, layer.k.min.shape[0])
        except ValueError as exc:
            raise KvqError(f"layer {i}: {exc}") from exc
        layers[i] = LayerScales(k_scale, v_scale, k_zp, v_zp, q_scale)
    if is_mla(stats.metadata):  # one scale for the latent row, as the engine writes it (kvq.solving.row_scale)
        layers = row_scales(layers, recipe)
    return KVScales(recipe=recipe, layers=layers, metadata=dict(stats.metadata))


def rows_of(stats: KVStats, i: int):
    if stats.reservoir is None:
        raise UsageError("the statistics hold no Q/K/V rows, which the attention observer searches on",
                         hint="calibrate again with a recipe that uses observer: attention")
    return stats.reservoir.layer(i)


def _query_ranges(layer, i: int):
    if layer.q is None:
        raise UsageError(f"the statistics hold no query ranges (layer {i}), which a recipe with a query: section needs",
                         hint="calibrate again with this recipe (it records the queries' ranges)")
    return layer.q


def per_kv_group(q_scale: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-head query scales (num_heads,) -> the maximum of each KV head's group of query heads, repeated for
    each of them: what vLLM applies (it max-reduces per-head q scales over contiguous groups, query head h
    reading KV head h // (num_heads / kv_heads); compressed_tensors.py@0.33.0)."""
    heads = q_scale.shape[0]
    if heads % kv_heads:
        raise KvqError(f"{heads} attention heads do not split evenly over {kv_heads} KV heads")
    group = heads // kv_heads
    return q_scale.view(kv_heads, group).amax(dim=1).repeat_interleave(group)  # (heads,) -> (kv, group) -> (heads,)
