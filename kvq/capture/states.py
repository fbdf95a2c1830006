"""What the capture hands its consumer: one layer's K/V (or queries) of one forward pass.

Shapes follow transformers' attention layers: (batch, heads, seq, head_dim), keys after RoPE, K/V
per KV head (before GQA ``repeat_kv``), queries per attention head. Padding is described by a
``token_mask`` (batch, seq) bool of real tokens, or None when every position is real; the
``real_*`` views drop the padding once, the first time a consumer asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from kvq.errors import KvqError


def real_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x (batch, heads, seq, dim) with only the real tokens, as (1, heads, n_real, dim).

    ``token_mask`` (batch, seq) bool marks real tokens; None means all are real (x is returned).
    """
    if token_mask is None:
        return x
    real = x.transpose(1, 2)[token_mask]  # (batch, seq, heads, dim) -> (n_real, heads, dim)
    return real.transpose(0, 1).unsqueeze(0)  # (n_real, heads, dim) -> (1, heads, n_real, dim)


def token_mask_of(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (batch, seq) bool mask of real tokens, or None when there is no padding at all."""
    if attention_mask is None or bool(attention_mask.all()):
        return None  # no padding: consumers reduce without a gather
    return attention_mask.bool()


def check_states(states: torch.Tensor, token_mask: torch.Tensor | None, layer_idx: int, what: str) -> None:
    """``states`` must be (batch, heads, seq, head_dim) and fit the padding mask."""
    if states.dim() != 4:
        raise KvqError(
            f"layer {layer_idx}: the model handed {what} of shape {tuple(states.shape)}, "
            "expected (batch, heads, seq, head_dim)"
        )
    batch, _, seq, _ = states.shape
    if token_mask is not None and tuple(token_mask.shape) != (batch, seq):
        raise KvqError(
            f"layer {layer_idx}: the model handed {what} for {seq} positions with a padding mask of shape "
            f"{tuple(token_mask.shape)}; it adds or drops positions kvq cannot match to the padding",
            hint="run with --batch-size 1 (no padding)",
        )


@dataclass(eq=False)
class CapturedKV:
    """One layer's new K and V as the engine caches them, from one forward pass."""

    layer_idx: int
    key: torch.Tensor  # (batch, kv_heads, seq, head_dim), after RoPE
    value: torch.Tensor  # (batch, kv_heads, seq, head_dim)
    token_mask: torch.Tensor | None  # (batch, seq) bool, None when there is no padding
    batch_index: int = 0  # which forward pass of the run (0, 1, ...)

    @cached_property
    def real_key(self) -> torch.Tensor:
        """(1, kv_heads, n_real, head_dim): the keys of real tokens only."""
        return real_tokens(self.key, self.token_mask)

    @cached_property
    def real_value(self) -> torch.Tensor:
        """(1, kv_heads, n_real, head_dim): the values of real tokens only."""
        return real_tokens(self.value, self.token_mask)

    @property
    def tokens(self) -> int:
        """Real tokens in this pass."""
        if self.token_mask is None:
            return int(self.key.shape[0] * self.key.shape[2])
        return int(self.token_mask.sum())


@dataclass(eq=False)
class CapturedQuery:
    """One layer's queries (after RoPE, per attention head) from one forward pass."""

    layer_idx: int
    query: torch.Tensor  # (batch, heads, seq, head_dim)
    token_mask: torch.Tensor | None  # (batch, seq) bool, None when there is no padding
    batch_index: int = 0
    scaling: float | None = None  # the softmax scale attention applies to q.k (None: not given, 1/sqrt(head_dim))

    @cached_property
    def real_query(self) -> torch.Tensor:
        """(1, heads, n_real, head_dim): the queries of real tokens only."""
        return real_tokens(self.query, self.token_mask)


class Consumer(Protocol):
    """What the capture hands every layer's K/V (and queries, when ``wants_queries``) to.

    ``kv`` returns the K and V attention goes on to read: an observer returns ``kv.key, kv.value``
    unchanged; a fake-quantizer returns quantized copies, as an engine's quantized cache does.
    ``query`` is called only when ``wants_queries`` is true, after that layer's ``kv``; it returns None, or the
    query attention goes on to read (an FP8 attention's quantized query).
    """

    wants_queries: bool

    def kv(self, captured: CapturedKV) -> tuple[torch.Tensor, torch.Tensor]: ...

    def query(self, captured: CapturedQuery) -> torch.Tensor | None: ...
