"""The number formats a KV cache is stored in: one frozen record per format.

Every fact kvq uses about a format lives in its record (bits per element, the range of the stored value,
the storage dtype, whether it takes a zero-point, where an fp8 cast overflows) so that no module keeps a
dict keyed by format name beside another one. Pure data: the math is :mod:`kvq.quant.qparams`, the nvfp4
blocks :mod:`kvq.quant.nvfp4`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvq.quant import nvfp4

Family = Literal["fp8", "int", "nvfp4"]


@dataclass(frozen=True)
class NumberFormat:
    """One storage format of the KV cache.

    ``qmin`` / ``qmax``: the smallest and largest value the stored ``q`` takes (fp8: the engines' clamp,
    e.g. 224 for e4m3fnuz, whose largest value is 240; nvfp4: the e2m1 value times its block's e4m3 scale).
    ``overflow`` (fp8 only): the magnitude of ``x / scale`` from which an unclamped cast leaves the range,
    and whether that threshold itself overflows (a tie that rounds to the odd code beyond the range).
    """

    name: str
    family: Family
    bits: float  # bits per stored element (nvfp4: a 4-bit value plus an 8-bit scale per block of 16)
    qmin: float
    qmax: float
    dtype: torch.dtype | None = None  # the fp8 storage dtype (int codes are stored in int8)
    overflow: tuple[float, bool] | None = None

    @property
    def is_fp8(self) -> bool:
        return self.family == "fp8"

    @property
    def is_int(self) -> bool:
        return self.family == "int"

    @property
    def symmetric_only(self) -> bool:
        """fp8 and nvfp4 take no zero-point; the integer formats take one when asymmetric."""
        return self.family != "int"


# e4m3fn: 464 lies between 448 = 1.75 * 2**8, an even code, and 480: a tie rounds down. e4m3fnuz is clamped
# at 224 = 1.75 * 2**7 (vLLM's get_fp8_min_max on ROCm), an even code: 232 lies between it and 240 and rounds down.
FP8_E4M3 = NumberFormat("fp8_e4m3", "fp8", 8, -448.0, 448.0, torch.float8_e4m3fn, (464.0, False))
FP8_E5M2 = NumberFormat("fp8_e5m2", "fp8", 8, -57344.0, 57344.0, torch.float8_e5m2, (61440.0, True))
FP8_E4M3FNUZ = NumberFormat("fp8_e4m3fnuz", "fp8", 8, -224.0, 224.0, torch.float8_e4m3fnuz, (232.0, False))
INT8 = NumberFormat("int8", "int", 8, -128.0, 127.0)
INT4 = NumberFormat("int4", "int", 4, -8.0, 7.0)
NVFP4 = NumberFormat("nvfp4", "nvfp4", 4.5, -nvfp4.SCALE_TOP, nvfp4.SCALE_TOP)

FORMATS: dict[str, NumberFormat] = {f.name: f for f in (FP8_E4M3, FP8_E5M2, FP8_E4M3FNUZ, INT8, INT4, NVFP4)}


def number_format(name: str) -> NumberFormat:
    """The record of format ``name`` (a ValueError naming the known formats otherwise)."""
    try:
        return FORMATS[name]
    except KeyError as e:
        raise ValueError(f"unknown format {name!r}: use one of {', '.join(FORMATS)}") from e
