"""Solver golden values, computed by hand in the comments."""

import math

import pytest
import torch

from kvq.artifacts.stats import KVStats
from kvq.errors import KvqError
from kvq.quant.qparams import SCALE_FLOOR, choose_qparams, dequantize, quantize
from kvq.recipe.schema import KVRecipe, QuantSpec
from kvq.solving.solver import solve_scales

F32 = torch.float32


def spec(fmt, sym, gran):
    return QuantSpec(format=fmt, symmetric=sym, granularity=gran)


def recipe(fmt, sym, gran):
    s = spec(fmt, sym, gran)
    return KVRecipe(name="t", key=s, value=s)


def one_layer_stats():
    # 2 kv heads x 3 channels. K: head 0 spans [-1, 3], head 1 spans [-8, 2]; V: head 0 is all zero,
    # head 1 spans [-3, 5].
    stats = KVStats()
    k_min = torch.tensor([[-1.0, 0.0, 0.5], [-8.0, -2.0, 0.0]])
    k_max = torch.tensor([[3.0, 1.0, 2.0], [2.0, 1.0, 0.25]])
    v_min = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -3.0]])
    v_max = torch.tensor([[0.0, 0.0, 0.0], [3.0, 2.0, 5.0]])
    stats.observe(0, k_min, k_max, v_min, v_max, tokens=5)
    return stats


def test_fp8_e4m3_per_tensor():
    s = solve_scales(one_layer_stats(), recipe("fp8_e4m3", True, "tensor")).layers[0]
    assert s.k_scale.shape == () and s.k_scale.dtype == F32
    assert s.k_scale.item() == pytest.approx(8.0 / 448)  # absmax over the layer: |-8|
    assert s.v_scale.item() == pytest.approx(5.0 / 448)
    assert s.k_zero_point is None


def test_fp8_e4m3fnuz_per_tensor_uses_the_engines_224():
    s = solve_scales(one_layer_stats(), recipe("fp8_e4m3fnuz", True, "tensor")).layers[0]
    assert s.k_scale.item() == pytest.approx(8.0 / 224)  # vLLM on ROCm clamps e4m3fnuz at 224 (its top is 240)
    assert s.v_scale.item() == pytest.approx(5.0 / 224)


def test_fp8_e5m2_per_head_and_zero_head_floor():
    s = solve_scales(one_layer_stats(), recipe("fp8_e5m2", True, "head")).layers[0]
    assert s.k_scale.tolist() == pytest.approx([3.0 / 57344, 8.0 / 57344])
    # V head 0 is always zero: the floor, never 0.
    assert s.v_scale.tolist() == pytest.approx([SCALE_FLOOR, 5.0 / 57344])


def test_int8_symmetric_per_head():
    s = solve_scales(one_layer_stats(), recipe("int8", True, "head")).layers[0]
    assert s.k_scale.tolist() == pytest.approx([3.0 / 127, 8.0 / 127])


def test_int8_asymmetric_per_head():
    s = solve_scales(one_layer_stats(), recipe("int8", False, "head")).layers[0]
    # head 0: [-1, 3] -> scale 4/255, zp = round(-128 - (-1)/(4/255)) = round(-128 + 63.75) = -64
    # head 1: [-8, 2] -> scale 10/255, zp = round(-128 + 8 * 25.5) = round(76) = 76
    assert s.k_scale.tolist() == pytest.approx([4 / 255, 10 / 255])
    assert s.k_zero_point.dtype == torch.int32
    assert s.k_zero_point.tolist() == [-64, 76]
    # V head 0 zero range -> floor scale, zp = round(-128 - 0) = -128
    # V head 1 [-3, 5] -> scale 8/255, zp = round(-128 + 3 * 31.875) = round(-32.375) = -32
    assert s.v_scale.tolist() == pytest.approx([SCALE_FLOOR, 8 / 255])
    assert s.v_zero_point.tolist() == [-128, -32]


def test_int4_asymmetric_per_channel():
    s = solve_scales(one_layer_stats(), recipe("int4", False, "channel")).layers[0]
    assert s.k_scale.shape == (2, 3)
    # channel (0, 2): [0.5, 2] widened to [0, 2] -> scale 2/15, zp = round(-8 - 0) = -8
    assert s.k_scale[0, 2].item() == pytest.approx(2 / 15)
    assert s.k_zero_point[0, 2].item() == -8
    # channel (1, 0): [-8, 2] -> scale 10/15, zp = round(-8 + 8 / (10/15)) = round(4) = 4
    assert s.k_scale[1, 0].item() == pytest.approx(10 / 15)
    assert s.k_zero_point[1, 0].item() == 4
    # channel (0, 0): [-1, 3] -> scale 4/15, zp = round(-8 + 3.75) = round(-4.25) = -4
    assert s.k_zero_point[0, 0].item() == -4


def test_separate_key_and_value_specs():
    r = KVRecipe(name="mix", key=spec("fp8_e4m3", True, "tensor"), value=spec("int8", False, "head"))
    s = solve_scales(one_layer_stats(), r).layers[0]
    assert s.k_scale.shape == () and s.k_zero_point is None
    assert s.v_scale.shape == (2,) and s.v_zero_point is not None


def test_no_scale_is_zero_nan_or_inf():
    for fmt, sym in (("fp8_e4m3", True), ("int8", True), ("int8", False), ("int4", False)):
        for gran in ("tensor", "head", "channel"):
            s = solve_scales(one_layer_stats(), recipe(fmt, sym, gran)).layers[0]
            for t in (s.k_scale, s.v_scale):
                assert torch.isfinite(t).all() and (t > 0).all()


def test_calibrated_range_round_trips_to_its_ends():
    # The calibrated extremes come back (nearly) exactly: fp8 max -> 448, int asym min/max on the grid ends.
    x = torch.tensor([-1.0, 3.0])
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), spec("int8", False, "tensor"))
    q = quantize(x, scale, zp, "int8")
    assert q.tolist() == [-128 + 64 - 64, 127]  # -1 -> round(-63.75) - 64 = -64 - 64 = -128
    assert dequantize(q, scale, zp, "int8").tolist() == pytest.approx([-1.0, 3.0], abs=float(scale) / 2)
    scale8, _ = choose_qparams(torch.tensor(-5.0), torch.tensor(2.0), spec("fp8_e4m3", True, "tensor"))
    assert quantize(torch.tensor([-5.0]), scale8, None, "fp8_e4m3").float().item() == -448.0


def test_non_finite_or_unobserved_stats_are_refused():
    stats = one_layer_stats()
    stats.layers[0].k.max[0, 0] = math.nan
    with pytest.raises(KvqError, match="layer 0: statistics hold NaN or inf"):
        solve_scales(stats, recipe("int8", True, "head"))
    stats = one_layer_stats()
    stats.layers[0].tokens = 0
    with pytest.raises(KvqError, match="layer 0 was never observed"):
        solve_scales(stats, recipe("int8", True, "head"))
