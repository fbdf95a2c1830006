"""Export calibrated scales into what each serving engine reads.

    export_scales("kvq-out/", "vllm", out="model-fp8kv/")            # checkpoint folder
    export_scales("kvq-out/", "sglang-json", out="scales.json", tp=2)

Every export checks the artifact against the model (layers, KV heads, head_dim, model_type and the
config hash recorded at calibration), refuses what the format cannot express (with the reason and
the flag or recipe that would work), reduces finer granularities only with ``reduce="max"``, and
writes atomically. docs/engines.md describes each format and the engine source it follows.
"""

from __future__ import annotations

from pathlib import Path

from kvq.errors import UsageError
from kvq.export import lmdeploy, modelopt, sglang, trtllm, vllm
from kvq.export.common import (
    FORMATS,
    Exporter,
    ExportRequest,
    ExportResult,
    check_against_model,
    check_out,
    check_tensors,
    model_shape_and_files,
    shape_from_metadata,
    write_plan,
)
from kvq.scales import KVScales

EXPORTERS: dict[str, Exporter] = {
    "vllm": vllm.EXPORTER,
    "modelopt": modelopt.EXPORTER,
    "sglang-json": sglang.EXPORTER,
    "trtllm": trtllm.EXPORTER,
    "lmdeploy": lmdeploy.EXPORTER,
}
assert tuple(EXPORTERS) == FORMATS
REDUCTIONS = ("max",)


def export_scales(
    artifact: str | Path,
    fmt: str,
    out: str | Path,
    model: str | None = None,
    tp: int = 1,
    reduce: str | None = None,
    force: bool = False,
    trtllm_checkpoint: str | Path | None = None,
) -> ExportResult:
    """Write ``artifact`` (scales.safetensors or its folder) in engine format ``fmt`` at ``out``.

    ``model`` is the model the scales are for: required by the formats that write a checkpoint
    folder (``None`` there means the default model, as in calibrate); optional for the others,
    which then take the KV-cache shape from the artifact's metadata.
    """
    if fmt not in EXPORTERS:
        raise UsageError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(EXPORTERS)}")
    if reduce is not None and reduce not in REDUCTIONS:
        raise UsageError(f"unknown reduction {reduce!r}", hint=f"use one of {', '.join(REDUCTIONS)}")
    if tp < 1:
        raise UsageError(f"--tp {tp} must be at least 1")
    exporter = EXPORTERS[fmt]
    if trtllm_checkpoint is not None and fmt != "trtllm":
        raise UsageError("--trtllm-checkpoint applies to --format trtllm only")
    artifact_path = Path(artifact)
    scales = KVScales.load(artifact_path)
    notes: list[str] = []
    files = None
    if model is not None or exporter.needs_model_files:
        shape, files = model_shape_and_files(model, exporter.needs_model_files, fmt)
        notes += check_against_model(scales, shape)
    else:
        shape = shape_from_metadata(scales)
        notes.append("no --model given: the KV-cache shape is the one the artifact records")
    check_tensors(scales, shape)
    out_path = Path(out)
    ckpt = Path(trtllm_checkpoint) if trtllm_checkpoint is not None else None
    if ckpt is not None and not ckpt.is_dir():
        raise UsageError(f"--trtllm-checkpoint {ckpt} is not a folder")
    sources = [p for p in (files.folder if files is not None else None, ckpt) if p is not None]
    check_out(out_path, force, sources=sources, inputs=[artifact_path])
    request = ExportRequest(scales=scales, shape=shape, files=files, tp=tp, reduce=reduce, trtllm_checkpoint=ckpt)
    plan = exporter.build(request)
    linked, copied = write_plan(plan, out_path, exporter.output, force)
    written = sorted(plan.files) if exporter.output == "folder" else [out_path.name]
    notes += [note.replace("{out}", str(out_path)) for note in plan.notes]  # notes name the output as {out}
    if copied:
        notes.append(f"{copied} model file(s) copied: the filesystem could not hard-link them")
    return ExportResult(out=out_path, format=fmt, written=written, linked=linked, copied=copied, notes=notes)


__all__ = ["EXPORTERS", "FORMATS", "REDUCTIONS", "ExportResult", "export_scales"]
