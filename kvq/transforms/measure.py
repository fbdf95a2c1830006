"""Per-channel query and key statistics of real tokens, which key smoothing chooses its factors from.

Always: max |q| and max |k| per (head, channel) (SmoothAttention's ranges). For a factor search
(``SmoothKeys(search=True)``, :mod:`kvq.transforms.key_search`) also: the keys' per-channel min / max, the
queries' second moment per KV head (every query head of the group, every real token: mean q qᵀ, the
weights of the logit error) and the first ``search_rows`` real keys per KV head (the keys whose round-trip
error the search measures).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvq.capture import capture_batches
from kvq.data import Batch
from kvq.errors import KvqError


@dataclass(frozen=True)
class QKAbsMax:
    """One layer's query/key statistics, after RoPE, over real tokens, on the CPU (see the module docstring)."""

    query: torch.Tensor  # (heads, head_dim) max |q|, float64
    key: torch.Tensor  # (kv_heads, head_dim) max |k|, float64
    key_min: torch.Tensor | None = None  # (kv_heads, head_dim) float64, with search rows only
    key_max: torch.Tensor | None = None  # (kv_heads, head_dim) float64
    query_moment: torch.Tensor | None = None  # (kv_heads, head_dim, head_dim) float64: mean q qᵀ per KV head
    key_rows: torch.Tensor | None = None  # (kv_heads, rows, head_dim) float32: the first real keys


def _running(store: dict[int, torch.Tensor], layer: int, value: torch.Tensor, reduce) -> None:
    store[layer] = value if layer not in store else reduce(store[layer], value)


class _QKObserver:
    """A capture consumer keeping the running statistics of :class:`QKAbsMax`."""

    wants_queries = True

    def __init__(self, search_rows: int) -> None:
        self.search_rows = search_rows
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.key_min: dict[int, torch.Tensor] = {}
        self.key_max: dict[int, torch.Tensor] = {}
        self.moment: dict[int, torch.Tensor] = {}  # sum of q qᵀ per KV head
        self.count: dict[int, int] = {}  # query rows summed into moment per KV head
        self.rows: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _absmax(layer: int, states: torch.Tensor, what: str) -> torch.Tensor:
        """(1, heads, n, d) real states -> max |.| per (head, channel), float64 on the CPU; refused when not finite."""
        absmax = states.detach().abs().amax(dim=(0, 2)).double().cpu()  # reduced where the states are
        if not torch.isfinite(absmax).all():
            raise KvqError(f"layer {layer}: the model produced non-finite {what}",
                           hint="run in float32 or check the model's weights")
        return absmax

    def kv(self, captured):
        i, real = captured.layer_idx, captured.real_key
        if real.shape[2] == 0:
            return captured.key, captured.value
        _running(self.keys, i, self._absmax(i, real, "keys"), torch.maximum)
        if self.search_rows:
            k = real.detach()[0]  # (kv_heads, n, d), on the states' device: only reductions and kept rows move
            _running(self.key_min, i, k.amin(dim=1).double().cpu(), torch.minimum)
            _running(self.key_max, i, k.amax(dim=1).double().cpu(), torch.maximum)
            kept = sum(r.shape[1] for r in self.rows.get(i, []))
            if kept < self.search_rows:
                self.rows.setdefault(i, []).append(k[:, : self.search_rows - kept].float().cpu())
        return captured.key, captured.value

    def query(self, captured):
        i, real = captured.layer_idx, captured.real_query
        if real.shape[2] == 0:
            return
        _running(self.queries, i, self._absmax(i, real, "queries"), torch.maximum)
        if self.search_rows:
            q = real.detach()[0].double()  # (heads, n, d), on the states' device
            kv_heads = self.keys[i].shape[0]
            heads, n, d = q.shape
            grouped = q.reshape(kv_heads, heads // kv_heads * n, d)  # (heads, n, d) -> (kv_heads, group * n, d)
            _running(self.moment, i, (grouped.transpose(1, 2) @ grouped).cpu(), torch.add)  # (kv_heads, d, d)
            self.count[i] = self.count.get(i, 0) + grouped.shape[1]


def measure_qk_absmax(model: torch.nn.Module, batch_iter: Iterable[Batch], search_rows: int = 0) -> list[QKAbsMax]:
    """Per layer, max |q| (heads, head_dim) and max |k| (kv_heads, head_dim) over the real tokens of every batch;
    with ``search_rows`` > 0 also what a factor search reads (see the module docstring)."""
    observer = _QKObserver(search_rows)
    capture_batches(model, batch_iter, observer)
    layers = sorted(observer.keys)
    if not layers or layers != list(range(len(layers))) or sorted(observer.queries) != layers:
        raise KvqError(f"query/key ranges seen for layers {layers} (queries: {sorted(observer.queries)}); "
                       "every layer needs both", hint="give at least one batch with real tokens")
    if not search_rows:
        return [QKAbsMax(observer.queries[i], observer.keys[i]) for i in layers]
    return [QKAbsMax(observer.queries[i], observer.keys[i], observer.key_min[i], observer.key_max[i],
                     observer.moment[i] / observer.count[i], torch.cat(observer.rows[i], dim=1)) for i in layers]
