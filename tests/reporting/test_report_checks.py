"""The report's warnings fire on planted defects of hand-picked size, and stay quiet on even statistics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report_helpers
from report_helpers import eval_json, even_absmax, save, stats_from, validation_json  # noqa: E402

from kvq.quant import histogram  # noqa: E402
from kvq.recipe.schema import load_recipe  # noqa: E402
from kvq.reporting.findings import assess  # noqa: E402
from kvq.reporting.inputs import ReportInputs  # noqa: E402
from kvq.reporting.measures import compute_grids  # noqa: E402
from kvq.solving.solver import solve_scales  # noqa: E402


def assessment(absmax, *, hists=None, recipe=None, validation=None, evaluation=None):
    stats = stats_from(absmax, hists=hists)
    scales = solve_scales(stats, load_recipe(recipe)) if recipe else None
    inputs = ReportInputs(Path("."), stats, scales, validation=validation, evaluation=evaluation)
    return assess(compute_grids(inputs))


def test_even_statistics_raise_nothing_and_point_to_per_tensor_fp8():
    result = assessment(even_absmax(), recipe="fp8-e4m3-per-tensor")
    assert result.findings == []
    assert result.recipe == "fp8-e4m3-per-tensor"


@pytest.mark.parametrize(("size", "fires"), [(6.5, True), (5.9, False)])
def test_outlier_channel(size, fires):
    absmax = even_absmax()
    # the head's median channel absmax is 1.05 (channels 0.9 1.0 1.1 1.2 twice: middle pair 1.0, 1.1) -- but
    # planting changes one channel, so the median of [0.9,1.0,1.1,X,0.9,1.0,1.1,1.2] is (1.0 + 1.1) / 2 = 1.05
    absmax["k"][2, 1, 3] = size * 1.05
    found = assessment(absmax).of("outlier-channels", "k")
    assert bool(found) == fires
    if fires:
        assert found[0].layers == (2,)
        assert "layer 2 head 1 channel 3 (6.5x)" in found[0].text


def test_key_outliers_in_a_quarter_of_layers_point_to_per_channel():
    absmax = even_absmax(layers=8)
    # channel 0 of every head (so the heads stay even) in 2 of 8 layers: a quarter
    absmax["k"][0, :, 0] = absmax["k"][5, :, 0] = 10.0
    assert assessment(absmax).recipe == "int8-asym-per-channel"
    absmax["k"][5, :, 0] = 0.9  # 1 of 8: noted, but one scale per layer still pays
    result = assessment(absmax)
    assert result.of("outlier-channels", "k") and result.recipe == "fp8-e4m3-per-tensor"


@pytest.mark.parametrize(("spread", "fires"), [(5.0, True), (3.9, False)])
def test_head_spread(spread, fires):
    absmax = even_absmax()
    absmax["v"][1, 0] *= spread  # head 0 of layer 1: every channel `spread` times the others (max 1.2 * spread)
    result = assessment(absmax)
    found = result.of("head-spread", "v")
    assert bool(found) == fires
    if fires:
        assert found[0].layers == (1,) and "layer 1 (5.0x)" in found[0].text
        assert result.recipe == "fp8-e4m3-per-head"


@pytest.mark.parametrize(("peak", "fires"), [(500.0, True), (440.0, False)])
def test_fp8_saturation_at_unit_scale(peak, fires):
    absmax = even_absmax()
    absmax["k"][3] *= peak / 1.2  # layer 3 reaches `peak` in its largest channels
    found = assessment(absmax).of("fp8-saturation", "k")
    assert bool(found) == fires and (not fires or found[0].layers == (3,))


def test_subnormal_from_absmax_without_histograms():
    absmax = even_absmax()
    absmax["v"][4] *= 0.01  # at most 0.012 < 2**-6 = 0.015625: every value of layer 4 is subnormal in e4m3
    found = assessment(absmax).of("fp8-subnormal", "v")
    assert [f.layers for f in found] == [(4,)] and found[0].figure == "absmax.png"


@pytest.mark.parametrize(("small", "fires"), [(70, True), (40, False)])
def test_subnormal_share_from_histograms(small, fires):
    """Layer 0 head 2 of K: ``small`` of 100 tokens x 8 channels are 0.001 (< 2**-6), the rest 1.0."""
    absmax = even_absmax()
    absmax["k"][:, :, :] = 1.0
    hists = {}
    for i in range(5):
        k = torch.ones(1, 4, 100, 8)  # (1, heads, tokens, dim)
        if i == 0:
            k[0, 2, :small] = 0.001
        hists[i] = (histogram.head_histogram(k, False), histogram.head_histogram(torch.ones(1, 4, 100, 8), False))
    found = assessment(absmax, hists=hists).of("fp8-subnormal", "k")
    assert bool(found) == fires
    if fires:
        assert found[0].layers == (0,) and f"layer 0 ({small}%)" in found[0].text
        assert found[0].figure == "subnormal.png"


def test_scale_at_the_floor():
    absmax = even_absmax()
    absmax["v"][2, 3] = 0.0  # head 3 of layer 2 always 0: a zero-width range gets SCALE_FLOOR (kvq.quant.qparams)
    found = assessment(absmax, recipe="int8-sym-per-head").of("scale-floor", "v")
    assert [f.layers for f in found] == [(2,)] and "layer 2 (1 of 4 scale(s))" in found[0].text


def test_dominant_layers_from_validation_and_eval():
    validation = validation_json({}, layer_sqnr={(3, "k"): 30.0, (1, "v"): 35.0})  # median 40: 10 and 5 dB below
    errors = {str(i): 1e-3 for i in range(5)} | {"4": 5e-3}  # median 1e-3; layer 4 five times it
    evaluation = eval_json([{"name": "fp8", "delta_pct": 0.5, "delta_pct_stderr": 0.1,
                             "attention_error": {"per_layer": errors}}])
    result = assessment(even_absmax(), validation=validation, evaluation=evaluation)
    assert [f.layers for f in result.of("dominant-layer", "k")] == [(3,)]
    assert result.of("dominant-layer", "v") == []  # 5 dB below the median is under the 6 dB threshold
    assert [f.layers for f in result.of("dominant-layer", "")] == [(4,)]


def test_measured_best_row_is_named_with_its_standard_error():
    evaluation = eval_json([{"name": "a", "delta_pct": 0.8, "delta_pct_stderr": 0.1, "attention_error": None},
                            {"name": "b", "delta_pct": 0.2, "delta_pct_stderr": 0.05, "attention_error": None}])
    result = assessment(even_absmax(), evaluation=evaluation)
    assert any("b changes perplexity least, +0.200% ± 0.050" in r for r in result.reasons)


def test_saved_stats_round_trip_through_the_folder(tmp_path):
    """The same findings from statistics written to disk and read back (what `kvq report` reads)."""
    from kvq.reporting.inputs import load_inputs

    absmax = even_absmax()
    absmax["k"][2, 1, 3] = 10.0
    folder = save(stats_from(absmax), tmp_path / "art")
    found = assess(compute_grids(load_inputs(folder))).of("outlier-channels", "k")
    assert found[0].layers == (2,)
