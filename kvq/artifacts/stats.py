"""Per-layer, per-KV-head, per-channel statistics of the KV cache, and their file format.

``stats.safetensors`` holds, for every layer i, float32 tensors of shape (num_kv_heads, head_dim):

    layers.{i}.k.min   layers.{i}.k.max   layers.{i}.k.absmax
    layers.{i}.v.min   layers.{i}.v.max   layers.{i}.v.absmax

and string metadata (model, config hash, dataset, samples, seqlen, seed, tokens, dtype, capture
point, kvq version, ...). When a clipping observer needs them (opt-in), it also holds int64 histograms
on kvq.quant.histogram's fixed grid, per head or per channel:

    layers.{i}.k.hist  layers.{i}.v.hist    (num_kv_heads, NUM_BINS) or (num_kv_heads, head_dim, NUM_BINS)

with the metadata ``histograms`` = "<grid schema> head|channel". Statistics are a streaming accumulator:
merging the statistics of two halves of a data set gives exactly those of the whole (min / max are
associative, histogram counts add).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq.artifacts.files import STATS_FILE, StatedShape, read_layers, safetensors_bytes, write_artifact
from kvq.artifacts.reservoir import Reservoir
from kvq.errors import KvqError, UsageError
from kvq.io.parse import parse_json
from kvq.quant import histogram as grid

_KEY = re.compile(r"^layers\.(0|[1-9][0-9]{0,8})\.([kv]\.(?:min|max|absmax|hist)|q\.(?:min|max|absmax)|[qkv]\.rows)$")
_PARTS = ("k.min", "k.max", "k.absmax", "v.min", "v.max", "v.absmax")
_HINT = "pass the stats.safetensors written by `kvq calibrate`"


@dataclass
class TensorStats:
    """Running min / max of one of K or V in one layer, per (kv head, channel), float32."""

    min: torch.Tensor
    max: torch.Tensor
    hist: torch.Tensor | None = None  # int64 counts on kvq.quant.histogram's grid, per head or per channel

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(-self.min, self.max)

    def merge_(self, min_val: torch.Tensor, max_val: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        torch.minimum(self.min, min_val.to(self.min), out=self.min)
        torch.maximum(self.max, max_val.to(self.max), out=self.max)
        if (counts is None) != (self.hist is None) or (counts is not None and counts.shape != self.hist.shape):
            raise KvqError("histograms cannot be merged with statistics that lack them or hold another kind",
                           hint="merge statistics calibrated with the same observer")
        if counts is not None:
            self.hist += counts.to(device=self.hist.device, dtype=torch.int64)


@dataclass
class LayerStats:
    k: TensorStats
    v: TensorStats
    tokens: int = 0
    q: TensorStats | None = None  # the queries' ranges, (num_heads, head_dim), when a recipe quantizes them


@dataclass
class KVStats:
    """Statistics of every observed layer, keyed by layer index, plus string metadata."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    reservoir: Reservoir | None = None  # sampled Q/K/V rows, for the attention observer

    def observe(
        self,
        layer_idx: int,
        k_min: torch.Tensor,
        k_max: torch.Tensor,
        v_min: torch.Tensor,
        v_max: torch.Tensor,
        tokens: int,
        k_hist: torch.Tensor | None = None,
        v_hist: torch.Tensor | None = None,
    ) -> None:
        """Fold one batch's reduced (num_kv_heads, head_dim) ranges (and histograms) of one layer into the totals."""
        layer = self.layers.get(layer_idx)
        if layer is None:
            f32 = torch.float32

            def counts(h: torch.Tensor | None) -> torch.Tensor | None:
                return None if h is None else h.to(device="cpu", dtype=torch.int64).clone()

            self.layers[layer_idx] = LayerStats(
                k=TensorStats(k_min.to(f32).clone(), k_max.to(f32).clone(), counts(k_hist)),
                v=TensorStats(v_min.to(f32).clone(), v_max.to(f32).clone(), counts(v_hist)),
                tokens=tokens,
            )
            return
        if layer.k.min.shape != k_min.shape or layer.v.min.shape != v_min.shape:
            raise KvqError(
                f"layer {layer_idx}: K/V shape changed between batches "
                f"({tuple(layer.k.min.shape)} then {tuple(k_min.shape)})"
            )
        layer.k.merge_(k_min, k_max, k_hist)
        layer.v.merge_(v_min, v_max, v_hist)
        layer.tokens += tokens

    def merge(self, other: KVStats) -> KVStats:
        """A new KVStats holding both: what one accumulator would hold after seeing both data sets."""
        if self.reservoir is not None or other.reservoir is not None:
            raise KvqError("statistics holding sampled Q/K/V rows cannot be merged",
                           hint="calibrate all the data in one run")
        out = KVStats(metadata=dict(self.metadata))
        for src in (self, other):
            for i, layer in src.layers.items():
                out.observe(i, layer.k.min, layer.k.max, layer.v.min, layer.v.max, layer.tokens,
                            layer.k.hist, layer.v.hist)
                if layer.q is not None:
                    out.observe_query(i, layer.q.min, layer.q.max)
        return out

    def observe_query(self, layer_idx: int, q_min: torch.Tensor, q_max: torch.Tensor) -> None:
        """Fold one batch's (num_heads, head_dim) query ranges of a layer (after its K/V) into the totals."""
        layer = self.layers.get(layer_idx)
        if layer is None:
            raise KvqError(f"layer {layer_idx}: queries seen before the layer's K/V")
        if layer.q is None:
            layer.q = TensorStats(q_min.to(torch.float32).clone(), q_max.to(torch.float32).clone())
        else:
            layer.q.merge_(q_min, q_max)

    @property
    def histograms(self) -> str | None:
        """"head" or "channel" when every layer holds histograms of that kind; None when none does."""
        kinds = {_hist_kind(ts.hist) for layer in self.layers.values() for ts in (layer.k, layer.v)}
        if not kinds:
            return None
        if len(kinds) != 1:
            raise KvqError("some layers hold histograms and some do not, or of another kind")
        return kinds.pop()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_tokens(self) -> int:
        return max((layer.tokens for layer in self.layers.values()), default=0)

    def check_complete(self, layers: int | Sequence[int]) -> None:
        """Every layer with a KV cache (``layers``, or 0..layers-1) observed with at least one token, no other
        layer observed, all values finite."""
        want = list(range(layers)) if isinstance(layers, int) else list(layers)
        missing = [i for i in want if i not in self.layers or self.layers[i].tokens == 0]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise KvqError(
                f"{len(missing)} of {len(want)} attention layers were never observed (layers {shown})",
                hint="the model must write its KV cache through transformers' Cache.update; "
                "models with KV-sharing layers are not supported yet",
            )
        extra = sorted(set(self.layers) - set(want))
        if extra:
            raise KvqError(f"layers {', '.join(map(str, extra[:8]))} wrote K/V, but the model's config gives them "
                           "no KV cache (layer_types)", hint="report the model type to kvq")
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
                if ts.hist is not None:
                    out[f"layers.{i}.{name}.hist"] = ts.hist
            if layer.q is not None:
                out[f"layers.{i}.q.min"], out[f"layers.{i}.q.max"] = layer.q.min, layer.q.max
                out[f"layers.{i}.q.absmax"] = layer.q.absmax
        if self.reservoir is not None:
            out.update(self.reservoir.tensors())
        return out

    def to_bytes(self) -> bytes:
        """The stats.safetensors file content (per-layer token counts go in the metadata)."""
        meta = dict(self.metadata)
        meta["layer_tokens"] = json.dumps([self.layers[i].tokens for i in sorted(self.layers)])
        meta.pop("histograms", None)
        meta.pop("reservoir", None)
        if self.reservoir is not None:
            meta["reservoir"] = self.reservoir.metadata()
        if self.histograms is not None:
            meta["histograms"] = f"{grid.SCHEMA} {self.histograms}"
        return safetensors_bytes(self.tensors(), meta)

    def save(self, out_dir: str | Path, *, force: bool = False, inputs: Sequence[Path] = ()) -> Path:
        """Write stats.safetensors into the artifact folder ``out_dir`` (see :func:`kvq.artifacts.files.write_artifact`)."""
        (path,) = write_artifact(Path(out_dir), {STATS_FILE: self.to_bytes()}, force=force, inputs=inputs)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVStats:
        """From stats.safetensors or a folder holding it; refuses a file that is not sound statistics."""
        path = stats_path(path)
        parts, meta = read_layers(path, "statistics file", _KEY, _PARTS, _HINT)
        where = f"statistics file {path}"
        tokens = _layer_tokens(meta.pop("layer_tokens", None), len(parts), where)  # in ascending layer order
        if tokens is not None:
            tokens = dict(zip(sorted(parts), tokens, strict=True))
        else:  # older files: one count for every layer
            raw = meta.get("tokens") or "0"
            if not re.fullmatch(r"[0-9]{1,18}", raw):
                raise UsageError(f"{where}: metadata tokens={raw[:40]!r} is not a token count", hint=_HINT)
            tokens = dict.fromkeys(parts, int(raw))
        stats = cls(metadata=meta)
        stated = StatedShape.parse(meta, where)
        first = min(parts)
        if stated.layers is not None:  # per layer, K and V each: the shapes the metadata states (checked below)
            shapes = {i: (stated.layers[i].k, stated.layers[i].v) for i in parts}
        else:  # one shape for every layer's K and V: the first layer's, checked against the metadata
            held = tuple(parts[first]["k.min"].shape)
            stated.check(first, "k", held, f"layers.{first}.k.min", where)
            shapes = dict.fromkeys(parts, (held, held))
        if "reservoir" in meta:
            stats.reservoir = Reservoir.from_file(meta.pop("reservoir"), parts, where)
            for j, which in enumerate("kv"):
                bad = [i for i, t in stats.reservoir.rows[which].items() if (t.shape[1], t.shape[3]) != shapes[i][j]]
                if bad:
                    raise UsageError(f"{where}: layers.{bad[0]}.{which}.rows are not rows of {shapes[bad[0]][j]} "
                                     "(kv_heads, head_dim)", hint=_HINT)
        elif any(part.endswith(".rows") for p in parts.values() for part in p):
            raise UsageError(f"{where} holds Q/K/V rows but no reservoir metadata", hint=_HINT)
        for i in sorted(parts):
            p = parts[i]
            for part in _PARTS:
                tensor = p[part]
                shape = shapes[i][0 if part.startswith("k") else 1]
                if not tensor.dtype.is_floating_point or tensor.dim() != 2 or tuple(tensor.shape) != shape:
                    raise UsageError(f"{where}: layers.{i}.{part} is {str(tensor.dtype).removeprefix('torch.')} "
                                     f"{tuple(tensor.shape)}; every statistic must be a float tensor of shape "
                                     f"{shape} (kv_heads, head_dim)", hint=_HINT)
            layer_tokens = tokens[i]
            kind = _check_hist_meta(meta, p, f"{where}: layer {i}")
            layer = LayerStats(
                k=TensorStats(p["k.min"].to(torch.float32), p["k.max"].to(torch.float32),
                              _checked_hist(p.get("k.hist"), kind, shapes[i][0], layer_tokens,
                                            f"{where}: layers.{i}.k.hist")),
                v=TensorStats(p["v.min"].to(torch.float32), p["v.max"].to(torch.float32),
                              _checked_hist(p.get("v.hist"), kind, shapes[i][1], layer_tokens,
                                            f"{where}: layers.{i}.v.hist")),
                tokens=layer_tokens,
            )
            layer.q = _query_ranges(p, f"{where}: layer {i}")
            for name, ts in (("K", layer.k), ("V", layer.v), ("Q", layer.q)):
                if ts is not None:
                    _check_range(ts, f"{where}: layer {i} {name}")
            stats.layers[i] = layer
        with_q = {i for i, layer in stats.layers.items() if layer.q is not None}
        if with_q and len(with_q) != len(stats.layers):
            raise UsageError(f"{where}: some layers hold query ranges and some do not", hint=_HINT)
        # like layer_tokens and reservoir, "histograms" describes the file's tensors (to_bytes writes it again from
        # them), not the run: kept out of the metadata, so scales solved from the file carry what calibrate's carry
        stats.metadata.pop("histograms", None)
        return stats


