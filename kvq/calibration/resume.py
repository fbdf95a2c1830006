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
import time
from pathlib import Path

from kvq.artifacts.files import PARTIAL_FILE, read_safetensors
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.io.atomic import write_file

SAVE_SECONDS = 60.0  # the default cadence: about every minute of work
_PREFIX = "partial."


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


def resume_from(out_dir: Path, print_: dict[str, str]) -> tuple[KVStats, int]:
    """The saved statistics and the number of samples they cover; refused unless the run is the same."""
    path = Path(out_dir) / PARTIAL_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist: there is nothing to resume in {out_dir}",
                         hint="run without --resume, or pass the --out of the interrupted run")
    _, meta = read_safetensors(path, "partial statistics")
    differ = [key for key, value in print_.items() if meta.get(_PREFIX + key) != value]
    if differ:
        key = differ[0]
        raise UsageError(f"--resume: the interrupted run in {out_dir} had another {', '.join(differ)} "
                         f"({meta.get(_PREFIX + key, 'none')!r}, now {print_[key]!r})",
                         hint="resume with the same model, data, samples, seqlen, batch size and recipe, "
                         "or run without --resume")
    done = int(meta[_PREFIX + "done"])
    stats = KVStats.load(path)
    stats.metadata = {k: v for k, v in stats.metadata.items() if not k.startswith(_PREFIX)}
    return stats, done
