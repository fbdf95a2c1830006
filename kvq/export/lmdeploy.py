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
"""

from __future__ import annotations

import torch

from kvq.export.model_check import refuse_format
from kvq.export.plan import Exporter, ExportPlan, ExportRequest
from kvq.export.tensor_parallel import rank_values

EXPORT_FORMAT = "lmdeploy"
FILE_NAME = "layers.{i}.past_kv_scale.{rank}.weight"


def lmdeploy_zero_point(scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """LMDeploy's float centre ``zp = -z * scale`` for kvq's integer zero point z (0 when symmetric)."""
    if zero_point is None:
        return torch.zeros_like(scale, dtype=torch.float32)
    centre = -(zero_point.to(torch.float64)) * scale.to(torch.float64) + 0.0  # + 0.0: no -0.0 for z = 0
    return centre.to(torch.float32)


def build(req: ExportRequest) -> ExportPlan:
    refuse_format(
        req.scales, EXPORT_FORMAT, ("int8",),
        why="TurboMind's offline KV parameters are int8 only (quant_policy 4); fp8 and int4 KV caches "
        "in LMDeploy are quantized online and read no parameter files",
        hint="solve an int8 recipe (e.g. --recipe int8-asym-per-head)",
    )
    ranks = rank_values(req, EXPORT_FORMAT, allow_replication=False)
    plan = ExportPlan(notes=list(ranks.notes))
    for i, (k, v) in enumerate(ranks.layers):
        k_zp = lmdeploy_zero_point(k.scale, k.zero_point)
        v_zp = lmdeploy_zero_point(v.scale, v.zero_point)
        for r in range(req.tp):
            params = torch.stack([k.scale[r], k_zp[r], v.scale[r], v_zp[r]]).to(torch.float32)  # (4,)
            plan.files[FILE_NAME.format(i=i, rank=r)] = params.numpy().astype("<f4").tobytes()
    plan.notes.append(
        "LMDeploy 0.0.4-0.3.0 (TurboMind): copy these files into workspace/triton_models/weights/ of a "
        "`lmdeploy convert` output and set quant_policy 4; LMDeploy >= 0.4.0 quantizes the KV cache online "
        "and ignores them"
    )
    return plan


EXPORTER = Exporter(name=EXPORT_FORMAT, build=build, needs_model_files=False)
