"""kvq.engines: the matrix rows are well-formed and looked up by kind, number format and granularity.

(Here rather than in tests/test_engines.py: `kvq inspect` is its one consumer so far.)
"""

from __future__ import annotations

from typing import get_args

from kvq.engines import ANY, ENGINE_MATRIX, Verdict, engine_verdicts


def test_rows_are_well_formed():
    kinds = {"compressed-tensors", "modelopt", "sglang-json", "trtllm", "lmdeploy"}
    for row in ENGINE_MATRIX:
        assert row.verdict in get_args(Verdict), row
        assert row.kind in kinds, row
        assert row.granularity in {"tensor", "head", "channel", "rank", ANY}, row
        path, _, version = row.source.rpartition("@")
        assert path and version, row  # "path@version"


def test_lookup_by_kind_format_and_granularity():
    head = {(r.engine, r.backend): r.verdict for r in engine_verdicts("compressed-tensors", "fp8_e4m3", "head")}
    assert head[("vLLM", "FlashAttention (FA3)")] == "applied"
    assert head[("SGLang", "all")] == "ignored"
    tensor = engine_verdicts("compressed-tensors", "fp8_e4m3", "tensor")
    assert all(r.granularity in ("tensor", ANY) for r in tensor)
    assert engine_verdicts("kvq-artifact", "fp8_e4m3", "tensor") == []
    # a format no row names matches only the rows for any format
    assert {r.number for r in engine_verdicts("sglang-json", "unknown", "rank")} == {ANY}
