"""``apply_transforms``: fold a plan into the model's weights in place; ``weights_hash`` of what changed.

Every touched parameter is copied once to float64, all folds are applied to the copy, and it is cast
back to the parameter's dtype once, so each weight is rounded once whatever the plan holds.

Keys (factors s per KV head g and channel c; query head h uses KV head h // group):
  k rows (and bias) / s[g, c], q rows (and bias) * s[h // group, c];
  with a q/k norm instead: (w_k + off) / s - off and (w_q + off) * s - off (off = 1 for Gemma).
Values (orthogonal R_g): v rows of head g (and bias) <- R_g^T @ rows, so V' = V R_g;
  o columns of query head h <- columns @ R_{h // group}, so the output is unchanged.
"""

from __future__ import annotations

import torch

from kvq.errors import UsageError
from kvq.transforms.describe import describe_attention
from kvq.transforms.digest import weights_hash
from kvq.transforms.factors import TransformPlan, touched_names
from kvq.transforms.layout import HeadRows, LayerAttention, NormFold


class _Work:
    """float64 working copies of the parameters a plan touches, keyed by state-dict name."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.copies: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        if name not in self.params:
            return None
        if name not in self.copies:
            self.copies[name] = self.params[name].detach().to(device="cpu", dtype=torch.float64)
        return self.copies[name]

    def commit(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for name, copy in self.copies.items():
                self.params[name].copy_(copy.to(self.params[name].dtype))  # the one rounding
        return {name: self.params[name].detach() for name in sorted(self.copies)}


def _scale_rows(work: _Work, rows: HeadRows, heads: int, head_dim: int, factors: torch.Tensor) -> None:
    """rows (and bias) of (head, channel) *= factors (heads, head_dim)."""
    index = rows.index(heads, head_dim).flatten()  # (heads * head_dim,)
    flat = factors.reshape(-1)  # (heads, d) -> (heads * d,)
    weight, bias = work.get(f"{rows.module}.weight"), work.get(f"{rows.module}.bias")
    weight[index] *= flat[:, None]
    if bias is not None:
        bias[index] *= flat


def _scale_norm(work: _Work, norm: NormFold, heads: int, factors: torch.Tensor) -> None:
    """(weight + offset) *= factors: (heads, d) per head, or row 0 (all rows equal) when shared."""
    weight = work.get(f"{norm.module}.weight")
    s = factors[:heads] if norm.per_head else factors[0]  # (heads, d) or (d,)
    folded = (weight.reshape(s.shape) + norm.offset) * s - norm.offset  # weight (as s's shape) scaled
    weight.copy_(folded.reshape(weight.shape))  # back to the norm's own shape


def _smooth(work: _Work, layer: LayerAttention, s: torch.Tensor) -> None:
    s_query = s.repeat_interleave(layer.group, dim=0)  # (kv_heads, d) -> (heads, d)
    for rows, norm, heads, factors in ((layer.k, layer.k_norm, layer.num_kv_heads, 1 / s),
                                       (layer.q, layer.q_norm, layer.num_heads, s_query)):
        if norm is not None:
            _scale_norm(work, norm, heads, factors)
        else:
            _scale_rows(work, rows, heads, layer.head_dim, factors)


def _rotate(work: _Work, layer: LayerAttention, rotations: torch.Tensor) -> None:
    d = layer.head_dim
    v_index = layer.v.index(layer.num_kv_heads, d)  # (kv_heads, d)
    o_index = layer.o.index(layer.num_heads, d)  # (heads, d)
    v_weight, v_bias = work.get(f"{layer.v.module}.weight"), work.get(f"{layer.v.module}.bias")
    o_weight = work.get(f"{layer.o.module}.weight")  # (hidden, heads * d)
    for g in range(layer.num_kv_heads):
        r = rotations[g]  # (d, d)
        v_weight[v_index[g]] = r.T @ v_weight[v_index[g]]
        if v_bias is not None:
            v_bias[v_index[g]] = r.T @ v_bias[v_index[g]]
    for h in range(layer.num_heads):
        o_weight[:, o_index[h]] = o_weight[:, o_index[h]] @ rotations[h // layer.group]


def apply_transforms(model: torch.nn.Module, plan: TransformPlan) -> dict[str, torch.Tensor]:
    """Fold ``plan`` into ``model`` in place; return the modified parameters by state-dict name.

    The returned tensors are the model's own (detached, not copies): write them out before changing
    the model again. UsageError, with nothing changed, when the plan was made for another layout.
    """
    if list(plan.layers) != describe_attention(model):
        raise UsageError("the transform plan was made for a model with a different attention layout",
                         hint="plan the transforms on the model they are applied to")
    params = dict(model.named_parameters())
    smooth, rotate = plan.key_factors is not None, plan.value_rotations is not None
    names = [name for layer in plan.layers for name in touched_names(layer, smooth, rotate, params)]
    if weights_hash({name: params[name] for name in names}) != plan.source_hash:
        raise UsageError("the model's attention weights are not the ones the transform plan was made for",
                         hint="a plan applies once, to the model it was planned on (not to a transformed one)")
    folded: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(plan.layers):  # one layer's float64 copies at a time
        work = _Work(model)
        if smooth:
            _smooth(work, layer, plan.key_factors[i])
        if rotate:
            _rotate(work, layer, plan.value_rotations[i])
        folded.update(work.commit())
    return dict(sorted(folded.items()))
