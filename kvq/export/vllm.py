"""``--format vllm``: a compressed-tensors checkpoint folder with FP8 KV-cache scales.

What vLLM reads (checked in vLLM 0.33.0's source; see docs/engines.md for the citations):

* ``config.json`` ``quantization_config`` with ``quant_method: compressed-tensors`` and a
  ``kv_cache_scheme`` (``type: float``, ``num_bits: 8``, ``symmetric: true``, ``strategy`` ``tensor`` or
  ``attn_head``), validated by ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme``.
* tensors ``<attention module>.k_scale`` / ``.v_scale`` (``model.layers.{i}.self_attn.k_scale``), which
  ``QuantizationConfig.get_cache_scale_mapper`` renames to ``self_attn.attn.k_scale``: shape (1,) per
  tensor, (num_kv_heads, 1, 1) per head (``attn_head``; vLLM uses it on the FlashAttention backend).
  The same name serves a fused-QKV model (Phi-3's ``self_attn.qkv_proj``): the rename is by name, and
  vLLM's Phi3ForCausalLM is a LlamaForCausalLM whose attention keeps its ``Attention`` at ``self_attn.attn``
  (vllm/model_executor/models/phi3.py, llama.py).
* only the layers with a KV cache: a hybrid model's linear-attention / Mamba layers (Qwen3-Next,
  Qwen3.5, Granite 4.0-H) get no scale, as they have no ``self_attn.attn`` in vLLM. Gemma 4's KV-sharing layers
  (the last ``num_kv_shared_layers``) write no cache but read an earlier layer's, and vLLM 0.34.0 dequantizes it
  with the reading layer's own ``attn._k_scale`` (gemma4.py:495-540 ``kv_sharing_target_layer_name``;
  attention.py:816-820 runs ``impl.forward`` with the calling layer; flash_attn.py:1328 ``layer._k_scale``;
  kv_cache.py:118-122 1.0 when none is loaded): they get the scales of the layer whose cache they read
  (``kvq.export.checkpoint_folder.checkpoint_scales``, so ``--format modelopt`` names them too).
* the scale is the dequantization multiplier: the cache holds ``k / k_scale`` cast to fp8 e4m3
  (``triton_reshape_and_cache_flash``), so ``k_scale = amax / 448``: kvq's fp8 scale, passed through.

The kv_cache_scheme is built with compressed-tensors' own pydantic models (``QuantizationArgs``,
``QuantizationConfig``); an existing compressed-tensors ``quantization_config`` (an FP8-weight
checkpoint, say) keeps every key and gains only ``kv_cache_scheme``.
"""

from __future__ import annotations

import json

import torch

from kvq.artifacts.files import json_bytes
from kvq.artifacts.layer_plan import VLLM_SKIP_SINCE, vllm_skip_flags
from kvq.errors import UsageError
from kvq.export.checkpoint_folder import checkpoint_plan, checkpoint_scales
from kvq.export.mla_export import mla_serving
from kvq.export.model_check import refuse_format
from kvq.export.request import Exporter, ExportPlan, ExportRequest
from kvq.model.kv_config import kv_sharing_targets

