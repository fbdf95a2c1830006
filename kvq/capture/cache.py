"""The one place where a model hands kvq its K/V: transformers' ``Cache.update``.

Every attention layer of a transformers model hands its new keys and values to
``Cache.update(key_states, value_states, layer_idx)``: keys after RoPE, values as they are, per KV
head (before GQA ``repeat_kv``), shaped (batch, kv_heads, seq, head_dim), and attends over what
``update`` returns. :class:`CaptureCache` passes each call to a consumer
(:class:`~kvq.capture.states.Consumer`) and returns what the consumer says attention should read.
It stores nothing: every kvq forward is a single prefill, whose attention needs only the K/V it
was just given. No model-specific code: any architecture that writes its cache through
``update`` works, sliding-window layers included (their window is applied by the attention mask,
not by the cache, in a prefill).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import DynamicCache

from kvq.capture.states import CapturedKV, Consumer, check_states, token_mask_of

# The cache of the forward pass now running: the query capture (kvq.capture.queries) finds the
# consumer and the padding mask here, since transformers hands attention functions no cache.
ACTIVE_CACHE: ContextVar[CaptureCache | None] = ContextVar("kvq_active_cache", default=None)


class CaptureCache(DynamicCache):
    """A transformers cache that hands every layer's K/V to ``consumer`` and stores nothing.

    Made fresh for each forward pass, with that pass's ``attention_mask`` (batch, seq) (1 = real
    token) and its index ``batch_index`` in the run.
    """

    def __init__(self, consumer: Consumer, attention_mask: torch.Tensor | None = None, config=None,
                 batch_index: int = 0):
        super().__init__(config=config)
        self.consumer = consumer
        self.token_mask = token_mask_of(attention_mask)
        self.batch_index = batch_index
        self.layers_seen: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        check_states(key_states, self.token_mask, layer_idx, "keys")
        self.layers_seen.append(layer_idx)
        return self.consumer.kv(CapturedKV(layer_idx, key_states, value_states, self.token_mask, self.batch_index))

    @contextmanager
    def active(self) -> Iterator[CaptureCache]:
        """Make this the cache the query capture reports to while the block runs."""
        token = ACTIVE_CACHE.set(self)
        try:
            yield self
        finally:
            ACTIVE_CACHE.reset(token)


class DecodingCaptureCache(CaptureCache):
    """A :class:`CaptureCache` that also stores what the consumer returns, for generation token by token:
    attention reads the stored (e.g. quantized) K/V of every earlier token, as from an engine's cache."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        key, value = super().update(key_states, value_states, layer_idx)
        return DynamicCache.update(self, key, value, layer_idx, *args, **kwargs)
