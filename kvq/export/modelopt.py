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

Who applies it (docs/engines.md): vLLM and SGLang apply these scales when they are merged into a
ModelOpt FP8-weight checkpoint (``hf_quant_config.json`` with ``quant_algo: FP8``); a KV-only export
of an unquantized model (``quant_algo: null``) is not recognised as ModelOpt by vLLM 0.33 or SGLang
0.5.23, and TensorRT-LLM's PyTorch backend serves every FP8 KV cache at scale 1.0. So the export is
refused for a model that is not a ModelOpt checkpoint: ``--format vllm`` is the path that works there.
"""

from __future__ import annotations

import torch

from kvq.artifacts.files import json_bytes
from kvq.errors import UsageError
from kvq.export.checkpoint_folder import checkpoint_plan, checkpoint_scales
from kvq.export.model_check import ModelFiles, refuse_format
from kvq.export.request import Exporter, ExportPlan, ExportRequest
from kvq.io.parse import parse_json

EXPORT_FORMAT = "modelopt"
HF_QUANT_CONFIG = "hf_quant_config.json"
# The kv_cache_scheme ModelOpt writes into config.json for kv_cache_quant_algo FP8
# (modelopt/torch/export/convert_hf_config.py, convert_hf_quant_config_format).
MODELOPT_FP8_KV_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}


# kvq's number format -> ModelOpt's kv_cache_quant_algo (hf_quant_config.json) and config.json kv_cache_scheme
# (ModelOpt writes the string "NVFP4" there for NVFP4 KV caches: modelopt/torch/export/convert_hf_config.py)
KV_ALGO = {"fp8_e4m3": "FP8", "fp8_e4m3fnuz": "FP8", "nvfp4": "NVFP4"}
KV_SCHEME = {"FP8": MODELOPT_FP8_KV_SCHEME, "NVFP4": "NVFP4"}


def _hf_quant_config(files: ModelFiles, algo: str) -> dict:
    path = files.folder / HF_QUANT_CONFIG
    if not path.is_file():
        raise UsageError(
            f"--format modelopt: model {files.folder} is not a ModelOpt checkpoint (no {HF_QUANT_CONFIG}); a "
            "KV-only ModelOpt export is applied by no current engine: vLLM 0.33 and SGLang 0.5.23 do not recognise "
            "quant_algo null, and TensorRT-LLM's PyTorch backend serves the FP8 KV cache at scale 1.0",
            hint="use --format vllm (vLLM, SGLang >= 0.5.19) or --format trtllm (trtllm-build <= 1.3.0rc20), or "
            "--format modelopt with a ModelOpt FP8 checkpoint",
        )
    try:
        existing = parse_json(path.read_bytes(), str(path))
        quantization = dict(existing["quantization"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a ModelOpt quantization config: {exc}") from exc
    if not quantization.get("quant_algo"):
        raise UsageError(
            f"--format modelopt: {path} declares no quant_algo (a KV-only ModelOpt config), which vLLM 0.33 and "
            "SGLang 0.5.23 do not recognise as ModelOpt, so no current engine applies the KV scales",
            hint="use --format vllm (vLLM, SGLang >= 0.5.19) or --format trtllm (trtllm-build <= 1.3.0rc20), or "
            "export from a ModelOpt FP8-weight checkpoint",
        )
    if quantization.get("kv_cache_quant_algo") is not None:
        raise UsageError(
            f"{path} already sets kv_cache_quant_algo {quantization['kv_cache_quant_algo']!r}",
            hint="export from the checkpoint without KV-cache quantization",
        )
    quantization["kv_cache_quant_algo"] = algo
    merged = dict(existing)
    merged["quantization"] = quantization
    return merged


def _config_json(files: ModelFiles, algo: str) -> bytes | None:
    """config.json rewritten when it holds a ModelOpt quantization_config; None to link it as is."""
    qc = files.config.get("quantization_config")
    if qc is None:
        return None
    method = str(qc.get("quant_method", ""))
    if not method.startswith("modelopt"):
        raise UsageError(
            f"model {files.folder} is quantized with quant_method {method!r}; --format modelopt adds "
            "ModelOpt KV scales and cannot merge them into another method's config",
            hint="for a compressed-tensors checkpoint use --format vllm",
        )
    if qc.get("kv_cache_scheme") is not None:
        raise UsageError(f"model {files.folder} already declares a kv_cache_scheme in config.json",
                         hint="export from the checkpoint without KV-cache quantization")
    config = dict(files.config)
    scheme = KV_SCHEME[algo]
    config["quantization_config"] = {**qc, "kv_cache_scheme": dict(scheme) if isinstance(scheme, dict) else scheme}
    return json_bytes(config)


def build(req: ExportRequest) -> ExportPlan:
    refuse_format(
        req.scales, EXPORT_FORMAT, tuple(KV_ALGO),
        why="ModelOpt's Hugging Face export holds FP8 (e4m3) and NVFP4 KV-cache scales only",
        hint="solve an fp8_e4m3 or nvfp4 recipe, or use --format trtllm for INT8",
    )
    number = req.scales.recipe.key.format
    algo = KV_ALGO[number]
    # fp8_e4m3fnuz: the engines' ModelOpt path doubles the e4m3fn-convention scale on ROCm (vLLM 0.33.0
    # kv_cache.py, SGLang 0.5.23), so kvq writes absmax / 448, half its absmax / 224
    factor = 0.5 if number == "fp8_e4m3fnuz" else 1.0

    def place(module: str, which: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        # (1,) -> (): a scalar per projection; nvfp4: the global scale absmax / 448, as ModelOpt >= 0.42 writes it
        return f"{module}.{which}_proj.{which}_scale", value.reshape(()) * factor

    kv = checkpoint_scales(req, EXPORT_FORMAT, lambda heads: [list(range(heads))], "per tensor", place)
    quant_config = _hf_quant_config(kv.files, algo)
    rewritten = {HF_QUANT_CONFIG: json_bytes(quant_config)}
    config = _config_json(kv.files, algo)
    if config is not None:
        rewritten["config.json"] = config
    plan = checkpoint_plan(kv.files, kv.index, kv.tensors, rewritten, modified=req.transformed_weights())
    notes = list(kv.notes)
    if req.tp != 1:
        notes.append(f"--tp {req.tp} ignored: the engine loads the same per-tensor scales on every rank")
    notes.append(
        "kvq writes the calibrated scales as they are (amax / 448, as ModelOpt >= 0.43 does; ModelOpt <= 0.42 "
        "raised FP8 KV scales below 1.0 to 1.0)"
    )
    plan.notes = notes + plan.notes
    if algo == "NVFP4":
        plan.warnings += [
            "NVFP4 KV: vLLM >= 0.21 applies the global scale on its FlashInfer backend only (the one non-MLA backend "
            "that takes nvfp4), inside a ModelOpt checkpoint with a real quant_algo (vLLM 0.33.0 flashinfer.py)",
            "SGLang 0.5.23 multiplies NVFP4 KV scales by 6 on SM100 (ModelOpt <= 0.41's absmax / 2688 convention): "
            "with these absmax / 448 scales its block scales come out 6x smaller (precision lost, no overflow)",
            "TensorRT-LLM: whether its PyTorch backend loads NVFP4 KV scales of unquantized projections was not "
            "verified (TRTLLM_LOAD_KV_SCALES)",
        ]
    else:
        plan.warnings.append(
            "TensorRT-LLM's PyTorch backend serves the FP8 KV cache at scale 1.0 and ignores these scales "
            "(TRTLLM_LOAD_KV_SCALES concerns NVFP4 only); SGLang ignores them on Qwen2 models"
        )
    if factor != 1.0:
        notes.append("fp8_e4m3fnuz: k_scale / v_scale written as absmax / 448 (half of kvq's absmax / 224): vLLM's "
                     "and SGLang's ModelOpt path double them on ROCm")
    weights = quant_config["quantization"]["quant_algo"]
    if weights != "FP8":
        plan.warnings.append(
            f"the model's ModelOpt quant_algo is {weights!r}: that vLLM and SGLang apply KV scales merged into "
            "it was read for FP8-weight checkpoints only, not verified for this one"
        )
    if algo == "NVFP4":
        plan.serve += ["vllm serve {out} --kv-cache-dtype nvfp4 --attention-backend FLASHINFER",
                       "python -m sglang.launch_server --model-path {out} --kv-cache-dtype nvfp4"]
    else:
        plan.serve += [
            "vllm serve {out} --kv-cache-dtype fp8",
            "python -m sglang.launch_server --model-path {out} --kv-cache-dtype fp8_e4m3",
        ]
    return plan


EXPORTER = Exporter(name=EXPORT_FORMAT, build=build, needs_model_files=True)
