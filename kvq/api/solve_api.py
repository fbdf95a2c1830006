"""``kvq.solve`` and ``kvq.export_scales``: scales from saved statistics, and scales in an engine's format.

Neither runs a model (an export with transforms loads the model's weights to write them transformed).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kvq.api.arguments import check_positive, recipe_arg
from kvq.api.model_arg import eval_mode
from kvq.artifacts.files import write_artifact
from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats, stats_path
from kvq.data import load_documents, select_samples
from kvq.errors import UsageError
from kvq.export import ExportResult, export_artifact
from kvq.model.loading import load_spec
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import KVRecipe
from kvq.solving.from_stats import solve_artifact
from kvq.solving.loss import DEFAULT_LOSS_WINDOWS, solve_by_loss, uses_loss
from kvq.solving.solver import solve_scales
from kvq.transforms.record import fold_recorded


def solve(stats: KVStats | str | Path, recipe: KVRecipe | str | Path, *, out: str | Path | None = None,
          force: bool = False, model: str | Path | None = None, loss_windows: int = DEFAULT_LOSS_WINDOWS) -> KVScales:
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
        model: observer ``loss`` only (a checkpoint folder, ``.gguf`` or hub id): the model the statistics are of,
            run on the statistics' first ``loss_windows`` calibration samples (re-read from the data files their
            metadata names); ``scales.loss_search`` then holds the choices and their cost. Without it a recipe
            with observer ``loss`` is refused.

    Returns:
        :class:`kvq.artifacts.scales.KVScales`: per layer float32 ``k_scale`` / ``v_scale`` of shape () per tensor,
        (num_kv_heads,) per head or (num_kv_heads, head_dim) per channel, in K/V units per quantized step
        (``q = round(x / scale) + zero_point`` clamped to the format, ``x ~ (q - zero_point) * scale``), int32
        zero-points for asymmetric integer formats (None otherwise), and the recipe and statistics' metadata.
    """
    recipe_, recipe_files = recipe_arg(recipe)
    check_positive(loss_windows=loss_windows)
    if uses_loss(recipe_) and model is None:
        raise UsageError(f"recipe {recipe_.name} uses observer loss, which runs the model on calibration windows, "
                         "and no model is given", hint="pass --model (model=) the statistics were calibrated on")
    source = None if isinstance(stats, KVStats) else stats_path(stats)
    solver = _loss_solver(recipe_, model, loss_windows, source) if uses_loss(recipe_) else None
    if source is not None:
        if out is not None:
            return solve_artifact(source, recipe_, out, force=force, inputs=recipe_files, solver=solver)[1]
        loaded = KVStats.load(source)
        return solver(loaded) if solver is not None else solve_scales(loaded, recipe_)
    scales = solver(stats) if solver is not None else solve_scales(stats, recipe_)
    if out is not None:
        if stats.metadata.get("transforms"):
            raise UsageError("these statistics were calibrated with transforms, whose record lies beside their "
                             "stats.safetensors", hint="pass the statistics' path, so that the record travels")
        write_artifact(Path(out), scales.to_files(), force=force, inputs=recipe_files)
    return scales


def _loss_solver(recipe: KVRecipe, model: str | Path, windows: int, source: Path | None):
    """Statistics -> scales by the loss observer: loads the model and re-reads the first calibration samples
    the statistics' metadata names (same data files, seed and seqlen: the same samples)."""

    def run(stats: KVStats) -> KVScales:
        meta = stats.metadata
        loaded = load_spec(ModelSpec(str(model)))
        if meta.get("config_hash") and meta["config_hash"] != loaded.info.config_hash:
            raise UsageError(f"--model {model} is not the model the statistics are of ({meta.get('model')})",
                             hint="pass the model the statistics were calibrated on")
        if recipe.transforms:
            if source is None:
                raise UsageError("observer loss on statistics with transforms needs their path (the record beside)",
                                 hint="pass the statistics' path")
            fold_recorded(loaded.model, recipe.transforms, meta, source)
        files = [f["path"] for f in json.loads(meta.get("data_files", "[]"))]
        documents = load_documents(meta.get("dataset", "pydoc"), files or None, purpose="calibration").documents
        picked = select_samples(documents, loaded.tokenizer, min(windows, int(meta.get("samples", windows))),
                                int(meta.get("seqlen", 2048)), int(meta.get("seed", 0)))
        with eval_mode(loaded):
            return solve_by_loss(stats, recipe, loaded.model, picked.token_ids)

    return run


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
