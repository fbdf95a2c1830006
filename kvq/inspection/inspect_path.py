"""`kvq inspect PATH`: read a path's KV-cache scales, find their defects, look up the engines.

Reads configs and the scale tensors only (never model weights); writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvq.engines.matrix import EngineRow, engine_verdicts, loader_warnings
from kvq.errors import UsageError
from kvq.inspection.clipping import Clipping, clipping
from kvq.inspection.defects import Defect, find_defects, inferred_granularity, merged_shape
from kvq.inspection.detect import read_path
from kvq.inspection.found import DeclaredShape, Found


@dataclass
class Inspection:
    found: Found
    shape: DeclaredShape  # the input's, completed from --model
    defects: list[Defect]
    granularity: str | None  # of the K/V scales as stored
    engines: list[EngineRow]
    clipping: list[Clipping] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.defects


def stored_granularity(found: Found, shape: DeclaredShape) -> str | None:
    """What the K/V scales are, as stored: the declared granularity, else the one their shape implies."""
    declared = found.scheme.granularity if found.scheme is not None else None
    if declared is not None:
        return declared
    kinds = {inferred_granularity(e, shape) for e in found.entries if e.role != "q"}
    return kinds.pop() if len(kinds) == 1 else None


def inspect_path(path: str | Path, tp: int | None = None, model: str | None = None,
                 stats: str | Path | None = None) -> Inspection:
    """Inspect ``path`` (any checkpoint, engine scales file or kvq artifact); ``model`` is read for its config only."""
    if tp is not None and tp < 1:
        raise UsageError(f"--tp {tp} must be at least 1")
    found = read_path(path)
    model_shape = None
    if model is not None:
        from kvq.export.model_check import model_shape_and_files

        model_shape, _ = model_shape_and_files(model, False, "inspect")
    shape = merged_shape(found, model_shape)
    defects = find_defects(found, tp=tp, model=model_shape)
    granularity = stored_granularity(found, shape)
    # a format the config names but kvq does not know (NVFP4, say) matches only rows for any format
    number = (found.scheme.number if found.scheme is not None else None) or "unknown"
    result = Inspection(found, shape, defects, granularity, engine_verdicts(found.kind, number, granularity,
                                                                             weights=found.weights,
                                                                             model_type=shape.model_type))
    found.notes += loader_warnings(found.kind, shape.model_type, weights=found.weights)  # per-model engine loaders
    if stats is not None:
        from kvq.artifacts.stats import KVStats

        result.clipping, clip_defects = clipping(found, KVStats.load(stats), shape)
        result.defects += clip_defects
    return result
