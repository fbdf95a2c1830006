"""``kvq solve``: statistics from a calibration in, the scales of another recipe out, no model run.

The scales go into ``out`` as an artifact set (:func:`kvq.artifacts.files.write_artifact`). When the
statistics were calibrated on a transformed model, the transforms record travels with the scales
(copied from beside the statistics into a new folder; kept where it is when ``out`` is that folder):
exports, ``validate`` and ``eval`` fold it into the model before applying the scales.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kvq.artifacts.files import TRANSFORMS_FILE, write_artifact
from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats, stats_path
from kvq.errors import UsageError
from kvq.recipe.schema import KVRecipe
from kvq.solving.solver import solve_scales


def solve_artifact(stats: str | Path, recipe: KVRecipe, out: str | Path, *, force: bool = False,
                   inputs: Sequence[Path] = (), solver: Callable[[KVStats], KVScales] | None = None
                   ) -> tuple[KVStats, KVScales, list[Path]]:
    """Solve ``recipe`` on the statistics at ``stats`` (file or folder) and write the scales into ``out``;
    ``inputs`` (the recipe file, say) are never replaced, even with ``force``. ``solver`` replaces
    :func:`solve_scales` (the loss observer, which runs the model)."""
    source = stats_path(stats)
    loaded = KVStats.load(source)
    scales = solver(loaded) if solver is not None else solve_scales(loaded, recipe)
    files = scales.to_files()
    out = Path(out)
    if loaded.metadata.get("transforms") and out.resolve() != source.parent.resolve():
        record = source.parent / TRANSFORMS_FILE
        if not record.is_file():
            raise UsageError(f"the statistics {source} were calibrated with transforms, but {record} is missing",
                             hint="keep transforms.safetensors beside stats.safetensors")
        files[TRANSFORMS_FILE] = record.read_bytes()
    written = write_artifact(out, files, force=force, inputs=[source, *inputs])
    return loaded, scales, written