def stats_path(path: str | Path) -> Path:
    """The statistics file ``path`` names: itself, or the stats.safetensors in a folder."""
    path = Path(path)
    return path / STATS_FILE if path.is_dir() else path


def _layer_tokens(raw: str | None, num_layers: int, where: str) -> list[int] | None:
    """The per-layer token counts of the metadata (None when absent); refuses a malformed list."""
    if raw is None:
        return None
    tokens = parse_json(raw, f"{where}: metadata layer_tokens", _HINT)
    if not (isinstance(tokens, list) and len(tokens) == num_layers
            and all(type(t) is int and t >= 0 for t in tokens)):
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


def _hist_kind(counts: torch.Tensor | None) -> str | None:
    return None if counts is None else ("channel" if counts.dim() == 3 else "head")


def _check_hist_meta(meta: dict[str, str], parts: dict[str, torch.Tensor], where: str) -> str | None:
    """The histogram kind the metadata announces ("head" / "channel", None when absent), checked against the
    grid kvq reads and against the layer's tensors."""
    raw = meta.get("histograms")
    present = [part for part in ("k.hist", "v.hist") if part in parts]
    if raw is None:
        if present:
            raise UsageError(f"{where} holds {present[0]} but the metadata names no histogram grid", hint=_HINT)
        return None
    schema, _, kind = raw.rpartition(" ")
    if schema != grid.SCHEMA or kind not in ("head", "channel"):
        raise UsageError(f"{where}: histograms {raw!r} are not on the grid this kvq reads ({grid.SCHEMA} head|channel)",
                         hint="calibrate again with this version of kvq")
    if len(present) != 2:
        raise UsageError(f"{where} lacks k.hist or v.hist although the metadata announces histograms", hint=_HINT)
    return kind


