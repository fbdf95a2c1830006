"""Per-layer, per-KV-head, per-channel statistics of the KV cache, and their file format.

``stats.safetensors`` holds, for every layer i, float32 tensors of shape (num_kv_heads, head_dim):

    layers.{i}.k.min   layers.{i}.k.max   layers.{i}.k.absmax
    layers.{i}.v.min   layers.{i}.v.max   layers.{i}.v.absmax

and string metadata (model, config hash, dataset, samples, seqlen, seed, tokens, dtype, capture
point, kvq version, ...). Statistics are a streaming accumulator: merging the statistics of two
halves of a data set gives exactly those of the whole (min / max are associative).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq.artifact import read_safetensors, require_file, safetensors_bytes, write_files_atomically
from kvq.errors import KvqError, UsageError

STATS_FILE = "stats.safetensors"
_KEY = re.compile(r"^layers\.(\d+)\.([kv])\.(min|max|absmax)$")


@dataclass
class TensorStats:
    """Running min / max of one of K or V in one layer, per (kv head, channel), float32."""

    min: torch.Tensor
    max: torch.Tensor

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(-self.min, self.max)

    def merge_(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        torch.minimum(self.min, min_val.to(self.min), out=self.min)
        torch.maximum(self.max, max_val.to(self.max), out=self.max)


@dataclass
class LayerStats:
    k: TensorStats
    v: TensorStats
    tokens: int = 0


@dataclass
class KVStats:
    """Statistics of every observed layer, keyed by layer index, plus string metadata."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def observe(
        self,
        layer_idx: int,
        k_min: torch.Tensor,
        k_max: torch.Tensor,
        v_min: torch.Tensor,
        v_max: torch.Tensor,
        tokens: int,
    ) -> None:
        """Fold one batch's reduced (num_kv_heads, head_dim) ranges of one layer into the totals."""
        layer = self.layers.get(layer_idx)
        if layer is None:
            f32 = torch.float32
            self.layers[layer_idx] = LayerStats(
                k=TensorStats(k_min.to(f32).clone(), k_max.to(f32).clone()),
                v=TensorStats(v_min.to(f32).clone(), v_max.to(f32).clone()),
                tokens=tokens,
            )
            return
        if layer.k.min.shape != k_min.shape or layer.v.min.shape != v_min.shape:
            raise KvqError(
                f"layer {layer_idx}: K/V shape changed between batches "
                f"({tuple(layer.k.min.shape)} then {tuple(k_min.shape)})"
            )
        layer.k.merge_(k_min, k_max)
        layer.v.merge_(v_min, v_max)
        layer.tokens += tokens

    def merge(self, other: KVStats) -> KVStats:
        """A new KVStats holding both: what one accumulator would hold after seeing both data sets."""
        out = KVStats(metadata=dict(self.metadata))
        for src in (self, other):
            for i, layer in src.layers.items():
                out.observe(i, layer.k.min, layer.k.max, layer.v.min, layer.v.max, layer.tokens)
        return out

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_tokens(self) -> int:
        return max((layer.tokens for layer in self.layers.values()), default=0)

    def check_complete(self, num_layers: int) -> None:
        """Every layer 0..num_layers-1 observed with at least one token, all values finite."""
        missing = [i for i in range(num_layers) if i not in self.layers or self.layers[i].tokens == 0]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise KvqError(
                f"{len(missing)} of {num_layers} attention layers were never observed (layers {shown})",
                hint="the model must write its KV cache through transformers' Cache.update; "
                "models with KV-sharing or non-attention layers are not supported yet",
            )
        for i in sorted(self.layers):
            layer = self.layers[i]
            for name, ts in (("K", layer.k), ("V", layer.v)):
                if not (torch.isfinite(ts.min).all() and torch.isfinite(ts.max).all()):
                    raise KvqError(
                        f"layer {i}: {name} holds NaN or inf",
                        hint="check the model's weights; if it overflows in float16, try --dtype bfloat16 or float32",
                    )

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in sorted(self.layers):
            layer = self.layers[i]
            for name, ts in (("k", layer.k), ("v", layer.v)):
                out[f"layers.{i}.{name}.min"] = ts.min
                out[f"layers.{i}.{name}.max"] = ts.max
                out[f"layers.{i}.{name}.absmax"] = ts.absmax
        return out

    def to_bytes(self) -> bytes:
        """The stats.safetensors file content (per-layer token counts go in the metadata)."""
        meta = dict(self.metadata)
        meta["layer_tokens"] = json.dumps([self.layers[i].tokens for i in sorted(self.layers)])
        return safetensors_bytes(self.tensors(), meta)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_files_atomically({path: self.to_bytes()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVStats:
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        require_file(path, "statistics file", hint="pass the stats.safetensors written by `kvq calibrate`")
        raw, meta = read_safetensors(path, "statistics file")
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in raw.items():
            m = _KEY.match(key)
            if m is None:
                raise UsageError(f"statistics file {path}: unexpected tensor {key!r}")
            parts.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = tensor.to(torch.float32)
        if not parts:
            raise UsageError(f"statistics file {path} holds no layer statistics")
        try:
            tokens = json.loads(meta.pop("layer_tokens", "[]"))
        except json.JSONDecodeError:
            tokens = []
        stats = cls(metadata=meta)
        for n, i in enumerate(sorted(parts)):
            p = parts[i]
            need = ("k.min", "k.max", "v.min", "v.max")
            lacking = [n_ for n_ in need if n_ not in p]
            if lacking:
                raise UsageError(f"statistics file {path}: layer {i} lacks {', '.join(lacking)}")
            stats.layers[i] = LayerStats(
                k=TensorStats(p["k.min"], p["k.max"]),
                v=TensorStats(p["v.min"], p["v.max"]),
                tokens=int(tokens[n]) if n < len(tokens) else int(meta.get("tokens", 0) or 0),
            )
        return stats
