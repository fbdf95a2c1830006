"""Per-channel query and key ranges of real tokens, the statistics key smoothing chooses factors from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvq.capture import capture_batches
from kvq.data import Batch
from kvq.errors import KvqError


@dataclass(frozen=True)
class QKAbsMax:
    """One layer's max |q| and max |k| per channel, after RoPE, over real tokens, float64 on the CPU."""

    query: torch.Tensor  # (heads, head_dim)
    key: torch.Tensor  # (kv_heads, head_dim)


class _AbsMaxObserver:
    """A capture consumer keeping the running per-(head, channel) max |.| of queries and keys."""

    wants_queries = True

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}

    @staticmethod
    def _update(store: dict[int, torch.Tensor], layer: int, states: torch.Tensor, what: str) -> None:
        if states.shape[2] == 0:
            return
        absmax = states.detach().abs().amax(dim=(0, 2)).double().cpu()  # (1, heads, n, d) -> (heads, d)
        if not torch.isfinite(absmax).all():
            raise KvqError(f"layer {layer}: the model produced non-finite {what}",
                           hint="run in float32 or check the model's weights")
        store[layer] = absmax if layer not in store else torch.maximum(store[layer], absmax)

    def kv(self, captured):
        self._update(self.keys, captured.layer_idx, captured.real_key, "keys")
        return captured.key, captured.value

    def query(self, captured):
        self._update(self.queries, captured.layer_idx, captured.real_query, "queries")


def measure_qk_absmax(model: torch.nn.Module, batch_iter: Iterable[Batch]) -> list[QKAbsMax]:
    """Per layer, max |q| (heads, head_dim) and max |k| (kv_heads, head_dim) over the real tokens of every batch."""
    observer = _AbsMaxObserver()
    capture_batches(model, batch_iter, observer)
    layers = sorted(observer.keys)
    if not layers or layers != list(range(len(layers))) or sorted(observer.queries) != layers:
        raise KvqError(f"query/key ranges seen for layers {layers} (queries: {sorted(observer.queries)}); "
                       "every layer needs both", hint="give at least one batch with real tokens")
    return [QKAbsMax(observer.queries[i], observer.keys[i]) for i in layers]
