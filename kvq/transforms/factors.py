"""``plan_transforms``: the factors and matrices the transforms fold in, per layer, in float64.

Key smoothing follows SmoothAttention/SmoothQuant: per (KV head, channel),
s = k_absmax^alpha / q_absmax^(1 - alpha), where q_absmax is the max over the KV head's query
heads (they all take the factor). Two constraints make the fold exact:

- RoPE rotates channel pairs by a position-dependent angle; diag(s) commutes with it only when s is
  equal within each pair. After RoPE the two channels of a pair are two coordinates of one rotating
  2-D vector, so over positions each reaches the pair's norm: the pair's max is the honest range of
  both. The ranges are therefore made equal within a pair (the max) before s is computed, which
  also makes s equal within the pair.
- A q/k norm whose weight is shared by all heads can carry only one factor per channel: the ranges
  are then reduced over heads too.

s is clamped to [1/MAX_FACTOR, MAX_FACTOR]; a channel that is never non-zero gets 1 (nothing to
balance). Value rotation draws one orthogonal matrix per (layer, KV head) (:mod:`.rotations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvq.errors import UsageError
from kvq.recipe.schema import QuantSpec
from kvq.transforms.describe import describe_attention
from kvq.transforms.digest import weights_hash
from kvq.transforms.key_search import check_searchable, search_factors
from kvq.transforms.layout import LayerAttention
from kvq.transforms.measure import QKAbsMax
from kvq.transforms.rotations import value_rotations
from kvq.transforms.spec import MAX_FACTOR, RotateValues, SmoothKeys, Transform


@dataclass(frozen=True, eq=False)
class TransformPlan:
    """What :func:`kvq.transforms.fold.apply_transforms` folds: per layer, factors and rotations (float64)."""

    transforms: tuple[Transform, ...]
    layers: tuple[LayerAttention, ...]
    key_factors: tuple[torch.Tensor, ...] | None  # per layer (kv_heads, head_dim), or None without SmoothKeys
    value_rotations: tuple[torch.Tensor, ...] | None  # per layer (kv_heads, head_dim, head_dim), or None
    source_hash: str  # weights_hash of the parameters the plan rewrites, as they were when planned


def touched_names(layer: LayerAttention, smooth: bool, rotate: bool,
                  params: dict[str, torch.nn.Parameter]) -> list[str]:
    """State-dict names of the parameters that smoothing keys and/or rotating values rewrites in ``layer``."""
    modules = []
    if smooth:
        modules += [norm.module if norm is not None else rows.module
                    for rows, norm in ((layer.q, layer.q_norm), (layer.k, layer.k_norm))]
    if rotate:
        modules.append(layer.v.module)
    names = {f"{m}.{p}" for m in modules for p in ("weight", "bias")} | (
        {f"{layer.o.module}.weight"} if rotate else set())
    return sorted(name for name in names if name in params)


def shared_norm(layer: LayerAttention) -> bool:
    """A q/k norm weight shared by every head: it carries one factor per channel for all heads."""
    return any(norm is not None and not norm.per_head for norm in (layer.q_norm, layer.k_norm))


def smoothing_factors(layer: LayerAttention, stats: QKAbsMax, alpha: float) -> torch.Tensor:
    """(kv_heads, head_dim) float64 factors s for one layer: keys / s, queries * s."""
    kv_heads, group, head_dim = layer.num_kv_heads, layer.group, layer.head_dim
    if tuple(stats.query.shape) != (layer.num_heads, head_dim) or tuple(stats.key.shape) != (kv_heads, head_dim):
        raise UsageError(f"layer {layer.layer_idx}: query/key ranges of shapes {tuple(stats.query.shape)}, "
                         f"{tuple(stats.key.shape)} do not fit {layer.num_heads} heads, {kv_heads} KV heads "
                         f"of {head_dim}", hint="measure them on this model")
    q = stats.query.double().view(kv_heads, group, head_dim).amax(dim=1)  # (heads, d) -> (kv_heads, d)
    k = stats.key.double().clone()  # (kv_heads, d)
    if shared_norm(layer):
        q, k = q.amax(dim=0, keepdim=True).expand_as(q), k.amax(dim=0, keepdim=True).expand_as(k)
    q, k = q.clone(), k.clone()
    for i, j in layer.rope.pairs():
        for ranges in (q, k):
            ranges[:, i] = ranges[:, j] = torch.maximum(ranges[:, i], ranges[:, j])
    if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
        raise UsageError(f"layer {layer.layer_idx}: query/key ranges are not finite")
    alive = (q > 0) & (k > 0)
    s = torch.where(alive, k.clamp_min(1e-300) ** alpha / q.clamp_min(1e-300) ** (1 - alpha), torch.ones_like(k))
    return s.clamp(1 / MAX_FACTOR, MAX_FACTOR)


def plan_transforms(model: torch.nn.Module, transforms: Sequence[Transform],
                    qk_absmax: Sequence[QKAbsMax] | None = None, key: QuantSpec | None = None) -> TransformPlan:
    """Describe ``model`` and compute every transform's factors; ``qk_absmax`` is needed for SmoothKeys, and
    ``key`` (the recipe's key quantization) for its search."""
    kinds = [type(t) for t in transforms]
    for t in transforms:
        if not isinstance(t, SmoothKeys | RotateValues):
            raise UsageError(f"unknown transform {t!r}", hint="use smooth-keys or rotate-values")
    if len(set(kinds)) != len(kinds):
        raise UsageError("a transform is listed twice", hint="list each of smooth-keys and rotate-values once")
    layers = tuple(describe_attention(model))
    smooth = next((t for t in transforms if isinstance(t, SmoothKeys)), None)
    rotate = next((t for t in transforms if isinstance(t, RotateValues)), None)
    factors = None
    if smooth is not None:
        if qk_absmax is None or len(qk_absmax) != len(layers):
            raise UsageError(f"{SmoothKeys.name} needs query/key ranges for each of the {len(layers)} layers",
                             hint="measure them with kvq.transforms.measure_qk_absmax")
        if smooth.search:
            if key is None:
                raise UsageError(f"{SmoothKeys.name} search needs the recipe's key quantization")
            check_searchable(key)
        factors = tuple(
            search_factors(layer, stats, smoothing_factors(layer, stats, smooth.alpha), key, shared_norm(layer))
            if smooth.search else smoothing_factors(layer, stats, smooth.alpha)
            for layer, stats in zip(layers, qk_absmax, strict=True))
    rotations = None
    if rotate is not None:
        rotations = tuple(value_rotations(len(layers), [lay.num_kv_heads for lay in layers],
                                          [lay.head_dim for lay in layers], rotate.seed))
    params = dict(model.named_parameters())
    names = [n for layer in layers for n in touched_names(layer, smooth is not None, rotate is not None, params)]
    return TransformPlan(tuple(transforms), layers, factors, rotations,
                         weights_hash({name: params[name] for name in names}))
