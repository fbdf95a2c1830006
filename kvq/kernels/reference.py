"""Torch reference (the oracle) for the quantize -> dequantize round trip of K/V tensors.

K/V tensors are shaped ``(batch, kv_heads, tokens, head_dim)``. Static scales come from a
:class:`kvq.artifacts.scales.KVScales` and have shape ``()`` (per tensor), ``(kv_heads,)`` (per head) or
``(kv_heads, head_dim)`` (per channel); zero points have the same shape (int32) or are ``None``.
The arithmetic is :func:`kvq.quant.qparams.quantize` / :func:`kvq.quant.qparams.dequantize`, so this module
adds no convention of its own for static scales (float32, true division, round-half-to-even,
saturating clamp; see :mod:`kvq.quant.qparams`).

Round-trip error, per KV head: ``err = x - x_hat`` in float32, with ``x_hat = dequantize(quantize(x))``
the float32 dequantized value (the final cast back to the model dtype is not counted):

* ``sse``: sum of ``(x - x_hat)**2``; ``signal``: sum of ``x**2`` (float64 accumulators);
* ``max_abs_err``: max ``|x - x_hat|`` (float32);
* ``clipped``: elements whose rounded value falls outside the format's range, so that the saturating
  clamp adds an error beyond rounding (int64): for ints ``round(x / scale) + zero_point`` outside
  ``[qmin, qmax]``; for fp8 ``y = x / scale`` rounds (nearest, ties to even, on the grid continued
  past the largest value) beyond ``fmax``: ``|y| > 464`` for e4m3 (464 is the tie between 448 and
  480 and goes to 448), ``|y| >= 61440`` for e5m2 (the tie between 57344 and 65536 goes to 65536).
  A value such as ``fmax * scale``, whose quotient is one ulp above ``fmax``, is therefore not counted;
  for nvfp4, ``|x / (s_b * scale)| >= 7`` (only where the block scale saturated; :mod:`kvq.quant.nvfp4`);
* ``count``: elements per head (int64).

Dynamic per-token-head quantization (a scale per ``(batch, head, token)`` from that token-head's
``head_dim`` values, as the engines' run-time int8/int4 KV modes do) is
:func:`qdq_dynamic_per_token_head`:

* symmetric (ints and fp8): ``scale = absmax / qmax`` (``/ fmax`` for fp8), floored at
  ``SCALE_FLOOR``, then the static symmetric formulas with that scale;
* asymmetric (ints only) follows LMDeploy's TurboMind convention: the offset is the token-head's
  minimum itself (a float, the range is *not* widened to include 0), ``scale = (max - min) /
  (2**bits - 1)``, the unsigned code is ``u = clamp(round((x - min) / scale), 0, 2**bits - 1)`` and
  ``x_hat = u * scale + min``. kvq computes it in float32 with a true division; TurboMind keeps
  scale and min in the cache dtype and multiplies by a reciprocal, so a code can differ by one at a
  rounding tie. Here it is written on the signed codes of :mod:`kvq.quant.qparams` with the integer zero
  point ``qmin``: ``q = clamp(round((x - min) / scale) + qmin)`` and ``x_hat = (q - qmin) * scale + min``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq.quant import nvfp4
from kvq.quant.formats import FORMATS
from kvq.quant.qparams import SCALE_FLOOR, dequantize, qrange, quantize

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class RoundTripError:
    """Per-KV-head error statistics of a quantize -> dequantize round trip; every field has shape (kv_heads,).

    ``sse`` and ``signal`` are float64, ``max_abs_err`` float32, ``clipped`` and ``count`` int64.
    """

    sse: torch.Tensor
    signal: torch.Tensor
    max_abs_err: torch.Tensor
    clipped: torch.Tensor
    count: torch.Tensor

    @property
    def num_kv_heads(self) -> int:
        return int(self.sse.shape[0])

    @property
    def mse(self) -> torch.Tensor:
        """Mean squared error per head (float64)."""
        return self.sse / self.count.to(torch.float64)

    @property
    def sqnr_db(self) -> torch.Tensor:
        """Signal-to-quantization-noise ratio in dB per head: ``10 log10(signal / sse)``, +inf where sse == 0."""
        ratio = 10.0 * torch.log10(self.signal / self.sse)
        return torch.where(self.sse == 0, torch.full_like(ratio, float("inf")), ratio)

    @property
    def clip_rate(self) -> torch.Tensor:
        """Fraction of elements the saturating clamp changed, per head (float64)."""
        return self.clipped.to(torch.float64) / self.count.to(torch.float64)

    def merge(self, other: RoundTripError) -> RoundTripError:
        """The statistics of both batches together (sums add, the max is the larger one)."""
        if self.sse.shape != other.sse.shape:
            raise ValueError(
                f"cannot merge round-trip errors of {self.num_kv_heads} and {other.num_kv_heads} KV heads"
            )
        device = self.sse.device
        return RoundTripError(
            sse=self.sse + other.sse.to(device),
            signal=self.signal + other.signal.to(device),
            max_abs_err=torch.maximum(self.max_abs_err, other.max_abs_err.to(device)),
            clipped=self.clipped + other.clipped.to(device),
            count=self.count + other.count.to(device),
        )

    @staticmethod
    def zeros(num_kv_heads: int, device: torch.device | str = "cpu") -> RoundTripError:
        """The neutral element of :meth:`merge` (no elements seen)."""
        return RoundTripError(
            sse=torch.zeros(num_kv_heads, dtype=torch.float64, device=device),
            signal=torch.zeros(num_kv_heads, dtype=torch.float64, device=device),
            max_abs_err=torch.zeros(num_kv_heads, dtype=torch.float32, device=device),
            clipped=torch.zeros(num_kv_heads, dtype=torch.int64, device=device),
            count=torch.zeros(num_kv_heads, dtype=torch.int64, device=device),
        )


def check_kv(x: torch.Tensor, number_format: str) -> None:
    """Refuse anything but a (batch, kv_heads, tokens, head_dim) float tensor and a known format."""
    if x.dim() != 4:
        raise ValueError(
            f"K/V tensor must be shaped (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"K/V tensor dtype {x.dtype} is not supported: use float32, bfloat16 or float16")
    if number_format not in FORMATS:
        raise ValueError(f"unknown format {number_format!r}: use one of {', '.join(FORMATS)}")
    if x.shape[1] == 0 or x.shape[3] == 0:
        raise ValueError(f"K/V tensor of shape {tuple(x.shape)} has no KV head or a head_dim of 0")


def expand_qparams(t: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """A scale or zero point reshaped to broadcast against (batch, kv_heads, tokens, head_dim).

    () -> (1, 1, 1, 1); (kv_heads,) -> (1, kv_heads, 1, 1); (kv_heads, head_dim) -> (1, kv_heads, 1, head_dim).
    """
    shape = tuple(t.shape)
    if shape == ():
        return t.reshape(1, 1, 1, 1)  # () -> (1, 1, 1, 1)
    if shape == (num_kv_heads,):
        return t.reshape(1, num_kv_heads, 1, 1)  # (h,) -> (1, h, 1, 1)
    if shape == (num_kv_heads, head_dim):
        return t.reshape(1, num_kv_heads, 1, head_dim)  # (h, d) -> (1, h, 1, d)
    raise ValueError(
        f"scale/zero-point shape {shape} fits none of () per tensor, ({num_kv_heads},) per head, "
        f"({num_kv_heads}, {head_dim}) per channel for {num_kv_heads} KV heads of head_dim {head_dim}"
    )


def check_qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str
) -> None:
    """Refuse static qparams that do not fit ``x`` (see :func:`check_kv`) in ``number_format``."""
    check_kv(x, number_format)
    _, heads, _, head_dim = x.shape
    if FORMATS[number_format].symmetric_only and zero_point is not None:
        raise ValueError(f"format {number_format} is symmetric: pass zero_point=None")
    if not scale.is_floating_point():
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    expand_qparams(scale, heads, head_dim)  # refuses a shape of no granularity
    if zero_point is None:
        return
    if zero_point.shape != scale.shape:
        raise ValueError(
            f"zero_point shape {tuple(zero_point.shape)} differs from scale shape {tuple(scale.shape)}"
        )
    if zero_point.is_floating_point():
        raise ValueError(f"zero_point must be an integer tensor (int32), got {zero_point.dtype}")


def _static_qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate and broadcast static qparams against ``x``: float32 scale, int32 zero point (or None)."""
    check_qparams(x, scale, zero_point, number_format)
    _, heads, _, head_dim = x.shape
    s = expand_qparams(scale, heads, head_dim).to(device=x.device, dtype=torch.float32)
    if zero_point is None:
        return s, None
    return s, expand_qparams(zero_point, heads, head_dim).to(device=x.device, dtype=torch.int32)


