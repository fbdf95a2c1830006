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

from kvq.export.common import (
    Exporter,
    ExportPlan,
    ExportRequest,
    check_tp,
    group_values,
    heads_of_rank,
    reduction_note,
    refuse_format,
)

FMT = "lmdeploy"
FILE_NAME = "layers.{i}.past_kv_scale.{rank}.weight"


def lmdeploy_zero_point(scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """LMDeploy's float centre ``zp = -z * scale`` for kvq's integer zero point z (0 when symmetric)."""
    if zero_point is None:
        return torch.zeros_like(scale, dtype=torch.float32)
    centre = -(zero_point.to(torch.float64)) * scale.to(torch.float64) + 0.0  # + 0.0: no -0.0 for z = 0
    return centre.to(torch.float32)


def build(req: ExportRequest) -> ExportPlan:
    scales, shape, tp = req.scales, req.shape, req.tp
    refuse_format(
        scales, FMT, ("int8",),
        why="TurboMind's offline KV parameters are int8 only (quant_policy 4); fp8 and int4 KV caches "
        "in LMDeploy are quantized online and read no parameter files",
        hint="solve an int8 recipe (e.g. --recipe int8-asym-per-head)",
    )
    check_tp(shape.num_kv_heads, tp, FMT, allow_replication=False)
    groups = [heads_of_rank(shape.num_kv_heads, tp, r) for r in range(tp)]
    target = "per TP rank" if tp > 1 else "per tensor"
    plan = ExportPlan()
    reduced: set[str] = set()
    for i in range(shape.num_layers):
        k = group_values(scales, i, "k", groups, req.reduce, FMT, target)
        v = group_values(scales, i, "v", groups, req.reduce, FMT, target)
        reduced |= {w for w, g in (("k", k), ("v", v)) if g.reduced}
        k_zp = lmdeploy_zero_point(k.scale, k.zero_point)
        v_zp = lmdeploy_zero_point(v.scale, v.zero_point)
        for r in range(tp):
            params = torch.stack([k.scale[r], k_zp[r], v.scale[r], v_zp[r]]).to(torch.float32)  # (4,)
            plan.files[FILE_NAME.format(i=i, rank=r)] = params.numpy().astype("<f4").tobytes()
    plan.notes = [reduction_note(w.upper(), scales.recipe.spec(w), target.removeprefix("per "))
                  for w in sorted(reduced)]
    plan.notes.append(
        "LMDeploy 0.0.4-0.3.0 (TurboMind): copy these files into workspace/triton_models/weights/ of a "
        "`lmdeploy convert` output and set quant_policy 4; LMDeploy >= 0.4.0 quantizes the KV cache online "
        "and ignores them"
    )
    return plan


EXPORTER = Exporter(build=build, needs_model_files=False, uses_tp=True, output="folder")
