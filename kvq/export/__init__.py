"""Export calibrated scales into what each serving engine reads.

    export_artifact("kvq-out/", "vllm", out="model-fp8kv/")            # checkpoint folder
    export_artifact("kvq-out/", "sglang-json", out="scales.json", tp=2)

Every export checks the artifact against the model (layers, KV heads, head_dim, model_type and the
config hash recorded at calibration; :mod:`kvq.export.model_check`), refuses what the format cannot
express (with the reason and the flag or recipe that would work), reduces finer granularities only
with ``reduce="max"`` (:mod:`kvq.export.tensor_parallel`), and writes with kvq's atomic writer and
--out policy (:mod:`kvq.io.atomic`). docs/engines.md describes each format and the engine source it follows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kvq.artifacts.scales import KVScales, scales_path
from kvq.engines.matrix import EXPORT_KIND, FP8_WEIGHTS, loader_warnings
from kvq.errors import UsageError
from kvq.export import lmdeploy, modelopt, sglang, trtllm, vllm
from kvq.export.mla_export import check_mla_export
from kvq.export.model_check import (
    check_against_model,
    check_tensors,
    model_shape_and_files,
    shape_from_metadata,
)
from kvq.export.request import Exporter, ExportPlan, ExportRequest, ExportResult, FilePlan
from kvq.io.atomic import write_file, write_folder
from kvq.io.out_policy import check_folder_out, check_reads

EXPORTERS: dict[str, Exporter] = {
    exporter.name: exporter
    for exporter in (vllm.EXPORTER, modelopt.EXPORTER, sglang.EXPORTER, trtllm.EXPORTER, lmdeploy.EXPORTER)
}
EXPORT_FORMATS: tuple[str, ...] = tuple(EXPORTERS)
REDUCTIONS = ("max",)


def _transformed_weights(scales: KVScales, artifact_path: Path, model: str | None) -> dict | None:
    """The weights the scales' transforms rewrote, for the checkpoint formats to write (None: no transforms).

    The scales were calibrated on K/V of the transformed model: exporting them without the transformed
    weights would apply them to the wrong K/V (so the scale-only formats refuse such scales).
    """
    if not scales.recipe.transforms:
        return None
    from kvq.model.loading import load_model
    from kvq.transforms.record import fold_recorded

    loaded = load_model(model, device="cpu")  # the weights in their own dtype: the fold casts back to it
    return fold_recorded(loaded.model, scales.recipe.transforms, scales.metadata, artifact_path)


def export_artifact(
    artifact: str | Path,
    export_format: str,
    out: str | Path,
    model: str | None = None,
    tp: int = 1,
    reduce: str | None = None,
    force: bool = False,
    trtllm_checkpoint: str | Path | None = None,
    legacy: bool = False,
) -> ExportResult:
    """Write ``artifact`` (scales.safetensors or its folder) in engine format ``export_format`` at ``out``.

    ``model`` is the model the scales are for: required by the formats that write a checkpoint
    folder (``None`` there means the default model, as in calibrate); optional for the others,
    which then take the KV-cache shape from the artifact's metadata. A format that no current engine
    release applies is refused unless ``legacy`` (the refusal names the releases that apply it). The
    result carries ``warnings`` (engine releases and backends that do not apply the scales) and
    ``serve`` (commands that serve the output with the scales applied).
    """
    if export_format not in EXPORTERS:
        raise UsageError(f"unknown export format {export_format!r}", hint=f"use one of {', '.join(EXPORTERS)}")
    if reduce is not None and reduce not in REDUCTIONS:
        raise UsageError(f"unknown reduction {reduce!r}", hint=f"use one of {', '.join(REDUCTIONS)}")
    if tp < 1:
        raise UsageError(f"--tp {tp} must be at least 1")
    exporter = EXPORTERS[export_format]
    if trtllm_checkpoint is not None and export_format != "trtllm":
        raise UsageError("--trtllm-checkpoint applies to --format trtllm only")
    artifact_path = scales_path(artifact)
    scales = KVScales.load(artifact_path)
    notes: list[str] = []
    files = None
    if model is not None or exporter.needs_model_files:
        shape, files = model_shape_and_files(model, exporter.needs_model_files, export_format)
        notes += check_against_model(scales, shape)
    else:
        shape = shape_from_metadata(scales)
        notes.append("no --model given: the KV-cache shape is the one the artifact records")
    check_tensors(scales, shape)
    notes += check_mla_export(scales, export_format)  # what the engine applies to an MLA latent cache
    out_path = Path(out)
    ckpt = Path(trtllm_checkpoint) if trtllm_checkpoint is not None else None
    if ckpt is not None and not ckpt.is_dir():
        raise UsageError(f"--trtllm-checkpoint {ckpt} is not a folder")
    model_path = Path(model) if model is not None and Path(model).exists() else None  # never replaced, any format
    sources = [p for p in (files.folder if files is not None else model_path, ckpt) if p is not None]
    inputs = [artifact_path]
    check_reads(out_path, inputs, sources)  # before the plan is built; write_* apply the whole policy
    if scales.recipe.transforms and not exporter.needs_model_files:
        raise UsageError(
            f"--format {export_format} holds scales only, but these were calibrated on a model with transforms "
            "folded into its weights: the engine would serve the original weights with them",
            hint="export a checkpoint format (--format vllm), which writes the transformed weights too",
        )
    from kvq.artifacts.layer_plan import plan_skip_layers

    request = ExportRequest(scales=scales, shape=shape, files=files, tp=tp, reduce=reduce, trtllm_checkpoint=ckpt,
                            legacy=legacy, skip_layers=plan_skip_layers(artifact_path))
    if scales.recipe.transforms:
        # Folding the transforms loads the whole model: the plan without them (cheap) is checked against
        # the --out policy first, so a refused --out fails before that work.
        dry = exporter.build(request)
        if isinstance(dry, ExportPlan):
            check_folder_out(out_path, set(dry.files) | set(dry.links), force=force, inputs=inputs, sources=sources)
        request = replace(request, transformed_weights=lambda: _transformed_weights(scales, artifact_path, model))
    plan = exporter.build(request)
    linked = copied = 0
    if isinstance(plan, FilePlan):
        write_file(out_path, plan.content, force=force, inputs=inputs)
        written = [out_path.name]
    else:
        result = write_folder(out_path, plan.files, links=plan.links, force=force, inputs=inputs, sources=sources)
        written, linked, copied = sorted(plan.files), result.linked, result.copied
    def named(texts: list[str]) -> list[str]:
        return [text.replace("{out}", str(out_path)) for text in texts]  # plans name the output as {out}

    notes += named(plan.notes)
    if copied:
        notes.append(f"{copied} model file(s) copied: the filesystem could not hard-link them")
    # engine model files that do not load KV scales for this model type (kvq/engines/engine_matrix.yaml)
    model_warnings = loader_warnings(EXPORT_KIND[export_format], shape.model_type,
                                     weights=FP8_WEIGHTS if export_format == "modelopt" else None)
    return ExportResult(out=out_path, export_format=export_format, written=written, linked=linked, copied=copied,
                        notes=notes, warnings=named(plan.warnings) + model_warnings, serve=named(plan.serve))


__all__ = ["EXPORTERS", "EXPORT_FORMATS", "REDUCTIONS", "ExportResult", "export_artifact"]