EXPORT_FORMAT = "vllm"
# What engines do with this checkpoint, read in their source (docs/engines.md, kvq/engines/matrix.py).
SERVE_PER_TENSOR = [
    "vllm serve {out} --kv-cache-dtype fp8   (vLLM >= 0.20; applied on FLASH_ATTN, FLASHINFER, TRITON_ATTN)",
    "python -m sglang.launch_server --model-path {out} --kv-cache-dtype fp8_e4m3   (SGLang >= 0.5.19)",
]
SERVE_PER_HEAD = [
    "vllm serve {out} --kv-cache-dtype fp8 --attention-backend FLASH_ATTN   (Hopper: vLLM >= 0.15; "
    "Blackwell SM100: vLLM >= 0.28 with head_dim <= 128)",
]
WARN_FLASHINFER = (
    "vLLM 0.15-0.19 with the FLASHINFER backend (the fp8 default on Blackwell, Ampere and Ada) writes the cache "
    "with these scales and reads it with 1.0: wrong output; use vLLM >= 0.20 or --attention-backend FLASH_ATTN "
    "(v1/attention/backends/flashinfer.py@0.15.0..0.19.1)"
)
WARN_ROCM = (
    "AMD MI300/MI325 (fp8 e4m3fnuz, largest value 240): vLLM >= 0.15 no longer doubles compressed-tensors KV "
    "scales, so K/V beyond 240 x scale (54% of the calibrated range) clip (compressed_tensors.py process_weights_after_loading@0.15.0)"
)
WARN_FNUZ = (
    "fp8_e4m3fnuz scales (absmax / 224) are for vLLM on AMD MI300/MI325, whose compressed-tensors path uses them "
    "as they are (no doubling since 0.15.0); on an NVIDIA GPU the same checkpoint uses only half of e4m3's range, "
    "and SGLang doubles every KV scale on MI300 (kv_cache.py:56-58@0.5.23), so served there it uses only half of "
    "e4m3fnuz's range: for SGLang export an fp8_e4m3 recipe"
)
WARN_QUERY = (
    "q_scale: vLLM casts the query to fp8 with it on FLASH_ATTN (FA3; per tensor, or per KV-head group: it max-reduces "
    "per-head values, as kvq's solver already did), on TRITON_ATTN (CUDA, and ROCm but gfx90a / gfx11) and on "
    "ROCM_AITER_UNIFIED_ATTN (ROCm but gfx11), per tensor; FlashInfer per tensor only on SM100 / SM90 prefill; SGLang and "
    "TensorRT-LLM read no query scale (they quantize the query at 1.0) (vLLM 0.34.0 attention.py:492-515, "
    "triton_attn.py:556-561, rocm_aiter_unified_attn.py:200, flashinfer.py:2110,2396)"
)
WARN_SGLANG_PER_TENSOR = (
    "SGLang < 0.5.19 loads no compressed-tensors KV scales, and SGLang serves Qwen2 models and the torch_native / "
    "flex_attention backends at scale 1.0 (models/qwen2.py, compressed_tensors.py@0.5.23)"
)
WARN_PER_HEAD = (
    "per-head scales (strategy attn_head) are applied only by vLLM's FLASH_ATTN backend (FA3 on Hopper from 0.15, "
    "FA4 on Blackwell SM100 from 0.28); every other vLLM backend refuses to start, vLLM <= 0.14 rejects the "
    "scheme, and SGLang ignores it (bf16 or fp8 at 1.0): for SGLang or other GPUs export a per-tensor recipe"
)




def kv_cache_scheme(strategy: str) -> dict:
    """The compressed-tensors QuantizationArgs of an fp8 e4m3 symmetric static KV cache, as JSON."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, strategy=strategy)
    return args.model_dump(mode="json")


def quantization_config(existing: dict | None, strategy: str, folder: str) -> dict:
    """``existing`` (a compressed-tensors config or None) with the KV-cache scheme added, validated."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    scheme = kv_cache_scheme(strategy)
    if existing is None:
        config = QuantizationConfig(config_groups={}, kv_cache_scheme=scheme, format="dense",
                                    quantization_status="frozen")
        return config.model_dump(mode="json")
    method = existing.get("quant_method")
    if method != "compressed-tensors":
        raise UsageError(
            f"model {folder} is already quantized with quant_method {method!r}; --format vllm adds a "
            "compressed-tensors kv_cache_scheme and cannot merge it into another method's config",
            hint="export from the unquantized model, or from a compressed-tensors checkpoint",
        )
    if existing.get("kv_cache_scheme") is not None:
        raise UsageError(
            f"model {folder} already declares a kv_cache_scheme: {json.dumps(existing['kv_cache_scheme'])}",
            hint="export from the checkpoint without KV-cache quantization",
        )
    merged = dict(existing)
    merged["kv_cache_scheme"] = scheme
    try:
        QuantizationConfig.model_validate(merged)
    except ValidationError as exc:
        raise UsageError(f"model {folder}: its quantization_config does not validate with the KV scheme "
                         f"added: {exc.errors()[0]['msg']}") from exc
    return merged


