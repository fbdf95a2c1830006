"""Where a layer's q/k/v/o live in its weights: the projection layouts kvq can fold into.

Read from the attention module's own children and their shapes, not from class names:
separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``; a fused ``qkv_proj`` whose rows are [q; k; v]
(Phi-3) with ``o_proj``; or GPT-NeoX's ``query_key_value`` whose rows are per-head [q_h, k_h, v_h]
blocks, with ``dense``. Anything else (MLA's latent ``kv_a_proj_with_mqa``/``kv_b_proj``, a fused
projection of another size, gated attention) is refused: it cannot be folded exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq.errors import UsageError

# The children whose presence marks a module as a layer's attention (folded or refused).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense")
LATENT = ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj")  # MLA (DeepSeek-V2/V3)


@dataclass(frozen=True)
class HeadRows:
    """One of q/k/v (rows of a Linear) or o (columns): index of (head h, channel c) = offset + h*stride + c."""

    module: str  # dotted name in model.named_modules()
    offset: int
    stride: int

    def index(self, heads: int, head_dim: int) -> torch.Tensor:
        """(heads, head_dim) long: the row (or column) of every (head, channel)."""
        return self.offset + torch.arange(heads)[:, None] * self.stride + torch.arange(head_dim)[None, :]


@dataclass(frozen=True)
class NormFold:
    """A q/k norm kvq folds key factors into: y = normalize(x) * (weight + offset)."""

    module: str
    offset: float  # 0.0 (weight) or 1.0 (Gemma: 1 + weight)
    per_head: bool  # False: one weight of head_dim shared by every head


@dataclass(frozen=True)
class RopeLayout:
    """Which channels RoPE rotates together: ``pairs`` (i, j), found by running the model's own rotary."""

    kind: str  # "rotate_half": (i, i + r/2); "interleaved": (2i, 2i + 1); "none": no rotary
    rotary_dims: int  # r: channels r.. pass through unrotated

    def pairs(self) -> list[tuple[int, int]]:
        if self.kind == "rotate_half":
            return [(i, i + self.rotary_dims // 2) for i in range(self.rotary_dims // 2)]
        if self.kind == "interleaved":
            return [(2 * i, 2 * i + 1) for i in range(self.rotary_dims // 2)]
        return []


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention as kvq folds into it."""

    layer_idx: int
    module: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: HeadRows
    k: HeadRows
    v: HeadRows
    o: HeadRows  # columns of the output projection, per query head
    q_norm: NormFold | None
    k_norm: NormFold | None
    rope: RopeLayout

    @property
    def group(self) -> int:
        """Query heads per KV head: query head h reads KV head h // group (transformers' repeat_kv)."""
        return self.num_heads // self.num_kv_heads


def _linear(attn: torch.nn.Module, name: str, where: str) -> torch.nn.Linear:
    module = getattr(attn, name, None)
    if not isinstance(module, torch.nn.Linear):
        raise UsageError(f"{where}: {name} is a {type(module).__name__}, not a linear layer kvq can fold into")
    return module


def projections(attn: torch.nn.Module, prefix: str, heads: int, kv_heads: int, head_dim: int,
                where: str) -> tuple[HeadRows, HeadRows, HeadRows, HeadRows]:
    """The (q, k, v, o) rows/columns of ``attn`` (named ``prefix``), checked against the head shapes."""
    children = {name for name, _ in attn.named_children()}
    latent = sorted(children & set(LATENT))
    if latent:
        raise UsageError(
            f"{where}: multi-head latent attention ({', '.join(latent)}) cannot be folded exactly",
            hint="keys and values are decompressed from a shared latent; kvq folds per-head projections only",
        )
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def rows(name: str, offset: int, stride: int) -> HeadRows:
        return HeadRows(f"{prefix}.{name}", offset, stride)

    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= children:
        sizes = {n: _linear(attn, n, where).out_features for n in ("q_proj", "k_proj", "v_proj")}
        expected = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        if sizes != expected:
            raise UsageError(f"{where}: projection sizes {sizes} are not {expected} for {heads} heads, "
                             f"{kv_heads} KV heads of {head_dim}",
                             hint="gated or otherwise widened projections cannot be folded exactly")
        qkv = rows("q_proj", 0, head_dim), rows("k_proj", 0, head_dim), rows("v_proj", 0, head_dim)
        out = "o_proj"
    elif {"qkv_proj", "o_proj"} <= children:
        size = _linear(attn, "qkv_proj", where).out_features
        if size != q_size + 2 * kv_size:
            raise UsageError(f"{where}: fused qkv_proj has {size} rows, not {q_size} + 2 x {kv_size} "
                             "([q; k; v]); kvq cannot split it")
        qkv = (rows("qkv_proj", 0, head_dim), rows("qkv_proj", q_size, head_dim),
               rows("qkv_proj", q_size + kv_size, head_dim))
        out = "o_proj"
    elif {"query_key_value", "dense"} <= children:
        size = _linear(attn, "query_key_value", where).out_features
        if kv_heads != heads or size != 3 * q_size:
            raise UsageError(f"{where}: fused query_key_value has {size} rows for {heads} heads and "
                             f"{kv_heads} KV heads, not per-head [q, k, v] blocks of {head_dim}; "
                             "kvq cannot split it")
        stride = 3 * head_dim  # head h's rows: [q_h; k_h; v_h]
        qkv = rows("query_key_value", 0, stride), rows("query_key_value", head_dim, stride), \
            rows("query_key_value", 2 * head_dim, stride)
        out = "dense"
    else:
        raise UsageError(
            f"{where}: attention projections {sorted(children & set(PROJECTIONS))} are not a layout kvq can fold",
            hint="kvq folds q_proj/k_proj/v_proj/o_proj, qkv_proj ([q; k; v]) or query_key_value (per head)",
        )
    o_in = _linear(attn, out, where).in_features
    if o_in != q_size:
        raise UsageError(f"{where}: {out} takes {o_in} inputs, not {heads} heads x {head_dim}")
    return (*qkv, rows(out, 0, head_dim))


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every layer's attention, in layer order: modules with an integer ``layer_idx``
    whose children include a known (or a refused latent) projection."""
    found = []
    for name, module in model.named_modules():
        children = {child for child, _ in module.named_children()}
        if isinstance(getattr(module, "layer_idx", None), int) and children & set(PROJECTIONS + LATENT):
            found.append((name, module))
    return sorted(found, key=lambda item: item[1].layer_idx)
