"""Pure quantization math: format ranges, choosing scales and zero-points, quantize and dequantize.

No model, file or CLI code here. The conventions (docs/artifacts.md repeats them):

* A value ``x`` is stored as ``q`` and read back as ``x_hat = (q - zero_point) * scale``.
* fp8 (symmetric only): ``q = cast_fp8(clamp(x / scale, -fmax, fmax))`` with ``fmax`` 448 (e4m3),
  57344 (e5m2) or 224 (e4m3fnuz, AMD MI300's fp8: exponent bias 8, one NaN, no negative zero; its largest
  value is 240, but vLLM clamps at 224 on ROCm, and kvq simulates the engine) and ``scale = absmax / fmax``: the calibrated absmax lands exactly on the largest
  finite fp8 value. The cast rounds to nearest-even; the clamp saturates as the engines do.
* int symmetric: ``scale = absmax / qmax`` (127 for int8, 7 for int4),
  ``q = clamp(round(x / scale), qmin, qmax)`` with qmin -128 / -8 (qmin itself is never reached
  by a calibrated value).
* int asymmetric: the range is widened to include 0 (``lo = min(min, 0)``, ``hi = max(max, 0)``) so
  that 0 is exact; ``scale = (hi - lo) / (qmax - qmin)``,
  ``zero_point = clamp(round(qmin - lo / scale), qmin, qmax)`` (an integer), and
  ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.
* ``round`` is round-half-to-even (``torch.round``); division is a true division by the scale.
* nvfp4 (symmetric, one global scale per tensor): ``scale = absmax / 448`` (the engines' convention); ``quantize`` returns the
  e2m1 value times its block's e4m3 scale, computed per block of 16 along head_dim (:mod:`kvq.quant.nvfp4`), and
  ``dequantize`` multiplies by the global scale.
* A scale is never 0, NaN or inf: a range of zero width (a head that is always 0) gets
  ``SCALE_FLOOR`` (float32 machine epsilon, 2**-23), and non-finite statistics are refused.
"""

from __future__ import annotations

import torch

from kvq.quant import nvfp4
from kvq.quant.formats import number_format
from kvq.recipe.schema import QuantSpec

SCALE_FLOOR: float = torch.finfo(torch.float32).eps


def qrange(fmt: str) -> tuple[float, float]:
    """The smallest and largest value ``q`` can take in format ``fmt`` (nvfp4: the e2m1 value times its block scale)."""
    record = number_format(fmt)
    return record.qmin, record.qmax


def choose_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32) and zero-point (int32, or None when symmetric) for observed ranges.

    ``min_val`` / ``max_val`` are already reduced to the recipe's granularity (any shape, same shape);
    the outputs have that shape.
    """
    min_val = min_val.to(torch.float32)
    max_val = max_val.to(torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min and max shapes differ: {tuple(min_val.shape)} vs {tuple(max_val.shape)}")
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("statistics hold NaN or inf; no finite scale can be chosen")
    if spec.symmetric:
        absmax = torch.maximum(-min_val, max_val).clamp_min(0.0)
        top = qrange(spec.format)[1]
        scale = torch.clamp_min(absmax / top, SCALE_FLOOR)
        return scale, None
    qmin, qmax = qrange(spec.format)
    lo = torch.clamp_max(min_val, 0.0)
    hi = torch.clamp_min(max_val, 0.0)
    scale = torch.clamp_min((hi - lo) / float(qmax - qmin), SCALE_FLOOR)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    """``x`` to its stored form: an fp8 tensor, or an int8 tensor holding int8 / int4 codes.

    ``scale`` and ``zero_point`` must broadcast against ``x``. Computed in float32.
    """
    if fmt == "nvfp4":
        return nvfp4.quantize_blocks(x, scale)
    record = number_format(fmt)
    y = x.to(torch.float32) / scale
    if record.is_fp8:
        return y.clamp(record.qmin, record.qmax).to(record.dtype)
    qmin, qmax = record.qmin, record.qmax
    y = torch.round(y)
    if zero_point is not None:
        y = y + zero_point.to(torch.float32)
    return y.clamp(qmin, qmax).to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str
) -> torch.Tensor:
    """Stored form back to float32: ``(q - zero_point) * scale``."""
    y = q.to(torch.float32)
    if zero_point is not None and not number_format(fmt).is_fp8:
        y = y - zero_point.to(torch.float32)
    return y * scale