def build(req: ExportRequest) -> ExportPlan:
    scales, shape = req.scales, req.shape
    refuse_format(
        scales, EXPORT_FORMAT, ("fp8_e4m3", "fp8_e4m3fnuz"),
        why="vLLM's compressed-tensors KV cache is float8 e4m3, symmetric (num_bits 8, type float)",
        hint="solve an fp8_e4m3 recipe (e.g. --recipe fp8-e4m3-per-tensor), or use --format lmdeploy / trtllm for int8",
    )
    per_head = bool({scales.recipe.spec(w).granularity for w in ("k", "v")} - {"tensor"})

    def groups(heads: int) -> list[list[int]]:  # the layer's K or V heads: each alone, or all together
        return [[h] for h in range(heads)] if per_head else [list(range(heads))]

    def place(module: str, which: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        # per tensor: (1,); per head: (num_kv_heads,) -> (num_kv_heads, 1, 1) as compressed-tensors stores it
        return f"{module}.{which}_scale", value.reshape(-1, 1, 1) if per_head else value.reshape(1)

    kv = checkpoint_scales(req, EXPORT_FORMAT, groups, "per KV head" if per_head else "per tensor", place,
                           fused_qkv=True)
    notes = list(kv.notes)
    shared = {i: j for i, j in kv_sharing_targets(kv.files.config).items()
              if j in shape.kv_layers and i not in shape.kv_layers}  # named by checkpoint_scales
    if len(shape.kv_layers) + len(shared) < shape.num_layers:
        notes.append(f"scales for the layers with a KV cache only ({', '.join(map(str, shape.kv_layers))} of "
                     f"{shape.num_layers} layers); the others keep a recurrent state, which vLLM does not quantize")
    if scales.recipe.query is not None:
        notes.append(query_scales(req, kv, per_head))
    if req.tp != 1:
        notes.append(f"--tp {req.tp} ignored: vLLM splits the KV heads across ranks itself when loading")
    config = dict(kv.files.config)
    config["quantization_config"] = quantization_config(
        config.get("quantization_config"), "attn_head" if per_head else "tensor", str(kv.files.folder)
    )
    plan = checkpoint_plan(kv.files, kv.index, kv.tensors, {"config.json": json_bytes(config)}, modified=req.transformed_weights())
    plan.notes = notes + plan.notes
    rocm = WARN_FNUZ if scales.recipe.key.format == "fp8_e4m3fnuz" else WARN_ROCM
    plan.warnings = [WARN_PER_HEAD, rocm] if per_head else [WARN_FLASHINFER, rocm, WARN_SGLANG_PER_TENSOR]
    if scales.recipe.query is not None:
        plan.warnings.append(WARN_QUERY)
    plan.serve = list(SERVE_PER_HEAD if per_head else SERVE_PER_TENSOR)
    plan = mla_serving(plan, scales)  # an MLA latent cache: its backends, its serve line
    if req.skip_layers:
        plan.serve, more = with_skip_layers(plan.serve, req.skip_layers)
        plan.warnings += more
    return plan


def query_scales(req: ExportRequest, kv, per_head: bool) -> str:
    """Add every layer's ``self_attn.q_scale`` to ``kv.tensors`` as vLLM's compressed-tensors loader reads it:
    (1,) per tensor; (num_attention_heads, 1, 1) with the attn_head strategy. Returns the note to print."""
    recipe = req.scales.recipe
    if recipe.query.format != recipe.key.format:
        raise UsageError(f"--format {EXPORT_FORMAT}: the query is {recipe.query.format} but the KV cache "
                         f"{recipe.key.format}; vLLM's FP8 attention quantizes both to the cache's fp8 type",
                         hint="solve a recipe whose query: format is the KV format")
    if (recipe.query.granularity == "head") != per_head:
        raise UsageError(f"--format {EXPORT_FORMAT}: the query is solved per {recipe.query.granularity} but K/V per "
                         f"{'head' if per_head else 'tensor'}; vLLM's compressed-tensors scheme has one strategy "
                         "for K, V and Q (tensor, or attn_head)",
                         hint="solve the query with the granularity of the K/V scales")
    for i, layer in req.scales.layers.items():
        name = next(n for n in kv.tensors if n.endswith(f".{i}.self_attn.k_scale")).removesuffix("k_scale")
        q = layer.q_scale.to(torch.float32)  # per head: (num_heads,), equal within each KV-head group
        kv.tensors[name + "q_scale"] = (q.reshape(-1, 1, 1) if per_head else q.reshape(1)).contiguous()
    unscaled = sorted({int(n.split(".self_attn.")[0].rsplit(".", 1)[1]) for n in kv.tensors
                       if n.endswith(".k_scale")} - set(req.scales.layers))
    return (f"query scales: self_attn.q_scale per {'attention head' if per_head else 'tensor'} "
            "(vLLM's FlashAttention 3 quantizes the query whenever the KV cache is fp8)"
            + (f"; KV-sharing layers {', '.join(map(str, unscaled))} have no calibrated query (kvq captures no K/V "
               "there to pair it with): vLLM quantizes their query at q_scale 1.0" if unscaled else ""))


def with_skip_layers(serve: list[str], skip_layers: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """The serve lines with the artifact's plan applied where the engine can (vLLM's skip flag), and a
    warning for each engine that cannot (it would serve every layer quantized)."""
    layers = ", ".join(map(str, skip_layers))
    lines, warnings = [], []
    for line in serve:
        command, _, comment = line.partition("   (")
        if command.startswith("vllm "):
            lines.append(f"{command} {vllm_skip_flags(skip_layers)}   ({comment.rstrip(')')}; the skip flag: "
                         f"vLLM >= {VLLM_SKIP_SINCE}; plan.json: layers {layers} unquantized)")
        else:
            lines.append(line)
            engine = "SGLang" if "sglang" in command else command.split()[0]
            warnings.append(f"{engine}: no option keeps layers {layers} unquantized: it serves every "
                            "layer quantized, not the plan")
    return lines, warnings


EXPORTER = Exporter(name=EXPORT_FORMAT, build=build, needs_model_files=True)
