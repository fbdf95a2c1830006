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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq.artifact import STATS_FILE, read_layers, safetensors_bytes, write_artifact
from kvq.errors import KvqError, UsageError

_KEY = re.compile(r"^layers\.(\d+)\.([kv]\.(?:min|max|absmax))$")
_PARTS = ("k.min", "k.max", "k.absmax", "v.min", "v.max", "v.absmax")
_HINT = "pass the stats.safetensors written by `kvq calibrate`"


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

    def save(self, out_dir: str | Path, *, force: bool = False, inputs: Sequence[Path] = ()) -> Path:
        """Write stats.safetensors into the artifact folder ``out_dir`` (see :func:`kvq.artifact.write_artifact`)."""
        (path,) = write_artifact(Path(out_dir), {STATS_FILE: self.to_bytes()}, force=force, inputs=inputs)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVStats:
        """From stats.safetensors or a folder holding it; refuses a file that is not sound statistics."""
        path = stats_path(path)
        parts, meta = read_layers(path, "statistics file", _KEY, _PARTS, _HINT)
        where = f"statistics file {path}"
        tokens = _layer_tokens(meta.pop("layer_tokens", None), len(parts), where)
        stats = cls(metadata=meta)
        shape = tuple(parts[0]["k.min"].shape)
        for i in sorted(parts):
            p = parts[i]
            for part in _PARTS:
                tensor = p[part]
                if not tensor.dtype.is_floating_point or tensor.dim() != 2 or tuple(tensor.shape) != shape:
                    raise UsageError(f"{where}: layers.{i}.{part} is {str(tensor.dtype).removeprefix('torch.')} "
                                     f"{tuple(tensor.shape)}; every statistic must be a float tensor of shape "
                                     f"{shape} (kv_heads, head_dim)", hint=_HINT)
            layer = LayerStats(
                k=TensorStats(p["k.min"].to(torch.float32), p["k.max"].to(torch.float32)),
                v=TensorStats(p["v.min"].to(torch.float32), p["v.max"].to(torch.float32)),
                tokens=tokens[i] if tokens is not None else int(meta.get("tokens", 0) or 0),
            )
            for name, ts in (("K", layer.k), ("V", layer.v)):
                _check_range(ts, f"{where}: layer {i} {name}")
            stats.layers[i] = layer
        return stats


def stats_path(path: str | Path) -> Path:
    """The statistics file ``path`` names: itself, or the stats.safetensors in a folder."""
    path = Path(path)
    return path / STATS_FILE if path.is_dir() else path


def _layer_tokens(raw: str | None, num_layers: int, where: str) -> list[int] | None:
    """The per-layer token counts of the metadata (None when absent); refuses a malformed list."""
    if raw is None:
        return None
    try:
        tokens = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: metadata layer_tokens is not JSON ({exc.msg})", hint=_HINT) from exc
    if not (isinstance(tokens, list) and len(tokens) == num_layers
            and all(isinstance(t, int) and t >= 0 for t in tokens)):
        raise UsageError(f"{where}: metadata layer_tokens is not a list of {num_layers} token counts", hint=_HINT)
    return tokens


def _check_range(ts: TensorStats, where: str) -> None:
    """Finite statistics with min <= max everywhere; the first offending (head, channel) is named."""
    bad = ~(torch.isfinite(ts.min) & torch.isfinite(ts.max))
    if bad.any():
        head, channel = (int(x) for x in bad.nonzero()[0])
        raise UsageError(f"{where} head {head} channel {channel}: min / max hold NaN or inf", hint=_HINT)
    crossed = ts.min > ts.max
    if crossed.any():
        head, channel = (int(x) for x in crossed.nonzero()[0])
        raise UsageError(f"{where} head {head} channel {channel}: min {ts.min[head, channel].item():g} > "
                         f"max {ts.max[head, channel].item():g}", hint=_HINT)
