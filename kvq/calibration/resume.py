"""Partial statistics saved while a calibration runs, and ``--resume`` from them.

Every ``--save-every`` samples (default: about once a minute of work), and on Ctrl-C, the statistics
so far go atomically into ``stats.partial.safetensors`` in ``--out``, with the fingerprint of the run
(model and config hash, data, the selected samples' tokens, seqlen, batch size, recipe) and the
number of samples done. ``kvq calibrate ... --resume`` loads them, refuses a run whose fingerprint
differs (naming what differs), and continues with the next sample. min / max / token counts merge
exactly in any order, so the result equals an uninterrupted run's bit for bit. The final write of
the artifact set drops the partial file.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvq.artifacts.files import PARTIAL_FILE, read_safetensors
from kvq.artifacts.reservoir import Reservoir
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.io.atomic import write_file
from kvq.model.model_spec import KVShape

SAVE_SECONDS = 60.0  # the default cadence: about every minute of work
_PREFIX = "partial."
_HINT = "kvq resumes only partial statistics it wrote itself: run without --resume to start again"


def fingerprint(model: str, config_hash: str, data: str, token_ids: list[list[int]], seqlen: int,
                batch_size: int, recipe: str) -> dict[str, str]:
    """What must be the same for a run to continue another: one string per thing a user could change."""
    samples = hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()
    return {"model": f"{model} (config {config_hash})", "data": data, "samples": samples, "seqlen": str(seqlen),
            "batch size": str(batch_size), "recipe": recipe}


class PartialSaver:
    """Saves the statistics so far every ``every`` samples (or every SAVE_SECONDS when ``every`` is None)."""

    def __init__(self, out_dir: Path, print_: dict[str, str], every: int | None):
        self.path = Path(out_dir) / PARTIAL_FILE
        self.print = print_
        self.every = every
        self.saved_at = (0, time.monotonic())

    def due(self, done: int) -> bool:
        last_done, last_time = self.saved_at
        if self.every is not None:
            return done - last_done >= self.every
        return time.monotonic() - last_time >= SAVE_SECONDS

    def save(self, stats: KVStats, done: int) -> None:
        if done == 0 or done == self.saved_at[0]:
            return
        meta = {**stats.metadata, **{_PREFIX + k: v for k, v in self.print.items()}, _PREFIX + "done": str(done)}
        partial = KVStats(layers=stats.layers, metadata=meta, reservoir=stats.reservoir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file(self.path, partial.to_bytes(), force=True)
        self.saved_at = (done, time.monotonic())


@dataclass(frozen=True)
class ResumeCheck:
    """What the partial statistics of this run must hold to be continued: the run's samples (one process's
    share, in order), the model's KV-cache shape, the histogram kind, whether queries are recorded, and the
    fresh reservoir (None when the recipe samples no rows)."""

    samples: list[list[int]]
    shape: KVShape
    histograms: str | None
    queries: bool
    reservoir: Reservoir | None


def resume_from(out_dir: Path, print_: dict[str, str], check: ResumeCheck) -> tuple[KVStats, int]:
    """The saved statistics and the number of samples they cover; refused unless the run is the same and the
    partial is self-consistent (its sample counter, token counts and tensors agree, as kvq writes them)."""
    path = Path(out_dir) / PARTIAL_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist: there is nothing to resume in {out_dir}",
                         hint="run without --resume, or pass the --out of the interrupted run")
    raw, meta = read_safetensors(path, "partial statistics")
    where = f"--resume: partial statistics {path}"
    lacking = [_PREFIX + key for key in print_ if _PREFIX + key not in meta]
    if lacking:
        raise UsageError(f"{where} lack the metadata {', '.join(lacking)}", hint=_HINT)
    differ = [key for key, value in print_.items() if meta.get(_PREFIX + key) != value]
    if differ:
        key = differ[0]
        raise UsageError(f"--resume: the interrupted run in {out_dir} had another {', '.join(differ)} "
                         f"({meta.get(_PREFIX + key, 'none')!r}, now {print_[key]!r})",
                         hint="resume with the same model, data, samples, seqlen, batch size and recipe, "
                         "or run without --resume")
    done = _done(meta.get(_PREFIX + "done"), len(check.samples), where)
    if "layer_tokens" not in meta:
        raise UsageError(f"{where} lack the metadata layer_tokens", hint=_HINT)
    for name, tensor in raw.items():
        if not name.endswith(".hist") and tensor.dtype != torch.float32:
            raise UsageError(f"{where}: {name} is {str(tensor.dtype).removeprefix('torch.')}; kvq saves float32",
                             hint=_HINT)
    stats = KVStats.load(path)
    stats.metadata = {k: v for k, v in stats.metadata.items() if not k.startswith(_PREFIX)}
    _check_consistent(stats, raw, done, check, where)
    return stats, done


def _done(raw: str | None, samples: int, where: str) -> int:
    """The partial's sample counter: a whole number in 1..samples."""
    if raw is None:
        raise UsageError(f"{where} lack the metadata {_PREFIX}done (the samples done)", hint=_HINT)
    if not re.fullmatch(r"[0-9]{1,18}", raw) or not 1 <= int(raw) <= samples:
        raise UsageError(f"{where}: metadata {_PREFIX}done={raw[:40]!r} is not a sample count in 1..{samples} "
                         "(the run's samples)", hint=_HINT)
    return int(raw)


