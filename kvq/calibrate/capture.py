"""Capture K and V exactly as the engine caches them, through transformers' Cache API.

Every attention layer of a transformers model hands its new keys and values to
``Cache.update(key_states, value_states, layer_idx)``: keys after RoPE, values as they are, per KV
head (before GQA ``repeat_kv``), shaped (batch, num_kv_heads, seq, head_dim). :class:`StatsCache`
is a cache that folds each call into a :class:`~kvq.stats.KVStats` and stores nothing: a
calibration forward is a single prefill, whose attention needs only the K/V it was just given.
No model-specific code: any architecture that writes its cache through ``update`` works.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvq.errors import KvqError
from kvq.stats import KVStats


def real_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x (batch, heads, seq, dim) with only the real tokens, as (1, heads, n_real, dim).

    ``token_mask`` (batch, seq) bool marks real tokens; None means all are real (x is returned).
    """
    if token_mask is None:
        return x
    real = x.transpose(1, 2)[token_mask]  # (batch, seq, heads, dim) -> (n_real, heads, dim)
    return real.transpose(0, 1).unsqueeze(0)  # (n_real, heads, dim) -> (1, heads, n_real, dim)


def masked_minmax(x: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, channel) min and max of x (batch, heads, seq, dim) over real tokens only.

    Reductions run in x's own dtype (min / max are exact in any dtype); NaN propagates into the result.
    """
    real = real_tokens(x, token_mask)
    return real.amin(dim=(0, 2)), real.amax(dim=(0, 2))  # (heads, dim) each


def check_update_shapes(
    key_states: torch.Tensor, token_mask: torch.Tensor | None, layer_idx: int, command: str
) -> None:
    """K handed to ``Cache.update`` must be (batch, kv_heads, seq, head_dim) and fit the padding mask."""
    if key_states.dim() != 4:
        raise KvqError(
            f"layer {layer_idx}: Cache.update got keys of shape {tuple(key_states.shape)}, "
            "expected (batch, kv_heads, seq, head_dim)"
        )
    batch, _, seq, _ = key_states.shape
    if token_mask is not None and tuple(token_mask.shape) != (batch, seq):
        raise KvqError(
            f"layer {layer_idx}: the cache got {seq} positions for a batch of {tuple(token_mask.shape)} "
            "tokens; this model adds or drops positions kvq cannot match to the padding mask",
            hint=f"{command} with --batch-size 1 (no padding)",
        )


class StatsCache(DynamicCache):
    """A transformers cache that records K/V statistics of one forward pass instead of storing K/V.

    Made fresh for each batch, with that batch's token mask; all batches fold into one ``stats``.
    """

    def __init__(self, stats: KVStats, attention_mask: torch.Tensor | None, config=None):
        super().__init__(config=config)
        self.stats = stats
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: reduce without a gather
        self.token_mask = None if attention_mask is None else attention_mask.bool()
        self.tokens: int | None = None if attention_mask is None else int(self.token_mask.sum())
        self.layers_seen: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        check_update_shapes(key_states, self.token_mask, layer_idx, "calibrate")
        batch, _, seq, _ = key_states.shape
        tokens = self.tokens if self.tokens is not None else batch * seq
        k_min, k_max = masked_minmax(key_states, self.token_mask)
        v_min, v_max = masked_minmax(value_states, self.token_mask)
        self.stats.observe(layer_idx, k_min, k_max, v_min, v_max, tokens)
        self.layers_seen.append(layer_idx)
        return key_states, value_states
