"""Calibration's consumer of the capture: per (layer, KV head, channel) min / max of K and V, and, when a
clipping observer needs them, their histograms (kvq.quant.histogram) per head or per channel."""

from __future__ import annotations

import torch

from kvq.artifacts.stats import KVStats
from kvq.capture import CapturedKV, CapturedQuery
from kvq.errors import KvqError
from kvq.quant.histogram import head_histogram


def channel_minmax(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, channel) min and max of ``real`` (1, heads, n_real, dim), as (heads, dim) each.

    Reductions run in the input's own dtype (min / max are exact in any dtype); NaN propagates.
    """
    return real.amin(dim=(0, 2)), real.amax(dim=(0, 2))


class StatsConsumer:
    """Folds every layer's real-token K/V into ``stats`` and hands attention its K/V unchanged; with
    ``histograms`` "head" or "channel", their histograms too; with ``queries``, the queries' ranges; with a
    reservoir in ``stats``, it samples Q/K/V rows into it (and then asks for the queries)."""

    def __init__(self, stats: KVStats, histograms: str | None = None, queries: bool = False):
        if histograms not in (None, "head", "channel"):
            raise ValueError(f"histograms must be None, 'head' or 'channel', not {histograms!r}")
        self.stats = stats
        self.histograms = histograms
        self.queries = queries  # record the queries' ranges too (a recipe with a query: section)
        self.wants_queries = queries or stats.reservoir is not None

    def kv(self, captured: CapturedKV) -> tuple[torch.Tensor, torch.Tensor]:
        k_min, k_max = channel_minmax(captured.real_key)
        v_min, v_max = channel_minmax(captured.real_value)
        for name, low, high in (("K", k_min, k_max), ("V", v_min, v_max)):
            if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
                raise KvqError(
                    f"layer {captured.layer_idx}: {name} holds NaN or inf (batch {captured.batch_index})",
                    hint="check the model's weights; if it overflows in float16, try --dtype bfloat16 or float32",
                )
        k_hist = v_hist = None
        if self.histograms is not None:
            per_channel = self.histograms == "channel"
            k_hist = head_histogram(captured.real_key, per_channel)
            v_hist = head_histogram(captured.real_value, per_channel)
        self.stats.observe(captured.layer_idx, k_min, k_max, v_min, v_max, captured.tokens, k_hist, v_hist)
        reservoir = self.stats.reservoir
        if reservoir is not None:
            batch, _, seq, _ = captured.key.shape
            reservoir.decide(captured.batch_index, captured.token_mask, batch, seq)
            reservoir.keep("k", captured.layer_idx, captured.key)
            reservoir.keep("v", captured.layer_idx, captured.value)
        return captured.key, captured.value

    def query(self, captured: CapturedQuery) -> None:  # called only when wants_queries
        if captured.layer_idx not in self.stats.layers:
            # a layer that wrote no K/V (Gemma 4's KV sharing: it reads an earlier layer's cache, kvq.model.kv_config)
            # has nothing to pair its queries with: not calibrated (its q_scale stays the engine's 1.0)
            return
        if self.queries:
            q_min, q_max = channel_minmax(captured.real_query)
            if not (torch.isfinite(q_min).all() and torch.isfinite(q_max).all()):
                raise KvqError(f"layer {captured.layer_idx}: Q holds NaN or inf (batch {captured.batch_index})",
                               hint="check the model's weights; if it overflows in float16, try --dtype bfloat16 "
                               "or float32")
            self.stats.observe_query(captured.layer_idx, q_min, q_max)
        reservoir = self.stats.reservoir
        if reservoir is not None:
            reservoir.keep("q", captured.layer_idx, captured.query)
            if captured.scaling is not None:
                reservoir.scaling[captured.layer_idx] = captured.scaling