def _checked_hist(counts: torch.Tensor | None, kind: str | None, shape: tuple[int, ...], tokens: int,
                  where: str) -> torch.Tensor | None:
    """A loaded histogram: int64 counts of the announced shape, each head's (or channel's) total the values seen."""
    if counts is None:
        return None
    heads, dim = shape
    want = (heads, grid.NUM_BINS) if kind == "head" else (heads, dim, grid.NUM_BINS)
    if counts.dtype != torch.int64 or tuple(counts.shape) != want:
        raise UsageError(f"{where} is {str(counts.dtype).removeprefix('torch.')} {tuple(counts.shape)}; "
                         f"expected int64 {want}", hint=_HINT)
    per_group = tokens * (dim if kind == "head" else 1)
    totals = counts.sum(-1)
    if bool((counts < 0).any()) or bool((totals != per_group).any()):
        raise UsageError(f"{where}: counts do not add up to the {per_group} values seen per "
                         f"{'head' if kind == 'head' else 'channel'}", hint=_HINT)
    return counts


def _query_ranges(parts: dict[str, torch.Tensor], where: str) -> TensorStats | None:
    """A layer's query ranges (q.min / q.max, (num_heads, head_dim) floats), or None when it has none."""
    present = [p for p in ("q.min", "q.max", "q.absmax") if p in parts]
    if not present:
        return None
    if len(present) != 3:
        raise UsageError(f"{where} holds {', '.join(present)} but not all of q.min, q.max, q.absmax", hint=_HINT)
    lo, hi = parts["q.min"], parts["q.max"]
    if not lo.dtype.is_floating_point or lo.dim() != 2 or lo.shape != hi.shape:
        raise UsageError(f"{where}: q.min / q.max must be float tensors of one (num_heads, head_dim) shape", hint=_HINT)
    return TensorStats(lo.to(torch.float32), hi.to(torch.float32))
