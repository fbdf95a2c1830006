"""`kvq inspect`: the KV-cache scales of any checkpoint, engine scales file or kvq artifact, and their defects.

    result = inspect_path("model-fp8kv/", tp=2)       # reads configs and scale tensors, never weights
    result.defects, result.engines, result.clean

Readers per input kind: :mod:`.kvq_artifact`, :mod:`.checkpoint` (compressed-tensors, ModelOpt),
:mod:`.engine_files` (TensorRT-LLM, SGLang JSON, LMDeploy); :mod:`.detect` picks one. Checks:
:mod:`.defects`, :mod:`.clipping` (with --stats); the report: :mod:`.report`. docs/inspect.md.
"""

from kvq.inspection.defects import Defect
from kvq.inspection.inspect_path import Inspection, inspect_path

__all__ = ["Defect", "Inspection", "inspect_path"]