def qdq_static(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str
) -> torch.Tensor:
    """Quantize then dequantize ``x`` with static qparams; same shape and dtype as ``x``."""
    s, z = _static_qparams(x, scale, zero_point, number_format)
    return dequantize(quantize(x, s, z, number_format), s, z, number_format).to(x.dtype)


def _clipped(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, number_format: str) -> torch.Tensor:
    """Where the saturating clamp adds an error beyond rounding (see the module docstring)."""
    if number_format == "nvfp4":
        return nvfp4.clipped(x, s)
    return _clip_mask(x / s, z, number_format)


def _clip_mask(y: torch.Tensor, z: torch.Tensor | None, number_format: str) -> torch.Tensor:
    """Where the rounded value of ``y = x / scale`` (float32) is outside the format's range."""
    record = FORMATS[number_format]
    if record.overflow is not None:
        threshold, inclusive = record.overflow
        return y.abs() >= threshold if inclusive else y.abs() > threshold
    qmin, qmax = record.qmin, record.qmax
    r = torch.round(y)
    if z is not None:
        r = r + z.to(torch.float32)
    return (r < qmin) | (r > qmax)


def roundtrip_error_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str
) -> RoundTripError:
    """Per-head error statistics of the static round trip of ``x`` (see the module docstring)."""
    s, z = _static_qparams(x, scale, zero_point, number_format)
    batch, heads, tokens, head_dim = x.shape
    count = batch * tokens * head_dim
    if count == 0:
        return RoundTripError.zeros(heads, device=x.device)
    xf = x.to(torch.float32)
    x_hat = dequantize(quantize(xf, s, z, number_format), s, z, number_format)
    err = xf - x_hat
    dims = (0, 2, 3)
    return RoundTripError(
        sse=err.to(torch.float64).square().sum(dim=dims),
        signal=xf.to(torch.float64).square().sum(dim=dims),
        max_abs_err=err.abs().amax(dim=dims),
        clipped=_clipped(xf, s, z, number_format).sum(dim=dims, dtype=torch.int64),
        count=torch.full((heads,), count, dtype=torch.int64, device=x.device),
    )


