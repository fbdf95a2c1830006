"""``--format sglang-json``: the KV-cache scales JSON of SGLang's ``--quantization-param-path``.

The same file old vLLM releases read with ``--quantization-param-path``. Schema and validation (SGLang
``python/sglang/srt/model_loader/weight_utils.py``: ``QuantParamSchema``, ``KVCacheQuantSchema``,
``kv_cache_scales_loader``)::

    {"model_type": "llama",
     "kv_cache": {"dtype": "float8_e4m3fn",
                  "scaling_factor": {"0": {"0": 0.0123, "1": ...}, "1": {...}}}}

* ``dtype`` must be ``float8_e4m3fn``;
* ``scaling_factor`` has exactly ``tp_size`` ranks, each with exactly ``num_hidden_layers`` layers,
  every rank 0..tp-1 and layer 0..L-1 present;
* ``model_type`` must equal the serving model's ``config.model_type``.

One value per (rank, layer) is set as both ``k_scale`` and ``v_scale`` of the layer's attention
(``load_kv_cache_scales`` in e.g. ``models/llama.py``), and the cache stores ``k / k_scale``
(``mem_cache/memory_pool.py`` ``set_kv_buffer``). So the value is max(K scale, V scale) over the KV
heads the rank holds: a larger scale never clips, and for symmetric fp8 scales the maximum is the
scale of the merged range, exactly.

No current release applies this file (read in SGLang 0.4.5-0.5.23 and vLLM 0.6.3-0.33.0, docs/engines.md):
SGLang's loader assigns the value to ``attn.k_scale`` as a Python float and never sets the
``k_scale_float`` the read side uses, so from 0.5.2 FlashInfer writes ``k / s`` and reads it back with
1.0 (silently wrong), and fa3 (>= 0.4.6), triton (>= 0.5.10) and trtllm_mha crash; vLLM removed
``--quantization-param-path`` in 0.7.0. The export is therefore refused unless ``--legacy`` asks for
the file for SGLang <= 0.5.1 with the flashinfer backend; ``--format vllm`` is the path that works.
"""

from __future__ import annotations

from kvq.artifacts.files import json_bytes
from kvq.errors import UsageError
from kvq.export.model_check import refuse_format
from kvq.export.request import Exporter, ExportRequest, FilePlan, require_legacy
from kvq.export.tensor_parallel import float_list, rank_values

EXPORT_FORMAT = "sglang-json"


LEGACY_RELEASES = "SGLang <= 0.5.1 with flashinfer (unverified on a GPU)"


def build(req: ExportRequest) -> FilePlan:
    scales, shape, tp = req.scales, req.shape, req.tp
    refuse_format(
        scales, EXPORT_FORMAT, ("fp8_e4m3",),
        why="the file's kv_cache.dtype must be float8_e4m3fn (SGLang's KVCacheQuantSchema.check_is_fp8)",
        hint="solve an fp8_e4m3 recipe (e.g. --recipe fp8-e4m3-per-tensor)",
    )
    require_legacy(
        req, EXPORT_FORMAT,
        why="SGLang 0.5.2-0.5.23 mis-applies it (flashinfer: wrong output) or crashes (fa3, triton, trtllm_mha) "
        "and vLLM >= 0.7.0 does not read it",
        applied_by=LEGACY_RELEASES,
        hint="export --format vllm with a per-tensor fp8 recipe (vLLM and SGLang >= 0.5.19 apply it)",
    )
    if not shape.model_type:
        raise UsageError(
            "--format sglang-json records the model_type, which SGLang checks against the served model, "
            "but the artifact records none",
            hint="pass --model with the model the scales were calibrated on",
        )
    ranks = rank_values(req, EXPORT_FORMAT, allow_replication=True)
    per_rank: dict[str, dict[str, float]] = {str(r): {} for r in range(tp)}
    for i, (k, v) in enumerate(ranks.layers):
        for r, value in enumerate(float_list(k.scale.maximum(v.scale))):  # (tp,)
            per_rank[str(r)][str(i)] = value
    data = {
        "model_type": shape.model_type,
        "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": per_rank},
    }
    plan = FilePlan(content=json_bytes(data), notes=list(ranks.notes))
    plan.notes.append("K and V share one scale per layer and rank in this format: max(K scale, V scale)")
    plan.warnings.append(f"--legacy: only {LEGACY_RELEASES} applies this file; later SGLang releases mis-apply it "
                         "or crash, and vLLM >= 0.7.0 does not read it")
    plan.serve.append(
        "python -m sglang.launch_server --model-path MODEL --kv-cache-dtype fp8_e4m3 --attention-backend flashinfer "
        f"--quantization-param-path {{out}} --tp {tp}   (SGLang <= 0.5.1)"
    )
    return plan


EXPORTER = Exporter(name=EXPORT_FORMAT, build=build, needs_model_files=False)
