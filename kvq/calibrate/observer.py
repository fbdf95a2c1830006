"""Calibration's consumer of the capture: per (layer, KV head, channel) min / max of K and V."""

from __future__ import annotations

import torch

from kvq.capture import CapturedKV, CapturedQuery
from kvq.errors import KvqError
from kvq.stats import KVStats


def channel_minmax(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, channel) min and max of ``real`` (1, heads, n_real, dim), as (heads, dim) each.

    Reductions run in the input's own dtype (min / max are exact in any dtype); NaN propagates.
    """
    return real.amin(dim=(0, 2)), real.amax(dim=(0, 2))


class StatsObserver:
    """Folds every layer's real-token K/V into ``stats`` and hands attention its K/V unchanged."""

    wants_queries = False

    def __init__(self, stats: KVStats):
        self.stats = stats

    def kv(self, captured: CapturedKV) -> tuple[torch.Tensor, torch.Tensor]:
        k_min, k_max = channel_minmax(captured.real_key)
        v_min, v_max = channel_minmax(captured.real_value)
        for name, low, high in (("K", k_min, k_max), ("V", v_min, v_max)):
            if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
                raise KvqError(
                    f"layer {captured.layer_idx}: {name} holds NaN or inf (batch {captured.batch_index})",
                    hint="check the model's weights; if it overflows in float16, try --dtype bfloat16 or float32",
                )
        self.stats.observe(captured.layer_idx, k_min, k_max, v_min, v_max, captured.tokens)
        return captured.key, captured.value

    def query(self, captured: CapturedQuery) -> None:  # wants_queries is False: never called
        return None
