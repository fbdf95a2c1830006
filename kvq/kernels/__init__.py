"""Validation kernels: the quantize -> dequantize round trip of K/V tensors and its error.

:func:`roundtrip_error` and :func:`fake_quantize` run the fused Triton kernels
(:mod:`kvq.kernels.triton_roundtrip`) on CUDA tensors when triton imports, and the torch reference
(:mod:`kvq.kernels.reference`) otherwise; both give the same numbers (docs/kernels.md).
Triton is imported lazily, so this package imports without it.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

from kvq.kernels.reference import (
    RoundTripError,
    expand_qparams,
    qdq_dynamic_per_token_head,
    qdq_static,
    roundtrip_error_reference,
)

__all__ = [
    "RoundTripError",
    "expand_qparams",
    "fake_quantize",
    "qdq_dynamic_per_token_head",
    "qdq_static",
    "roundtrip_error",
    "roundtrip_error_reference",
    "triton_kernels",
]


@cache
def triton_kernels() -> ModuleType | None:
    """The Triton kernel module, or None when triton is not installed."""
    try:
        from kvq.kernels import triton_roundtrip
    except ImportError:
        return None
    return triton_roundtrip


def roundtrip_error(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str
) -> RoundTripError:
    """Per-KV-head error of the static round trip of ``x`` (batch, kv_heads, tokens, head_dim)."""
    kernels = triton_kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.roundtrip_error_triton(x, scale, zero_point, number_format)
    return roundtrip_error_reference(x, scale, zero_point, number_format)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, number_format: str
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with static qparams, in x's shape and dtype (the eval's quantized cache)."""
    kernels = triton_kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.fake_quantize_triton(x, scale, zero_point, number_format)
    return qdq_static(x, scale, zero_point, number_format)