def _check_consistent(stats: KVStats, raw: dict[str, torch.Tensor], done: int, check: ResumeCheck,
                      where: str) -> None:
    """Every layer of the model, of its (kv_heads, head_dim) shape, having seen the tokens of the first ``done``
    samples; the histograms, query ranges and reservoir this run records, no others."""
    shape = check.shape
    if sorted(stats.layers) != list(shape.kv_layers):
        raise UsageError(f"{where} hold {stats.num_layers} layers; the model has {len(shape.kv_layers)} with a KV "
                         "cache", hint=_HINT)
    tokens = sum(len(sample) for sample in check.samples[:done])
    for i, layer in sorted(stats.layers.items()):
        for which, ts in (("k", layer.k), ("v", layer.v)):
            want = shape.of(i).of(which)
            if tuple(ts.min.shape) != want:
                raise UsageError(f"{where}: layers.{i}.{which}.min is {tuple(ts.min.shape)}; the model's (kv_heads, "
                                 f"head_dim) there is {want}", hint=_HINT)
        if layer.tokens != tokens:
            raise UsageError(f"{where}: metadata layer_tokens gives layer {i} {layer.tokens} tokens, but the first "
                             f"{done} samples ({_PREFIX}done) hold {tokens}", hint=_HINT)
        for which, ts in (("k", layer.k), ("v", layer.v), ("q", layer.q)):
            absmax = raw.get(f"layers.{i}.{which}.absmax")
            if ts is not None and absmax is not None and not torch.equal(absmax, ts.absmax):
                raise UsageError(f"{where}: layers.{i}.{which}.absmax is not the larger of -min and max", hint=_HINT)
        if (layer.q is not None) != check.queries:
            raise UsageError(f"{where}: layer {i} " + ("lacks the query ranges this run records" if check.queries
                             else "holds query ranges this run does not record"), hint=_HINT)
        if layer.q is not None and layer.q.min.shape[1] != shape.of(i).k[1]:
            raise UsageError(f"{where}: layers.{i}.q.min is {tuple(layer.q.min.shape)}; the model's head_dim is "
                             f"{shape.of(i).k[1]}", hint=_HINT)
    if stats.histograms != check.histograms:
        raise UsageError(f"{where} hold {stats.histograms or 'no'} histograms; this run records "
                         f"{check.histograms or 'none'}", hint=_HINT)
    _check_reservoir(stats.reservoir, check, done, where)


def _check_reservoir(found: Reservoir | None, check: ResumeCheck, done: int, where: str) -> None:
    """The partial's reservoir: there iff the run samples rows, drawn as this run draws, over the first ``done``
    samples."""
    fresh = check.reservoir
    if (found is None) != (fresh is None):
        raise UsageError(f"{where} " + ("hold no reservoir of Q/K/V rows, which this run samples" if found is None
                         else "hold a reservoir of Q/K/V rows, which this run does not sample"), hint=_HINT)
    if found is None or fresh is None:
        return
    for name in ("chunks", "tokens", "seed"):
        if getattr(found, name) != getattr(fresh, name):
            raise UsageError(f"{where}: metadata reservoir {name}={getattr(found, name)}, this run's is "
                             f"{getattr(fresh, name)}", hint=_HINT)
    seen = sum(len(sample) >= fresh.tokens for sample in check.samples[:done])
    if found.seen != seen:
        raise UsageError(f"{where}: metadata reservoir seen={found.seen}, but the first {done} samples "
                         f"({_PREFIX}done) offer {seen}", hint=_HINT)
    def fits(i: int, which: str, rows: torch.Tensor) -> bool:
        heads, dim = check.shape.of(i).of(which)
        return tuple(rows.shape[1:]) == (heads, fresh.tokens, dim)

    if not all(fits(i, which, t) for which in ("k", "v") for i, t in found.rows[which].items()):
        raise UsageError(f"{where}: the reservoir's K/V rows are not of the model's (kv_heads, tokens, head_dim)",
                         hint=_HINT)
