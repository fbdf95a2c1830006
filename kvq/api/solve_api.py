"""``kvq.solve`` and ``kvq.export_scales``: scales from saved statistics, and scales in an engine's format.

Neither runs a model (an export with transforms loads the model's weights to write them transformed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvq.api.arguments import check_positive, recipe_arg
from kvq.artifacts.files import write_artifact
from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats, stats_path
from kvq.errors import UsageError
from kvq.export import ExportResult, export_artifact
from kvq.recipe.schema import KVRecipe
from kvq.solving.from_stats import solve_artifact
from kvq.solving.solver import solve_scales


def solve(stats: KVStats | str | Path, recipe: KVRecipe | str | Path, *, out: str | Path | None = None,
          force: bool = False) -> KVScales:
    """The scales of ``recipe`` for saved statistics, without running the model (what ``kvq solve`` does).

    Args:
        stats: a :class:`kvq.artifacts.stats.KVStats` (e.g. ``kvq.calibrate(...).stats``), or a ``stats.safetensors``
            file or the calibration folder holding it.
        recipe: a :class:`kvq.recipe.schema.KVRecipe`, a built-in recipe name or a recipe YAML path. Clipping
            observers (percentile, mse) need statistics calibrated with histograms; a recipe's transforms
            must be those the statistics were calibrated with.
        out: also write ``scales.safetensors`` and ``scales.json`` into this folder (``--out`` policy;
            ``force`` replaces a folder holding other files); a transforms record beside the statistics
            travels with them, so statistics with transforms must then be given as a path. None writes nothing.

    Returns:
        :class:`kvq.artifacts.scales.KVScales`: per layer float32 ``k_scale`` / ``v_scale`` of shape () per tensor,
        (num_kv_heads,) per head or (num_kv_heads, head_dim) per channel, in K/V units per quantized step
        (``q = round(x / scale) + zero_point`` clamped to the format, ``x ~ (q - zero_point) * scale``), int32
        zero-points for asymmetric integer formats (None otherwise), and the recipe and statistics' metadata.
    """
    recipe_, recipe_files = recipe_arg(recipe)
    if not isinstance(stats, KVStats):
        if out is not None:
            return solve_artifact(stats, recipe_, out, force=force, inputs=recipe_files)[1]
        return solve_scales(KVStats.load(stats_path(stats)), recipe_)
    scales = solve_scales(stats, recipe_)
    if out is not None:
        if stats.metadata.get("transforms"):
            raise UsageError("these statistics were calibrated with transforms, whose record lies beside their "
                             "stats.safetensors", hint="pass the statistics' path, so that the record travels")
        write_artifact(Path(out), scales.to_files(), force=force, inputs=recipe_files)
    return scales


def export_scales(scales: KVScales | str | Path, format: str, out: str | Path, *, model: str | Path | None = None,
                  tp: int = 1, reduce: str | None = None, force: bool = False, legacy: bool = False,
                  trtllm_checkpoint: str | Path | None = None) -> ExportResult:
    """Write scales in the form a serving engine loads (what ``kvq export-scales`` does); docs/engines.md.

    Args:
        scales: a ``scales.safetensors`` file or the artifact folder holding it, or a :class:`kvq.artifacts.scales.KVScales`
            without transforms (e.g. ``kvq.solve(...)``).
        format: ``vllm`` / ``modelopt`` (a checkpoint folder: the model's files hard-linked plus the scales),
            ``sglang-json`` (one JSON file), ``trtllm`` (TensorRT-LLM checkpoint ranks), ``lmdeploy``
            (TurboMind parameter files).
        out: the output folder (the output file for ``sglang-json``); ``force`` replaces a non-empty one.
        model: the model the scales are for (checkpoint folder, ``.gguf`` or hub id; a path, not a model
            object: the checkpoint formats link its files). vllm / modelopt need it (None: the default
            SmolLM2); the others check against it when given, else use the shape the artifact records.
        tp: the engine's tensor-parallel size (sglang-json, trtllm, lmdeploy). ``reduce="max"`` merges finer
            scales into what the format holds (exact for symmetric scales); ``legacy`` writes a format only
            older engine releases apply; ``trtllm_checkpoint`` a TensorRT-LLM checkpoint to merge into.

    Returns:
        :class:`kvq.export.ExportResult`: ``out``, the files ``written``, how many model files were ``linked``
        or ``copied``, ``notes``, ``warnings`` (releases or backends that ignore the scales) and ``serve``
        (commands that serve the output with the scales applied).
    """
    check_positive(tp=tp)
    common = dict(out=out, model=None if model is None else str(model), tp=tp, reduce=reduce, force=force,
                  trtllm_checkpoint=None if trtllm_checkpoint is None else str(trtllm_checkpoint), legacy=legacy)
    if not isinstance(scales, KVScales):
        return export_artifact(str(scales), format, **common)
    if scales.recipe.transforms:
        raise UsageError("these scales were calibrated with transforms, whose record an export needs",
                         hint="export the artifact folder (its path) that holds transforms.safetensors")
    with tempfile.TemporaryDirectory(prefix="kvq-export-") as folder:
        artifact = Path(folder) / "scales"
        write_artifact(artifact, scales.to_files())
        return export_artifact(str(artifact), format, **common)
