"""NVFP4 (FP4 e2m1 values, blocks of 16 with an fp8 e4m3 scale, one static fp32 global scale): pure math.

For a tensor with global scale ``S`` (calibrated: ``S = absmax / 448``, the convention of ModelOpt >= 0.42,
vLLM >= 0.21 and TensorRT-LLM, which read it as the layer's ``k_scale`` / ``v_scale``; ModelOpt 0.27-0.41
wrote ``absmax / (6 * 448)``), every block of ``BLOCK`` consecutive values along head_dim is stored as:

* its block scale ``s_b = e4m3(min(amax_b / (6 * S), 448))``: computed when the value is written (the
  engines' kernels do this per block, at run time), rounded to nearest even on the e4m3 grid, saturated at 448
  (with the calibrated S a block scale stays below 448 / 6 unless the block exceeds 6x the calibrated absmax);
* its values ``q = e2m1(x / (s_b * S))``: rounded to nearest even on {0, 0.5, 1, 1.5, 2, 3, 4, 6},
  saturated at 6 (only a block larger than the calibrated absmax, whose block scale saturated, reaches it);
  a block whose scale rounds to 0 stores zeros;

and read back as ``x_hat = q * s_b * S``. kvq's ``quantize_blocks`` returns ``q * s_b`` (exact in float32: a 2-bit
significand times a 4-bit one) so that ``dequantize`` is the fp8 path's ``y * scale``.

Hand-written: torch has no e2m1 cast on CPU, and none with the block structure.
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_TOP = E4M3_MAX  # the calibrated global scale is absmax / 448 (the engines' convention)
E2M1_OVERFLOW = 7.0  # the tie between 6 (code 111, odd) and 8 (beyond): rounds up, so |y| >= 7 saturates


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """``y`` (float32) rounded to the nearest e2m1 value, ties to the even code, saturated at +-6.

    The grid's step is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; torch.round rounds half to even, and the even
    multiple of each step is the even code (1.0 = 010, 2 = 100, 4 = 110), so each range rounds by its step.
    """
    a = y.abs()
    q = torch.where(a < 2.0, torch.round(a * 2.0) / 2.0,
                    torch.where(a < 4.0, torch.round(a), torch.round(a / 2.0) * 2.0))
    return torch.copysign(q.clamp(max=E2M1_MAX), y)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d // BLOCK, BLOCK); head_dim must be a multiple of BLOCK."""
    d = x.shape[-1]
    if d % BLOCK:
        raise ValueError(f"nvfp4 stores blocks of {BLOCK} values along head_dim: head_dim {d} is not a multiple of "
                         f"{BLOCK}")
    return x.reshape(*x.shape[:-1], d // BLOCK, BLOCK)  # (..., d) -> (..., d / 16, 16)


def block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 block scales (float32 values), (..., d // BLOCK, 1); ``global_scale`` broadcasts against x."""
    xb = _blocks(x.to(torch.float32))
    g = _per_block(global_scale, x)
    amax = xb.abs().amax(dim=-1, keepdim=True)  # (..., d / 16, 1)
    return (amax / (E2M1_MAX * g)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _per_block(global_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The global scale broadcast like x's blocks: (..., 1 or d) -> (..., 1, 1)."""
    g = global_scale.to(device=x.device, dtype=torch.float32)
    if g.dim() and g.shape[-1] != 1:
        raise ValueError("the nvfp4 global scale is one value per tensor (per layer, for K or V)")
    return g.unsqueeze(-1)  # (..., 1) -> (..., 1, 1)


def quantize_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``q * s_b`` per element (float32, x's shape): the e2m1 value times its block's e4m3 scale."""
    xb = _blocks(x.to(torch.float32))  # (..., d / 16, 16)
    g = _per_block(global_scale, x)
    sb = block_scales(x, global_scale)
    denom = sb * g
    y = torch.where(denom > 0, xb / torch.where(denom > 0, denom, 1.0), 0.0)
    return (round_e2m1(y) * sb).reshape(x.shape)


def clipped(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Where the saturation at 6 changed a value (its block scale saturated at 448), x's shape, bool."""
    xb = _blocks(x.to(torch.float32))
    denom = block_scales(x, global_scale) * _per_block(global_scale, x)
    return ((xb.abs() >= E2M1_OVERFLOW * denom) & (denom > 0)).reshape(x.shape)
