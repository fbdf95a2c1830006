"""Which channels a layer's RoPE rotates together, found by running the model's own rotary.

The modeling module's ``apply_rotary_pos_emb`` (the function the attention layer calls) is applied,
with the (cos, sin) the layer was handed, to the head_dim basis vectors at two positions; the
channels each basis vector lands on are the ones RoPE mixes. Two layouts are foldable and named:
rotate_half, pairs (i, i + r/2) over the first r channels, and interleaved, pairs (2i, 2i + 1). A
mixing that is neither (or that the config's partial_rotary_factor / rotary_pct / rope_interleaved
contradicts) is refused, never assumed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from kvq.errors import UsageError
from kvq.transforms.layout import RopeLayout


def rotary_function(attn: torch.nn.Module) -> Callable | None:
    """The ``apply_rotary_pos_emb`` of ``attn``'s modeling module (the function its forward calls)."""
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)


def mixing(apply_rotary: Callable, cos_sin: tuple[torch.Tensor, torch.Tensor], head_dim: int,
           where: str) -> torch.Tensor:
    """(head_dim, head_dim) bool: [j, c] true when RoPE sends basis vector e_j onto channel c."""
    cos, sin = (t[:1, -2:].float() for t in cos_sin)  # (1, 2, rotary_dims): the last two positions
    basis = torch.eye(head_dim, device=cos.device)[None, :, None, :]  # (d, d) -> (1, d, 1, d): e_j as heads
    basis = basis.expand(1, head_dim, 2, head_dim)  # (1, d, 1, d) -> (1, d, 2, d): at both positions
    try:
        q, k = apply_rotary(basis.clone(), basis.clone(), cos, sin)
    except (TypeError, RuntimeError, ValueError, IndexError) as exc:
        raise UsageError(f"{where}: its apply_rotary_pos_emb cannot be run on basis vectors ({exc}); "
                         "kvq cannot tell which channels RoPE pairs") from exc
    if q.shape != basis.shape or not torch.equal(q != 0, k != 0):
        raise UsageError(f"{where}: RoPE treats queries and keys differently; kvq cannot fold key factors")
    return (q[0] != 0).any(dim=1)  # (d, 2, d) -> (d, d)


def _configured(config) -> tuple[float | None, bool | None]:
    """(partial rotary factor, interleaved) as the config states them, None where it does not."""
    factors = {getattr(config, "partial_rotary_factor", None), getattr(config, "rotary_pct", None)}
    params = getattr(config, "rope_parameters", None) or {}
    nested = [params, *(v for v in params.values() if isinstance(v, dict))] if isinstance(params, dict) else []
    factors |= {p.get("partial_rotary_factor") for p in nested}
    factors.discard(None)
    interleaved = getattr(config, "rope_interleaved", None)
    return (factors.pop() if len(factors) == 1 else None), (interleaved if isinstance(interleaved, bool) else None)


def rope_layout(mixes: torch.Tensor, config, where: str) -> RopeLayout:
    """Name the pairing in ``mixes`` (see :func:`mixing`), or refuse it."""
    head_dim = mixes.shape[0]
    partners = [torch.nonzero(mixes[j]).flatten().tolist() for j in range(head_dim)]
    pairs = set()
    for j, seen in enumerate(partners):
        others = [c for c in seen if c != j]
        if j not in seen or len(others) > 1 or (others and sorted(partners[others[0]]) != sorted({j, *others})):
            raise UsageError(f"{where}: RoPE sends channel {j} onto channels {seen}; kvq folds only RoPE "
                             "that rotates channel pairs", hint="this rotary layout is not one kvq can fold")
        if others:
            pairs.add((min(j, others[0]), max(j, others[0])))
    rotary_dims = 2 * len(pairs)
    if not pairs:
        return RopeLayout("none", 0)
    candidates = [RopeLayout("rotate_half", rotary_dims), RopeLayout("interleaved", rotary_dims)]
    layout = next((c for c in candidates if set(c.pairs()) == pairs), None)
    if layout is None:
        shown = ", ".join(str(p) for p in sorted(pairs)[:4])
        raise UsageError(f"{where}: RoPE pairs channels {shown}, ...: neither rotate_half (i, i + r/2) nor "
                         "interleaved (2i, 2i + 1)", hint="this rotary layout is not one kvq can fold")
    factor, interleaved = _configured(config)
    if factor is not None and int(head_dim * factor) != rotary_dims:
        raise UsageError(f"{where}: RoPE rotates {rotary_dims} of {head_dim} channels, but the config's "
                         f"partial rotary factor {factor} says {int(head_dim * factor)}")
    if interleaved is not None and interleaved != (layout.kind == "interleaved"):
        raise UsageError(f"{where}: RoPE is {layout.kind}, but the config says rope_interleaved={interleaved}")
    return layout
