"""``--format modelopt``: a checkpoint folder with ModelOpt-style FP8 KV-cache scales.

What NVIDIA ModelOpt's Hugging Face export writes, and what TensorRT-LLM's PyTorch backend and vLLM
read (citations in docs/engines.md):

* tensors ``<attention module>.k_proj.k_scale`` / ``.v_proj.v_scale``, one float32 scalar each
  (``modelopt/torch/export/quant_utils.py`` ``postprocess_state_dict``: ``k_bmm_quantizer._amax`` ->
  ``k_proj.k_scale`` = amax / 448);
* ``hf_quant_config.json``: ``{"producer": ..., "quantization": {"quant_algo": ..., "kv_cache_quant_algo":
  "FP8"}}`` (read by ``tensorrt_llm/_torch/model_config.py`` ``load_modelopt_quant_config``).

The export is a complete checkpoint folder like ``--format vllm`` (model files linked, the scales in
a new shard, the weight index updated) plus ``hf_quant_config.json``. config.json is left as it is
unless the model already is a ModelOpt checkpoint whose config.json holds a ``quant_method: modelopt``
``quantization_config``; that one gains ModelOpt's ``kv_cache_scheme`` entry. An existing
``hf_quant_config.json`` keeps every key and gains ``kv_cache_quant_algo``.

ModelOpt exports FP8 KV scales per tensor only, and its HF export has no INT8 KV scales, so this
format holds fp8 e4m3 per tensor (``--reduce max`` merges finer scales).
"""

from __future__ import annotations

import json

import torch

from kvq import __version__
from kvq.artifact import json_bytes
from kvq.errors import UsageError
from kvq.export.checkpoint import attention_modules, checkpoint_plan, read_weights, refuse_existing_scales
from kvq.export.common import (
    Exporter,
    ExportPlan,
    ExportRequest,
    group_values,
    reduction_note,
    refuse_format,
)

FMT = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
# The kv_cache_scheme ModelOpt writes into config.json for kv_cache_quant_algo FP8
# (modelopt/torch/export/convert_hf_config.py, convert_hf_quant_config_format).
MODELOPT_FP8_KV_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}


def _hf_quant_config(req: ExportRequest) -> dict:
    assert req.files is not None
    path = req.files.folder / HF_QUANT_CONFIG
    if not path.is_file():
        return {
            "producer": {"name": "kvq", "version": __version__},
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"},
        }
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
        quantization = dict(existing["quantization"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a ModelOpt quantization config: {exc}") from None
    if quantization.get("kv_cache_quant_algo") is not None:
        raise UsageError(
            f"{path} already sets kv_cache_quant_algo {quantization['kv_cache_quant_algo']!r}",
            hint="export from the checkpoint without KV-cache quantization",
        )
    quantization["kv_cache_quant_algo"] = "FP8"
    merged = dict(existing)
    merged["quantization"] = quantization
    return merged


def _config_json(req: ExportRequest) -> bytes | None:
    """config.json rewritten when it holds a ModelOpt quantization_config; None to link it as is."""
    assert req.files is not None
    qc = req.files.config.get("quantization_config")
    if qc is None:
        return None
    method = str(qc.get("quant_method", ""))
    if not method.startswith("modelopt"):
        raise UsageError(
            f"model {req.files.folder} is quantized with quant_method {method!r}; --format modelopt adds "
            "ModelOpt KV scales and cannot merge them into another method's config",
            hint="for a compressed-tensors checkpoint use --format vllm",
        )
    if qc.get("kv_cache_scheme") is not None:
        raise UsageError(f"model {req.files.folder} already declares a kv_cache_scheme in config.json",
                         hint="export from the checkpoint without KV-cache quantization")
    config = dict(req.files.config)
    config["quantization_config"] = {**qc, "kv_cache_scheme": dict(MODELOPT_FP8_KV_SCHEME)}
    return json_bytes(config)


def build(req: ExportRequest) -> ExportPlan:
    scales, shape = req.scales, req.shape
    refuse_format(
        scales, FMT, ("fp8_e4m3",),
        why="ModelOpt's Hugging Face export holds FP8 (e4m3) KV-cache scales only",
        hint="solve an fp8_e4m3 recipe, or use --format trtllm for INT8",
    )
    assert req.files is not None
    index = read_weights(req.files)
    refuse_existing_scales(index, req.files.folder)
    modules = attention_modules(index, shape.num_layers, FMT)
    groups = [list(range(shape.num_kv_heads))]
    tensors: dict[str, torch.Tensor] = {}
    reduced: set[str] = set()
    for i in range(shape.num_layers):
        for which in ("k", "v"):
            g = group_values(scales, i, which, groups, req.reduce, FMT, "per tensor")
            if g.reduced:
                reduced.add(which)
            # (1,) -> () : ModelOpt stores a scalar per projection
            tensors[f"{modules[i]}.{which}_proj.{which}_scale"] = g.scale.reshape(()).to(torch.float32).contiguous()
    rewritten = {HF_QUANT_CONFIG: json_bytes(_hf_quant_config(req))}
    config = _config_json(req)
    if config is not None:
        rewritten["config.json"] = config
    plan = checkpoint_plan(req.files, index, tensors, rewritten)
    notes = [reduction_note(w.upper(), scales.recipe.spec(w), "tensor") for w in sorted(reduced)]
    if req.tp != 1:
        notes.append(f"--tp {req.tp} ignored: the engine loads the same per-tensor scales on every rank")
    notes.append(
        "kvq writes the calibrated scales as they are; ModelOpt's own export raises FP8 KV scales below 1.0 "
        "to 1.0, kvq does not"
    )
    notes.append(
        "TensorRT-LLM (PyTorch backend): TRTLLM_LOAD_KV_SCALES=1 trtllm-serve {out} "
        "(docs/engines.md says which releases apply the scales)"
    )
    plan.notes = notes + plan.notes
    return plan


EXPORTER = Exporter(build=build, needs_model_files=True, uses_tp=False, output="folder")
