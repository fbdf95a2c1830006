"""``--format trtllm``: KV-cache scaling factors in TensorRT-LLM's checkpoint format (for trtllm-build).

A TensorRT-LLM checkpoint (docs/source/architecture/checkpoint.md) is a folder with ``config.json``
and one ``rank{r}.safetensors`` per rank, each holding every tensor that rank's engine needs. With KV
cache quantization each attention layer has ``transformer.layers.{i}.attention.kv_cache_scaling_factor``
(float32, shape (1,)) and the config says ``quantization.kv_cache_quant_algo`` (``FP8`` or ``INT8``).

Semantics (``tensorrt_llm/layers/attention.py``): the attention plugin gets
``kv_orig_quant_scale = 1 / kv_cache_scaling_factor`` and ``kv_quant_orig_scale =
kv_cache_scaling_factor``: the factor is the dequantization multiplier, amax / 448 for FP8 and
amax / 127 for INT8 (``tensorrt_llm/models/llama/convert.py`` ``generate_int8``:
``scale_y_quant_orig = act_range["y"].max() / 127``). One factor serves K and V, so kvq writes
max(K scale, V scale) over the heads each rank holds. That is kvq's symmetric fp8 e4m3 scale and
its symmetric int8 scale (absmax / 127) unchanged; INT8 asymmetric and int4 have no TensorRT-LLM form.

Layout kvq writes at ``--out``:

* with ``--trtllm-checkpoint DIR`` (a checkpoint from TensorRT-LLM's ``convert_checkpoint.py``, without
  KV quantization): a complete checkpoint: DIR's config.json with ``quantization.kv_cache_quant_algo``
  set, and DIR's rank files with the scaling factors added (the rank files are rewritten, so the
  weights are copied);
* without it: the scales alone, in the same layout: ``rank{r}.safetensors`` holding only the scaling
  factors and a ``config.json`` holding only ``quantization`` and ``mapping``, to merge into a
  checkpoint (see docs/engines.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kvq.artifacts.files import json_bytes, safetensors_bytes
from kvq.errors import UsageError
from kvq.export.model_check import ModelShape, refuse_format
from kvq.export.request import Exporter, ExportPlan, ExportRequest
from kvq.export.tensor_parallel import rank_values
from kvq.io.parse import parse_json

EXPORT_FORMAT = "trtllm"
ALGO = {"fp8_e4m3": "FP8", "int8": "INT8"}
SCALE_NAME = "transformer.layers.{i}.attention.kv_cache_scaling_factor"


def _checkpoint_config(ckpt: Path, shape: ModelShape, tp: int) -> dict:
    path = ckpt / "config.json"
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--trtllm-checkpoint {ckpt}: cannot read config.json: {exc}") from exc
    config = parse_json(text, f"--trtllm-checkpoint {ckpt}: config.json")
    if not isinstance(config, dict) or "architecture" not in config:
        raise UsageError(f"--trtllm-checkpoint {ckpt}: config.json has no 'architecture'; "
                         "is it a TensorRT-LLM checkpoint (from convert_checkpoint.py)?")
    heads = config.get("num_attention_heads")
    layers = config.get("num_hidden_layers")
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_size") or (config["hidden_size"] // heads if heads and config.get("hidden_size") else None)
    mapping = config.get("mapping") or {}
    found = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_size}
    want = {"num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim}
    bad = [f"{k} {want[k]} ({shape.source}) vs {found[k]} (--trtllm-checkpoint)" for k in want if found[k] != want[k]]
    if bad:
        raise UsageError(f"--trtllm-checkpoint {ckpt} is for a different model: " + "; ".join(bad))
    ckpt_tp = int(mapping.get("tp_size", 1))
    if ckpt_tp != tp:
        raise UsageError(f"--trtllm-checkpoint {ckpt} has tp_size {ckpt_tp}, but --tp is {tp}",
                         hint=f"pass --tp {ckpt_tp}")
    if int(mapping.get("pp_size", 1)) != 1:
        raise UsageError(f"--trtllm-checkpoint {ckpt} uses pipeline parallelism (pp_size "
                         f"{mapping.get('pp_size')}); kvq merges into tp-only checkpoints",
                         hint="convert the checkpoint with --pp_size 1")
    quantization = config.get("quantization") or {}
    if quantization.get("kv_cache_quant_algo") is not None:
        raise UsageError(f"--trtllm-checkpoint {ckpt} already sets kv_cache_quant_algo "
                         f"{quantization['kv_cache_quant_algo']!r}",
                         hint="convert the checkpoint without KV-cache quantization")
    return config


def _rank_tensors(ckpt: Path, rank: int) -> dict[str, torch.Tensor]:
    path = ckpt / f"rank{rank}.safetensors"
    if not path.is_file():
        raise UsageError(f"--trtllm-checkpoint {ckpt} has no rank{rank}.safetensors")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc
    existing = sorted(name for name in tensors if name.endswith("kv_cache_scaling_factor"))
    if existing:
        raise UsageError(f"{path} already holds {existing[0]}",
                         hint="convert the checkpoint without KV-cache quantization")
    return tensors


def build(req: ExportRequest) -> ExportPlan:
    scales, shape, tp = req.scales, req.shape, req.tp
    refuse_format(
        scales, EXPORT_FORMAT, tuple(ALGO),
        why="TensorRT-LLM's kv_cache_quant_algo is FP8 (e4m3) or INT8 (symmetric, one factor amax / 127)",
        hint="solve an fp8_e4m3 or int8 symmetric recipe",
    )
    number = scales.recipe.key.format
    for which in ("k", "v"):
        spec = scales.recipe.spec(which)
        if not spec.symmetric:
            raise UsageError(
                f"--format trtllm holds one symmetric factor per layer (INT8: amax / 127, no zero point), "
                f"but the artifact's {which.upper()} parameters are asymmetric",
                hint="solve an int8 symmetric recipe (e.g. --recipe int8-sym-per-head with --reduce max)",
            )
    ckpt = req.trtllm_checkpoint
    config = _checkpoint_config(ckpt, shape, tp) if ckpt is not None else None  # before the values: its errors first
    ranks = rank_values(req, EXPORT_FORMAT, allow_replication=True)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for i, (k, v) in enumerate(ranks.layers):
        factor = k.scale.maximum(v.scale)  # (tp,)
        for r in range(tp):
            per_rank[r][SCALE_NAME.format(i=i)] = factor[r].reshape(1).to(torch.float32).contiguous()  # () -> (1,)
    plan = ExportPlan(notes=list(ranks.notes))
    if ckpt is not None and config is not None:  # both or neither
        config["quantization"] = {**(config.get("quantization") or {}), "kv_cache_quant_algo": ALGO[number]}
        plan.files["config.json"] = json_bytes(config)
        for r in range(tp):
            tensors = _rank_tensors(ckpt, r)
            tensors.update(per_rank[r])
            plan.files[f"rank{r}.safetensors"] = safetensors_bytes(tensors, {})
        for path in sorted(ckpt.iterdir()):
            if path.is_file() and path.name not in plan.files and not path.name.startswith("."):
                plan.links[path.name] = path
        plan.notes.append(f"merged into the TensorRT-LLM checkpoint {ckpt}")
    else:
        plan.files["config.json"] = json_bytes({
            "quantization": {"kv_cache_quant_algo": ALGO[number]},
            "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        })
        for r in range(tp):
            plan.files[f"rank{r}.safetensors"] = safetensors_bytes(per_rank[r], {})
        plan.notes.append(
            "scales only: merge into a TensorRT-LLM checkpoint (or pass --trtllm-checkpoint) before trtllm-build"
        )
    plan.notes.append("K and V share one kv_cache_scaling_factor per layer: max(K scale, V scale)")
    plan.warnings.append(
        "only TensorRT-LLM's trtllm-build (TensorRT) path applies these factors, and it exists up to 1.3.0rc20 "
        "(1.2.x stable); later releases have only the PyTorch backend, which serves the FP8 KV cache at scale 1.0 "
        "and reads no kvq format (_torch/attention/backends/trtllm.py)"
    )
    target = "{out}" if ckpt is not None else "CHECKPOINT (after merging these files into it)"
    plan.serve.append(f"trtllm-build --checkpoint_dir {target} --output_dir ENGINE_DIR, then serve ENGINE_DIR with "
                      "TensorRT-LLM's TensorRT runtime (<= 1.3.0rc20; e.g. trtllm-serve ENGINE_DIR --backend tensorrt "
                      "--tokenizer MODEL)")
    return plan


EXPORTER = Exporter(name=EXPORT_FORMAT, build=build, needs_model_files=False)
