"""kvq.artifacts.layer_plan: choosing the skipped layers for a budget, and vLLM's flag as vLLM parses it."""

from __future__ import annotations

import argparse

import pytest

from kvq.artifacts.layer_plan import (
    check_skip_count,
    engine_support,
    skip_most_sensitive,
    skip_within_bytes,
    vllm_skip_flags,
)
from kvq.errors import UsageError

ORDER = [4, 0, 7, 1, 2, 3, 5, 6]  # most sensitive first


def test_skip_n_takes_the_n_most_sensitive_sorted_by_index():
    assert skip_most_sensitive(ORDER, 1) == (4,)
    assert skip_most_sensitive(ORDER, 3) == (0, 4, 7)


@pytest.mark.parametrize("n", [0, -1, 8, 9])
def test_skip_counts_outside_1_to_layers_minus_1_are_refused(n):
    with pytest.raises(UsageError, match=f"--skip {n}: the scales hold 8 layers"):
        check_skip_count(n, 8)


def _bytes(skipped) -> float:
    """8 layers of 100 bytes quantized (int8), 200 unquantized (bfloat16), per token."""
    return 100.0 * (8 - len(skipped)) + 200.0 * len(skipped)


def test_bytes_budget_skips_in_sensitivity_order_while_it_fits():
    # 800 all quantized; each skipped layer adds 100: 1050 fits 2 skipped layers (1000), not 3 (1100)
    assert skip_within_bytes(ORDER, _bytes, 1050) == (0, 4)
    assert skip_within_bytes(ORDER, _bytes, 1100) == (0, 4, 7)
    assert skip_within_bytes(ORDER, _bytes, 850) == ()  # the recipe fits, no layer more
    for limit, words in ((799, "the recipe alone takes 800"), (1600, "holds the whole unquantized cache"),
                         (float("nan"), "must be a positive number"), (0, "must be a positive number")):
        with pytest.raises(UsageError, match=words):
            skip_within_bytes(ORDER, _bytes, limit)


def test_vllm_flag_is_one_index_per_word_as_vllms_argparse_reads_it():
    # vLLM's arg_utils turns list[str] fields into nargs="+" options (collection_to_kwargs, 0.19.0..0.33.0),
    # and Attention skips a layer when str(layer_idx) is in the list: rebuilt here with argparse itself.
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-dtype-skip-layers", type=str, nargs="+", default=[])
    flags = vllm_skip_flags([17, 0])
    assert flags == "--kv-cache-dtype-skip-layers 0 17"
    parsed = parser.parse_args(flags.split()).kv_cache_dtype_skip_layers
    assert [i for i in range(30) if str(i) in parsed] == [0, 17]
    # the comma form skips nothing in vLLM: one pattern "0,17" that is no layer's index
    comma = parser.parse_args(["--kv-cache-dtype-skip-layers", "0,17"]).kv_cache_dtype_skip_layers
    assert [i for i in range(30) if str(i) in comma] == []


def test_engines_that_cannot_apply_a_plan_say_so():
    fp8 = engine_support("fp8_e4m3", "fp8_e4m3", (0, 17))
    assert fp8["vllm"] == {"applies": True, "flags": "--kv-cache-dtype-skip-layers 0 17",
                           "note": "vLLM >= 0.19.0, with the --format vllm export of these scales"}
    assert [name for name, e in fp8.items() if not e["applies"]] == ["sglang", "trtllm", "lmdeploy"]
    int8 = engine_support("int8", "int8", (3,))
    assert not any(e["applies"] for e in int8.values()) and all(e["flags"] == "" for e in int8.values())


def test_a_plan_is_dropped_with_the_scales_it_was_made_for():
    from kvq.artifacts.files import (
        PLAN_JSON,
        SCALES_FILE,
        SCALES_JSON,
        STATS_FILE,
        VALIDATE_JSON,
        carried_over,
    )

    assert PLAN_JSON not in carried_over({SCALES_FILE, SCALES_JSON})  # kvq solve into the folder
    assert PLAN_JSON not in carried_over({STATS_FILE, SCALES_FILE, SCALES_JSON})  # kvq calibrate
    assert {SCALES_FILE, SCALES_JSON, STATS_FILE} <= carried_over({PLAN_JSON})  # kvq plan keeps the set
    assert PLAN_JSON in carried_over({VALIDATE_JSON})
