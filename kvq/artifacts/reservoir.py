"""A small seeded sample of real Q / K / V rows per layer: what the ``attention`` observer searches on.

A calibration offers every sample with at least ``tokens`` real tokens as a candidate; the reservoir keeps
the first ``tokens`` real tokens (a prefix: the attention sink at position 0 and the relative positions
RoPE sees are those of real text) of ``chunks`` candidates, chosen uniformly among all candidates seen
(reservoir sampling, Vitter's algorithm R). Each decision is drawn from a generator seeded by (seed,
candidate number), so a resumed run decides exactly as an uninterrupted one. Memory: chunks x tokens x
(heads + 2 kv_heads) x head_dim float32 per layer.

Stored in stats.safetensors as ``layers.{i}.q.rows`` (kept, heads, tokens, head_dim), ``layers.{i}.k.rows`` and
``layers.{i}.v.rows`` (kept, kv_heads, tokens, head_dim), with the metadata ``reservoir`` (JSON: chunks,
tokens, seed, seen, per-layer attention scaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from kvq.errors import UsageError
from kvq.io.parse import parse_json

CHUNKS = 4
TOKENS = 128
_MIX = 1_000_003  # seeds of different candidates never coincide for seeds below 2**40


def _draw(seed: int, n: int, high: int) -> int:
    """A uniform integer in [0, high) for candidate ``n`` of the run seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed * _MIX + n)
    return int(torch.randint(high, (1,), generator=gen))


@dataclass
class Reservoir:
    chunks: int = CHUNKS
    tokens: int = TOKENS
    seed: int = 0
    seen: int = 0  # candidates offered so far
    rows: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {"q": {}, "k": {}, "v": {}})
    scaling: dict[int, float] = field(default_factory=dict)  # layer -> the softmax scale attention applied
    _batch: int | None = None
    _slots: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (sample, positions, slot)

    @property
    def kept(self) -> int:
        return min(self.seen, self.chunks)

    def decide(self, batch_index: int, token_mask: torch.Tensor | None, batch: int, seq: int) -> None:
        """Once per forward pass: which of its samples enter which slot (every layer then keeps the same ones)."""
        if self._batch == batch_index:
            return
        self._batch, self._slots = batch_index, []
        for b in range(batch):
            positions = (torch.arange(seq) if token_mask is None
                         else token_mask[b].cpu().nonzero().flatten())  # (n_real,) real positions of sample b
            if len(positions) < self.tokens:
                continue
            n = self.seen
            self.seen += 1
            slot = n if n < self.chunks else _draw(self.seed, n, n + 1)
            if slot < self.chunks:
                self._slots.append((b, positions[: self.tokens], slot))

    def keep(self, which: str, layer_idx: int, states: torch.Tensor) -> None:
        """Copy this pass's chosen rows of ``states`` (batch, heads, seq, head_dim) into the layer's slots."""
        if not self._slots:
            return
        store = self.rows[which]
        if layer_idx not in store:
            _, heads, _, dim = states.shape
            store[layer_idx] = torch.zeros(self.chunks, heads, self.tokens, dim, dtype=torch.float32)
        for b, positions, slot in self._slots:
            store[layer_idx][slot] = states[b, :, positions.to(states.device)].to("cpu", torch.float32)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's kept (q, k, v) rows: (kept, heads, tokens, dim), (kept, kv_heads, tokens, dim) twice."""
        if self.kept == 0 or i not in self.rows["k"] or i not in self.rows["q"]:
            raise UsageError(f"the statistics hold no Q/K/V rows for layer {i} (no calibration sample had "
                             f"{self.tokens} real tokens)", hint=f"calibrate with --seqlen of at least {self.tokens}")
        return tuple(self.rows[w][i][: self.kept] for w in ("q", "k", "v"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{w}.rows": t[: self.kept].contiguous()
                for w in ("q", "k", "v") for i, t in sorted(self.rows[w].items())}

    def metadata(self) -> str:
        return json.dumps({"chunks": self.chunks, "tokens": self.tokens, "seed": self.seed, "seen": self.seen,
                           "scaling": {str(i): s for i, s in sorted(self.scaling.items())}}, sort_keys=True)

    @classmethod
    def from_file(cls, raw: str, parts: dict[int, dict[str, torch.Tensor]], where: str) -> Reservoir:
        """The reservoir of a loaded statistics file (``raw``: its ``reservoir`` metadata), checked."""
        meta = parse_json(raw, f"{where}: metadata reservoir", "calibrate again")
        try:
            res = cls(chunks=int(meta["chunks"]), tokens=int(meta["tokens"]), seed=int(meta["seed"]),
                      seen=int(meta["seen"]), scaling={int(i): float(s) for i, s in meta["scaling"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{where}: metadata reservoir is not the JSON kvq writes ({exc})",
                             hint="calibrate again") from exc
        for i, p in sorted(parts.items()):
            got = [w for w in ("q", "k", "v") if f"{w}.rows" in p]
            if got and len(got) != 3:
                raise UsageError(f"{where}: layer {i} holds {', '.join(w + '.rows' for w in got)} but not all of "
                                 "q.rows, k.rows, v.rows", hint="calibrate again")
            for w in got:
                t = p[f"{w}.rows"]
                if t.dim() != 4 or t.shape[0] != res.kept or t.shape[2] != res.tokens or not t.dtype.is_floating_point:
                    raise UsageError(f"{where}: layers.{i}.{w}.rows has shape {tuple(t.shape)}; expected "
                                     f"({res.kept}, heads, {res.tokens}, head_dim) floats", hint="calibrate again")
                if not bool(torch.isfinite(t).all()):
                    raise UsageError(f"{where}: layers.{i}.{w}.rows holds NaN or inf", hint="calibrate again")
                padded = torch.zeros(res.chunks, *t.shape[1:], dtype=torch.float32)
                padded[: res.kept] = t.to(torch.float32)
                res.rows[w][i] = padded
        return res
