"""Query/key norms (Qwen3, Gemma3, OLMo2, Cohere with use_qk_norm): how key factors fold into them.

A norm kvq folds into must compute y = normalize(x) * (weight + offset), elementwise per channel,
with ``weight`` its only parameter. Which offset (0: weight; 1: Gemma's 1 + weight) is read off the
norm itself, not its class: run with weight 0 and 1, then checked with a random weight. A norm of
any other form (a bias, no weight, a weight not per channel) is refused.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from kvq.errors import UsageError
from kvq.transforms.layout import NormFold


def norm_fold(attn: torch.nn.Module, side: str, prefix: str, heads: int, head_dim: int,
              where: str) -> NormFold | None:
    """The fold of ``attn.{side}_norm`` (side "q" or "k"), None when the layer has none."""
    name = f"{side}_norm"
    norm = getattr(attn, name, None)
    if norm is None or getattr(attn, "use_qk_norm", True) is False:
        return None
    params = dict(norm.named_parameters())
    weight = params.get("weight")
    if set(params) != {"weight"} or weight is None:
        raise UsageError(f"{where}: {name} has parameters {sorted(params)}; kvq folds only a norm whose one "
                         "parameter is a per-channel weight")
    if weight.numel() not in (head_dim, heads * head_dim):
        raise UsageError(f"{where}: {name} weight has {weight.numel()} entries, neither head_dim {head_dim} "
                         f"nor {heads} x {head_dim}")
    per_head = weight.numel() != head_dim
    x = torch.randn(3, heads, head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = x.to(device=weight.device, dtype=weight.dtype)  # (3, heads, head_dim)
    if per_head and weight.dim() == 1:  # a norm over all heads at once (OLMo2): (3, heads * head_dim)
        x = x.reshape(3, heads * head_dim)  # (3, heads, d) -> (3, heads * d)

    def run(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return functional_call(norm, {"weight": w.to(weight.dtype)}, (x,)).double()

    zero, one = run(torch.zeros_like(weight)), run(torch.ones_like(weight))
    normalized = one - zero  # normalize(x), whichever the offset
    offset = 0.0 if torch.allclose(zero, torch.zeros_like(zero), atol=1e-6) else 1.0
    trial = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    expected = normalized * (trial.to(weight.device) + offset)  # weight broadcasts over x's last dims
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(run(trial), expected, rtol=tolerance, atol=tolerance * float(normalized.abs().max())):
        raise UsageError(f"{where}: {name} is not normalize(x) * (weight + offset) per channel; "
                         "kvq cannot fold key factors into it")
    return NormFold(f"{prefix}.{name}", offset, per_head)
