"""``describe_attention(model)``: every layer's attention as kvq folds into it, checked against the model.

The layout is read from the modules (:mod:`~kvq.transforms.layout`), the RoPE pairing from the
model's own rotary (:mod:`~kvq.transforms.rope`), the q/k norm form from the norm itself
(:mod:`~kvq.transforms.qk_norm`). Then the reading is checked end to end on one short forward pass
(:mod:`~kvq.transforms.probe`): queries, keys and values recomputed from the layer's input with the
described rows, norms and the model's own RoPE must be the ones the model attended with and cached.
Anything kvq reads wrong is refused there, before a weight is touched.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from kvq.errors import UsageError
from kvq.transforms.layout import (
    HeadRows,
    LayerAttention,
    NormFold,
    RopeLayout,
    attention_modules,
    projections,
)
from kvq.transforms.probe import LayerProbe, probe_layers
from kvq.transforms.qk_norm import norm_fold
from kvq.transforms.rope import mixing, rope_layout, rotary_function


def model_text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _states(named: dict[str, torch.nn.Module], rows: HeadRows, norm: NormFold | None, heads: int,
            head_dim: int, hidden: torch.Tensor) -> torch.Tensor:
    """(1, heads, seq, head_dim): one of q/k/v recomputed from the layer input with the described rows."""
    linear = named[rows.module]
    index = rows.index(heads, head_dim).flatten().to(linear.weight.device)  # (heads * head_dim,)
    bias = None if linear.bias is None else linear.bias[index]
    states = F.linear(hidden, linear.weight[index], bias)  # (1, seq, heads * head_dim)
    if norm is not None and named[norm.module].weight.dim() == 1 and norm.per_head:
        states = named[norm.module](states)  # a norm over all heads at once
        norm = None
    states = states.view(*states.shape[:2], heads, head_dim)  # (1, seq, heads * d) -> (1, seq, heads, d)
    if norm is not None:
        states = named[norm.module](states)
    return states.transpose(1, 2)  # (1, heads, seq, head_dim)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    tolerance = 1e-3 if got.dtype == torch.float32 or got.dtype == torch.float64 else 3e-2
    diff = (got.double() - expected.double()).norm()
    return bool(diff <= tolerance * expected.double().norm() + 1e-12)


def _checked_rope(layer: LayerAttention, named: dict[str, torch.nn.Module], probe: LayerProbe,
                  apply_rotary, config, where: str) -> RopeLayout:
    """The layer's RoPE layout, after checking q/k/v recomputed from its input against what it used."""
    hidden = probe.hidden
    q = _states(named, layer.q, layer.q_norm, layer.num_heads, layer.head_dim, hidden)
    k = _states(named, layer.k, layer.k_norm, layer.num_kv_heads, layer.head_dim, hidden)
    v = _states(named, layer.v, None, layer.num_kv_heads, layer.head_dim, hidden)
    if not _close(v, probe.value):
        raise UsageError(f"{where}: the values it caches are not its value rows of the input; "
                         "kvq cannot rotate them exactly")
    if _close(q, probe.query) and _close(k, probe.key):
        return RopeLayout("none", 0)  # a layer without rotary (NoPE)
    if apply_rotary is None or probe.cos_sin is None:
        raise UsageError(f"{where}: its keys are transformed after the projection by something kvq cannot "
                         "run (no apply_rotary_pos_emb with position embeddings)")
    rotated_q, rotated_k = apply_rotary(q, k, *probe.cos_sin)
    if not (_close(rotated_q, probe.query) and _close(rotated_k, probe.key)):
        raise UsageError(f"{where}: queries and keys recomputed from its projections, norms and RoPE are not "
                         "the ones it attends with; kvq does not understand this attention")
    return rope_layout(mixing(apply_rotary, probe.cos_sin, layer.head_dim, where), config, where)


def describe_attention(model: torch.nn.Module) -> list[LayerAttention]:
    """Per layer, the modules and layout kvq folds into; UsageError for anything it cannot fold exactly."""
    config = model_text_config(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    modules = attention_modules(model)
    layers = getattr(config, "num_hidden_layers", None)
    if not modules or [m.layer_idx for _, m in modules] != list(range(layers or 0)):
        raise UsageError(f"model {model_type}: found attention in layers {[m.layer_idx for _, m in modules]}, "
                         f"expected one per layer 0..{(layers or 0) - 1}",
                         hint="kvq folds transforms into per-layer q/k/v/o projections only")
    named = dict(model.named_modules())
    read = []  # structure first: a layout kvq refuses is refused before any forward pass
    for name, attn in modules:
        i = attn.layer_idx
        where = f"model {model_type} layer {i} ({name})"
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or (
            getattr(config, "head_dim", None) or config.hidden_size // heads)
        if heads % kv_heads:
            raise UsageError(f"{where}: {heads} query heads do not divide into {kv_heads} KV heads")
        q, k, v, o = projections(attn, name, heads, kv_heads, head_dim, where)
        read.append((attn, where, LayerAttention(
            i, name, heads, kv_heads, head_dim, q, k, v, o, norm_fold(attn, "q", name, heads, head_dim, where),
            norm_fold(attn, "k", name, kv_heads, head_dim, where), RopeLayout("none", 0))))
    probes = probe_layers(model, modules)
    described = []
    for attn, where, layer in read:
        with torch.inference_mode():
            rope = _checked_rope(layer, named, probes[layer.layer_idx], rotary_function(attn), config, where)
        described.append(replace(layer, rope=rope))
    return described
