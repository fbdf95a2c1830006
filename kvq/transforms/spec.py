"""The transforms a recipe can list, with their options: what to fold, not how.

``SmoothKeys`` and ``RotateValues`` become recipe entries
``transforms: [{name: smooth-keys, alpha: 0.5}, {name: rotate-values, seed: 0}]``; ``name`` is the
spelling there. :func:`kvq.transforms.factors.plan_transforms` turns them into factors and matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kvq.errors import UsageError

MAX_FACTOR = 1e3  # smoothing factors stay in [1/MAX_FACTOR, MAX_FACTOR]: beyond, one costs q or k more float precision than it buys


@dataclass(frozen=True)
class SmoothKeys:
    """Divide key channels by factors s and multiply the matching query channels by s (q.k unchanged).

    ``alpha`` is SmoothAttention's migration strength: s = k_absmax^alpha / q_absmax^(1 - alpha). With
    ``search`` the factors then move to lower the attention-logit error of the recipe's key quantizer
    (:mod:`kvq.transforms.key_search`).
    """

    name: ClassVar[str] = "smooth-keys"
    alpha: float = 0.5
    search: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not (
            math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0
        ):
            raise UsageError(f"transform {self.name}: alpha {self.alpha!r} is not a number in [0, 1]",
                             hint="0.5 balances the key and query ranges")
        if not isinstance(self.search, bool):
            raise UsageError(f"transform {self.name}: search {self.search!r} is not true or false")


@dataclass(frozen=True)
class RotateValues:
    """Rotate every KV head's values by an orthogonal matrix R (V' = V R), undone in o_proj (W_o R)."""

    name: ClassVar[str] = "rotate-values"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"transform {self.name}: seed {self.seed!r} is not a non-negative integer")


Transform = SmoothKeys | RotateValues