def qdq_dynamic_per_token_head(x: torch.Tensor, number_format: str, symmetric: bool) -> torch.Tensor:
    """Round trip with a scale (and offset) per (batch, head, token) computed from its head_dim values.

    Same shape and dtype as ``x``. See the module docstring for the symmetric and the (LMDeploy)
    asymmetric conventions; fp8 is symmetric only.
    """
    check_kv(x, number_format)
    xf = x.to(torch.float32)
    if symmetric:
        top = qrange(number_format)[1]  # qmax, or fmax for fp8
        absmax = xf.abs().amax(dim=-1, keepdim=True)  # (b, h, t, d) -> (b, h, t, 1)
        scale = torch.clamp_min(absmax / top, SCALE_FLOOR)
        q = quantize(xf, scale, None, number_format)
        return dequantize(q, scale, None, number_format).to(x.dtype)
    if FORMATS[number_format].symmetric_only:
        raise ValueError(f"format {number_format} is symmetric by construction: pass symmetric=True")
    qmin, qmax = qrange(number_format)
    lo = xf.amin(dim=-1, keepdim=True)  # (b, h, t, d) -> (b, h, t, 1)
    hi = xf.amax(dim=-1, keepdim=True)  # (b, h, t, d) -> (b, h, t, 1)
    scale = torch.clamp_min((hi - lo) / float(qmax - qmin), SCALE_FLOOR)
    zp = torch.full_like(scale, qmin, dtype=torch.int32)
    shifted = xf - lo
    q = quantize(shifted, scale, zp, number_format)
    return (dequantize(q, scale, zp, number_format) + lo).to(x.dtype)
