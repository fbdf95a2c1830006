"""Transforms folded exactly into a model's weights so that its KV cache quantizes better.

Key smoothing (:class:`SmoothKeys`) divides key channels by factors and multiplies the matching
query channels by them; value rotation (:class:`RotateValues`) rotates each KV head's values by an
orthogonal matrix and undoes it in the output projection. Attention computes the same thing; the
cache holds easier-to-quantize K/V. docs/transforms.md has the math and the architectures covered.

    layers = describe_attention(model)                 # or UsageError: cannot fold exactly
    stats = measure_qk_absmax(model, batches)          # only SmoothKeys needs it
    plan = plan_transforms(model, [SmoothKeys(0.5), RotateValues(0)], stats)
    tensors = apply_transforms(model, plan)            # state-dict name -> modified tensor
    digest = weights_hash(tensors)
"""

from kvq.transforms.describe import describe_attention
from kvq.transforms.digest import weights_hash
from kvq.transforms.factors import TransformPlan, plan_transforms
from kvq.transforms.fold import apply_transforms
from kvq.transforms.layout import HeadRows, LayerAttention, NormFold, RopeLayout
from kvq.transforms.measure import QKAbsMax, measure_qk_absmax
from kvq.transforms.spec import RotateValues, SmoothKeys, Transform

__all__ = [
    "HeadRows",
    "LayerAttention",
    "NormFold",
    "QKAbsMax",
    "RopeLayout",
    "RotateValues",
    "SmoothKeys",
    "Transform",
    "TransformPlan",
    "apply_transforms",
    "describe_attention",
    "measure_qk_absmax",
    "plan_transforms",
    "weights_hash",
]
