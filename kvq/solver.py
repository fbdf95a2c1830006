"""The solver: statistics + recipe -> scales. Pure: no model, no files.

Granularity reduces the (num_kv_heads, head_dim) statistics before the scale is chosen:
``tensor`` takes the min / max over all heads and channels of a layer (shape ()), ``head`` over
the channels of each head (shape (num_kv_heads,)), ``channel`` keeps them (shape
(num_kv_heads, head_dim)). The observer ``minmax`` uses the observed range as it is.
"""

from __future__ import annotations

import torch

from kvq.errors import KvqError, UsageError
from kvq.qparams import choose_qparams
from kvq.recipe import KVRecipe, QuantSpec, transforms_json
from kvq.scales import KVScales, LayerScales
from kvq.stats import KVStats, TensorStats


def reduce_to_granularity(
    min_val: torch.Tensor, max_val: torch.Tensor, granularity: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_kv_heads, head_dim) ranges -> the recipe's granularity."""
    if granularity == "tensor":
        return min_val.amin(), max_val.amax()  # () each
    if granularity == "head":
        return min_val.amin(dim=-1), max_val.amax(dim=-1)  # (num_kv_heads,) each
    if granularity == "channel":
        return min_val, max_val  # (num_kv_heads, head_dim) each
    raise ValueError(f"unknown granularity {granularity!r}")


def solve_tensor(ts: TensorStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    lo, hi = reduce_to_granularity(ts.min, ts.max, spec.granularity)
    return choose_qparams(lo, hi, spec)


def solve(stats: KVStats, recipe: KVRecipe) -> KVScales:
    """Scales and zero-points of every layer in ``stats`` under ``recipe``."""
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
            k_scale, k_zp = solve_tensor(layer.k, recipe.key)
            v_scale, v_zp = solve_tensor(layer.v, recipe.value)
        except ValueError as exc:
            raise KvqError(f"layer {i}: {exc}") from exc
        layers[i] = LayerScales(k_scale, v_scale, k_zp, v_zp)
    return KVScales(recipe=recipe, layers=layers, metadata=dict(stats.metadata))
