"""``--format lmdeploy``: TurboMind's offline INT8 KV-cache parameter files (LMDeploy 0.0.4 to 0.3.0).

TurboMind reads ``layers.{i}.past_kv_scale.{rank}.weight`` from the converted model's weights folder
(``workspace/triton_models/weights``): raw little-endian float32 ``[k_scale, k_zp, v_scale, v_zp]``,
exactly 16 bytes (``LlamaDecoderLayerWeight::loadModel``: ``loadArrayFromBin({4}, ...)``, which
rejects a file of any other size), one file per layer and tensor-parallel rank, the rank holding a
contiguous block of num_kv_heads / tp heads (``lmdeploy/lite/apis/kv_qparams.py`` chunks the heads).

LMDeploy's convention, from TurboMind's kernels (v0.0.4-v0.2.x ``quant()`` / ``dequant()`` in
decoder_masked_multihead_attention_template.cuh; v0.3.0 ``ConvertKvCache`` in
kernels/attention/array_ops.h, which stores ``s + 128`` as uint8 and reads it back the same way)::

    s = round(clamp((x - zp) / scale, -128, 127))      x_hat = s * scale + zp

with signed ``s`` in [-128, 127] and ``zp`` a float centre. kvq's convention is
``x_hat = (q - z) * scale`` with signed q in [-128, 127] and an integer z. The two grids coincide
when ``s = q`` and ``zp = -z * scale``: kvq writes that (computed in float64, rounded once to
float32). A symmetric spec is the case z = 0. Rounding differs only at exact ties (kvq rounds half
to even; TurboMind rounds half away from zero before v0.3.0).

Only int8: TurboMind's offline parameters were int8 (``--quant-policy 4``); int4 KV arrived in
v0.4.0 together with online quantization, which reads no parameter files.

No current release applies these files: since LMDeploy 0.4.0 (commit e5aaca541, #1377) TurboMind
quantizes int4 / int8 online per token and head and reads no file (``quant_policy`` renumbered: 8 is
int8, 4 is int4), ``lmdeploy convert`` is gone since 0.10.0, and the PyTorch engine's FP8 cache uses
fixed scales of 1.0. The export is refused unless ``--legacy`` asks for LMDeploy 0.0.4-0.3.0.
"""

from __future__ import annotations

import torch

from kvq.export.model_check import refuse_format
from kvq.export.request import Exporter, ExportPlan, ExportRequest, require_legacy
from kvq.export.tensor_parallel import rank_values

EXPORT_FORMAT = "lmdeploy"
FILE_NAME = "layers.{i}.past_kv_scale.{rank}.weight"


def lmdeploy_zero_point(scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """LMDeploy's float centre ``zp = -z * scale`` for kvq's integer zero point z (0 when symmetric)."""
    if zero_point is None:
        return torch.zeros_like(scale, dtype=torch.float32)
    centre = -(zero_point.to(torch.float64)) * scale.to(torch.float64) + 0.0  # + 0.0: no -0.0 for z = 0
    return centre.to(torch.float32)


LEGACY_RELEASES = "LMDeploy 0.0.4-0.3.0 (TurboMind, through a `lmdeploy convert` workspace)"


def build(req: ExportRequest) -> ExportPlan:
    refuse_format(
        req.scales, EXPORT_FORMAT, ("int8",),
        why="TurboMind's offline KV parameters are int8 only (quant_policy 4); LMDeploy's int4 KV cache is "
        "quantized online, TurboMind has no fp8 KV cache and the PyTorch engine's fp8 cache uses scales of 1.0",
        hint="solve an int8 recipe (e.g. --recipe int8-asym-per-head)",
    )
    require_legacy(
        req, EXPORT_FORMAT,
        why="LMDeploy >= 0.4.0 quantizes the KV cache online and ignores these files (no error)",
        applied_by=LEGACY_RELEASES,
        hint="on current LMDeploy serve the original model with --quant-policy 8 (online int8, no calibration)",
    )
    ranks = rank_values(req, EXPORT_FORMAT, allow_replication=False)
    plan = ExportPlan(notes=list(ranks.notes))
    for i, (k, v) in enumerate(ranks.layers):
        k_zp = lmdeploy_zero_point(k.scale, k.zero_point)
        v_zp = lmdeploy_zero_point(v.scale, v.zero_point)
        for r in range(req.tp):
            params = torch.stack([k.scale[r], k_zp[r], v.scale[r], v_zp[r]]).to(torch.float32)  # (4,)
            plan.files[FILE_NAME.format(i=i, rank=r)] = params.numpy().astype("<f4").tobytes()
    plan.warnings.append(f"--legacy: only {LEGACY_RELEASES} applies these files; LMDeploy >= 0.4.0 ignores them")
    plan.serve.append(
        "lmdeploy convert MODEL_NAME MODEL; cp {out}/* workspace/triton_models/weights/; set quant_policy = 4 in "
        "workspace/triton_models/weights/config.ini; lmdeploy serve api_server ./workspace   (LMDeploy 0.0.4-0.3.0)"
    )
    return plan


EXPORTER = Exporter(name=EXPORT_FORMAT, build=build, needs_model_files=False)
