"""``kvq.inspect``: the KV-cache scales of any checkpoint, engine scales file or kvq artifact, and their defects."""

from __future__ import annotations

from pathlib import Path

from kvq.inspection.inspect_path import Inspection, inspect_path


def inspect(path: str | Path, *, tp: int | None = None, model: str | Path | None = None,
            stats: str | Path | None = None) -> Inspection:
    """Read the KV-cache scales of ``path`` without loading model weights (what ``kvq inspect`` does).

    Args:
        path: a compressed-tensors / ModelOpt / TensorRT-LLM checkpoint, an SGLang or old-vLLM scales JSON,
            LMDeploy TurboMind files, or a kvq artifact.
        tp: a tensor-parallel size whose split of the KV heads is checked.
        model: a model path or id whose config (only) gives the KV-cache shape to check against.
        stats: a ``stats.safetensors`` of the same model: how far observed ranges reach beyond each scale.

    Returns:
        :class:`kvq.inspection.inspect_path.Inspection`: the ``found`` scheme and scale tensors, the model
        ``shape``, every ``defects`` entry (layer and tensor named), ``clipping`` with ``stats``, the
        ``engines`` that apply, ignore or refuse the scales, and ``clean``.
        ``kvq.inspection.inspect_json.inspection_json(result)`` is the JSON the CLI writes.
    """
    return inspect_path(path, tp=tp, model=None if model is None else str(model), stats=stats)
