"""The format records against torch's own fp8 casts and hand arithmetic (never against kvq's math)."""

import math

import pytest
import torch

from kvq.quant.formats import FORMATS, number_format
from kvq.recipe.schema import NUMBER_FORMATS


def test_one_record_per_recipe_format():
    assert tuple(FORMATS) == NUMBER_FORMATS
    assert all(name == record.name for name, record in FORMATS.items())


@pytest.mark.parametrize("name,bits,qmin,qmax", [("int8", 8, -128, 127), ("int4", 4, -8, 7), ("nvfp4", 4.5, -448, 448)])
def test_integer_and_nvfp4_ranges_by_hand(name, bits, qmin, qmax):
    record = FORMATS[name]
    assert (record.bits, record.qmin, record.qmax) == (bits, qmin, qmax)
    assert record.symmetric_only == (name == "nvfp4")


@pytest.mark.parametrize("name,mantissa_bits", [("fp8_e4m3", 3), ("fp8_e5m2", 2), ("fp8_e4m3fnuz", 3)])
def test_fp8_range_and_overflow_by_hand(name, mantissa_bits):
    record = FORMATS[name]
    assert record.is_fp8 and record.symmetric_only and record.bits == 8
    # e4m3fnuz: the engines clamp at 224 (vLLM on ROCm), below the format's 240
    assert record.qmax == (224.0 if name == "fp8_e4m3fnuz" else torch.finfo(record.dtype).max)
    assert record.qmin == -record.qmax
    # round to nearest even past the top: the midpoint to the next code up overflows, and a tie does
    # exactly when the top code's last mantissa bit is odd (then the tie rounds away, to the next code)
    exponent = math.floor(math.log2(record.qmax))
    spacing = 2.0 ** (exponent - mantissa_bits)
    top_code_odd = int(record.qmax / spacing) % 2 == 1
    assert record.overflow == (record.qmax + spacing / 2, top_code_odd)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="use one of fp8_e4m3, fp8_e5m2"):
        number_format("fp7")
