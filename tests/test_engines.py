"""kvq.engines.matrix: the matrix rows are well-formed, say what the engines' sources say, are looked up for
`kvq inspect`, and docs/engines.md holds the rendered matrix verbatim.

The expected verdicts below are written by hand from the research notes on each engine's released
source (vLLM 0.33.0 and 0.34.0, SGLang 0.5.23, TensorRT-LLM main, LMDeploy 0.18.0; files cited in the rows and
in docs/engines.md), not derived from the matrix: they are the facts kvq's exports are built on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from kvq.engines.matrix import (
    ANY,
    ENGINE_MATRIX,
    FP8_WEIGHTS,
    NEWEST_READ,
    UNQUANTIZED,
    EngineRow,
    Verdict,
    engine_verdicts,
    load_matrix,
    loader_warnings,
    matrix_markdown,
    model_type_verdicts,
    version_in,
)
from kvq.inspection.found import COMPRESSED_TENSORS, LMDEPLOY, MODELOPT, SGLANG_JSON, TRTLLM

DOCS = Path(__file__).resolve().parents[1] / "docs" / "engines.md"
VERSION = r"\d+(\.\d+)*(\.x|rc\d+)?|main"  # 0.33.0, 0.19.x, 1.3.0rc20, main
VERSIONS = re.compile(rf"(>=|<=|>)?({VERSION})|({VERSION})-({VERSION})")


def _rows(**fields) -> list[EngineRow]:
    return [r for r in ENGINE_MATRIX if all(getattr(r, k) == v for k, v in fields.items())]


def _one(engine: str, versions: str, kind: str, granularity: str, backend_part: str, **fields) -> EngineRow:
    rows = [r for r in _rows(engine=engine, versions=versions, kind=kind, granularity=granularity, **fields)
            if backend_part in r.backend]
    assert len(rows) == 1, (engine, versions, backend_part, rows)
    return rows[0]


# --- form ---------------------------------------------------------------------------------------------------

def test_rows_are_well_formed():
    kinds = {COMPRESSED_TENSORS, MODELOPT, SGLANG_JSON, TRTLLM, LMDEPLOY}
    for row in ENGINE_MATRIX:
        assert row.engine in NEWEST_READ, row
        assert row.verdict in get_args(Verdict), row
        assert row.kind in kinds, row
        assert row.granularity in {"tensor", "head", "channel", "rank", ANY}, row
        assert row.number in {"fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "nvfp4", "int8", "int4", ANY}, row
        assert row.weights in {ANY, UNQUANTIZED, FP8_WEIGHTS}, row
        assert row.model_type == ANY or all(re.fullmatch(r"[a-z0-9_]+", t) for t in row.model_types), row
        assert row.weights == ANY or row.kind == MODELOPT, row  # only ModelOpt has two checkpoint kinds
        assert VERSIONS.fullmatch(row.versions), row.versions
        path, at, version = row.source.partition("@")
        assert at and path and version and "@" not in version and " " not in row.source, row.source
        for text in (row.engine, row.versions, row.backend, row.note):
            assert text and "\n" not in text and "|" not in text, row  # one line, one Markdown cell


def test_rows_are_unique():
    keys = [(r.engine, r.versions, r.backend, r.kind, r.granularity, r.number, r.weights, r.model_type)
            for r in ENGINE_MATRIX]
    assert len(keys) == len(set(keys))


def test_current_means_the_range_reaches_the_newest_release_read():
    assert _one("vLLM", "0.15.0-0.34.0", COMPRESSED_TENSORS, "tensor", "Hopper").current
    assert _one("SGLang", ">=0.5.19", COMPRESSED_TENSORS, "tensor", "fa3").current
    assert _one("TensorRT-LLM", "0.17-main", MODELOPT, "tensor", "TRTLLM").current
    assert _one("LMDeploy", "<=0.18.0", LMDEPLOY, "rank", "PyTorch").current
    assert _one("TensorRT-LLM", ">1.3.0rc20", TRTLLM, ANY, "removed").current
    assert not _one("vLLM", "0.15.0-0.19.x", COMPRESSED_TENSORS, "tensor", "FLASHINFER").current
    assert not _one("vLLM", "<=0.14.x", COMPRESSED_TENSORS, "head", "all").current
    assert not _one("TensorRT-LLM", "<=1.3.0rc20", TRTLLM, "rank", "plugin", number="int8").current
    assert not _one("LMDeploy", "0.0.4-0.3.0", LMDEPLOY, "rank", "workspace").current
    assert not _one("SGLang", "<=0.5.1", SGLANG_JSON, "rank", "flashinfer").current


# --- content: the engines' rules as read ------------------------------------------------------------------

@pytest.mark.parametrize("engine,versions,kind,granularity,backend,verdict", [
    # vLLM, compressed-tensors per tensor (compressed_tensors.py, flashinfer.py, kv_cache.py)
    ("vLLM", "0.20.0-0.34.0", COMPRESSED_TENSORS, "tensor", "FLASHINFER", "applied"),
    ("vLLM", "0.15.0-0.19.x", COMPRESSED_TENSORS, "tensor", "FLASHINFER", "broken"),
    ("vLLM", "0.15.0-0.34.0", COMPRESSED_TENSORS, "tensor", "TRITON_ATTN (CUDA", "applied"),
    ("vLLM", "0.15.0-0.34.0", COMPRESSED_TENSORS, "tensor", "gfx942", "broken"),
    ("vLLM", "0.15.0-0.34.0", COMPRESSED_TENSORS, "tensor", "gfx950", "applied"),
    ("vLLM", "0.7.0-0.14.x", COMPRESSED_TENSORS, "tensor", "auto", "ignored"),
    ("vLLM", "0.33.0-0.34.0", COMPRESSED_TENSORS, ANY, "FLEX_ATTENTION", "refused"),
    # vLLM per head: FLASH_ATTN only
    ("vLLM", "0.15.0-0.34.0", COMPRESSED_TENSORS, "head", "Hopper", "applied"),
    ("vLLM", "0.28.0-0.34.0", COMPRESSED_TENSORS, "head", "head_dim <= 128", "applied"),
    ("vLLM", "0.17.0-0.34.0", COMPRESSED_TENSORS, "head", "FLASHINFER", "refused"),
    ("vLLM", "<=0.14.x", COMPRESSED_TENSORS, "head", "all", "refused"),
    # vLLM, the JSON of --quantization-param-path: removed in 0.7.0
    ("vLLM", "0.7.0-0.34.0", SGLANG_JSON, ANY, "all", "refused"),
    # SGLang
    ("SGLang", ">=0.5.19", COMPRESSED_TENSORS, "tensor", "trtllm_mha", "applied"),
    ("SGLang", ">=0.5.19", COMPRESSED_TENSORS, "tensor", "aiter", "applied"),
    ("SGLang", ">=0.5.19", COMPRESSED_TENSORS, "tensor", "torch_native", "ignored"),
    ("SGLang", "<=0.5.18", COMPRESSED_TENSORS, "tensor", "any", "ignored"),
    ("SGLang", "0.4.5-0.5.23", COMPRESSED_TENSORS, "head", "all", "ignored"),
    ("SGLang", "0.5.2-0.5.23", SGLANG_JSON, "rank", "flashinfer", "broken"),
    ("SGLang", "0.4.6-0.5.23", SGLANG_JSON, "rank", "fa3", "broken"),
    ("SGLang", "0.5.10-0.5.23", SGLANG_JSON, "rank", "triton", "broken"),
    ("SGLang", "0.5.18-0.5.23", SGLANG_JSON, "rank", "trtllm_mha", "broken"),
    # TensorRT-LLM
    ("TensorRT-LLM", "main", COMPRESSED_TENSORS, ANY, "PyTorch", "refused"),
    ("TensorRT-LLM", ">1.3.0rc20", TRTLLM, ANY, "removed", "refused"),
    # LMDeploy
    ("LMDeploy", ">=0.4.0", LMDEPLOY, "rank", "TurboMind", "ignored"),
    ("LMDeploy", "0.6.0-0.18.0", COMPRESSED_TENSORS, ANY, "TurboMind", "refused"),
    ("LMDeploy", "0.6.0-0.18.0", COMPRESSED_TENSORS, ANY, "PyTorch", "refused"),
    ("LMDeploy", "0.14.0-0.18.0", MODELOPT, "tensor", "PyTorch", "refused"),
    # 2026 formats (vLLM 0.33.0 compressed_tensors.py, kv_cache.py, flashinfer.py; SGLang 0.5.23)
    ("vLLM", "0.15.0-0.34.0", COMPRESSED_TENSORS, "tensor", "gfx94x, fnuz", "applied"),
    ("vLLM", "0.33.0-0.34.0", COMPRESSED_TENSORS, "tensor", "all", "refused"),
    ("SGLang", "0.5.23", MODELOPT, "tensor", "NVFP4KVCacheMethod", "applied"),
])
def test_verdicts_read_in_the_sources(engine, versions, kind, granularity, backend, verdict):
    assert _one(engine, versions, kind, granularity, backend).verdict == verdict


def test_modelopt_checkpoint_kinds():
    # KV scales alone on an unquantized model (quant_algo null): applied by no current engine
    kv_only = [r for r in _rows(kind=MODELOPT) if r.weights in (UNQUANTIZED, ANY) and r.current]
    assert {r.engine for r in kv_only} == {"vLLM", "SGLang", "TensorRT-LLM", "LMDeploy"}
    assert all(r.verdict != "applied" for r in kv_only), kv_only
    # merged into a ModelOpt FP8-weight checkpoint: vLLM 0.33.0 and SGLang apply them
    merged = {(r.engine, r.verdict) for r in _rows(kind=MODELOPT, weights=FP8_WEIGHTS) if r.current}
    assert {("vLLM", "applied"), ("SGLang", "applied"), ("SGLang", "ignored")} <= merged
    # TensorRT-LLM's PyTorch backend runs every FP8 KV cache at 1.0, whatever the checkpoint
    trt = _rows(engine="TensorRT-LLM", kind=MODELOPT, number="fp8_e4m3")
    assert len(trt) == 3 and {r.verdict for r in trt} == {"ignored"} and {r.weights for r in trt} == {ANY}


@pytest.mark.parametrize("kind,applied_by", [
    # the only releases that apply the two --legacy formats
    (SGLANG_JSON, {("SGLang", "<=0.5.1")}),
    (LMDEPLOY, {("LMDeploy", "0.0.4-0.3.0")}),
    # trtllm-build: up to 1.3.0rc20, FP8 and INT8
    (TRTLLM, {("TensorRT-LLM", "<=1.3.0rc20")}),
])
def test_formats_no_current_release_applies(kind, applied_by):
    rows = _rows(kind=kind)
    assert {(r.engine, r.versions) for r in rows if r.verdict == "applied"} == applied_by
    assert not [r for r in rows if r.verdict == "applied" and r.current]


def test_per_head_scales_are_applied_only_by_flash_attn():
    applied = [r for r in _rows(kind=COMPRESSED_TENSORS, granularity="head", verdict="applied")
               if r.engine != "transformers + compressed-tensors"]
    assert applied and all(r.engine == "vLLM" and r.backend.startswith("FLASH_ATTN") for r in applied)


# --- lookup for kvq inspect -----------------------------------------------------------------------------

def test_lookup_by_kind_format_and_granularity():
    head = engine_verdicts(COMPRESSED_TENSORS, "fp8_e4m3", "head")
    verdicts = {(r.engine, r.backend): r.verdict for r in head}
    assert verdicts[("vLLM", "FLASH_ATTN, Hopper SM90 (FlashAttention 3)")] == "applied"
    assert verdicts[("SGLang", "all")] == "ignored"
    assert all(r.granularity in ("head", ANY) and r.number in ("fp8_e4m3", ANY) for r in head)
    assert engine_verdicts("kvq-artifact", "fp8_e4m3", "tensor") == []
    assert engine_verdicts("hf-checkpoint", None, None) == []
    # a format no row names matches only the rows for any format
    assert {r.number for r in engine_verdicts(SGLANG_JSON, "unknown", "rank")} == {ANY}
    # None: unknown, every row of the kind
    assert len(engine_verdicts(TRTLLM, None, None)) == len(_rows(kind=TRTLLM))


def test_lookup_puts_current_releases_first_in_matrix_order():
    rows = engine_verdicts(COMPRESSED_TENSORS, "fp8_e4m3", "tensor")
    flags = [r.current for r in rows]
    assert True in flags and False in flags
    assert flags == sorted(flags, reverse=True)  # every current row before every older one
    current = [r for r in rows if r.current]
    assert current == [r for r in ENGINE_MATRIX if r in current]  # matrix order kept within the group


def test_lookup_by_modelopt_weights():
    everything = engine_verdicts(MODELOPT, "fp8_e4m3", "tensor")
    kv_only = engine_verdicts(MODELOPT, "fp8_e4m3", "tensor", weights=UNQUANTIZED)
    merged = engine_verdicts(MODELOPT, "fp8_e4m3", "tensor", weights=FP8_WEIGHTS)
    assert all(r.weights != FP8_WEIGHTS for r in kv_only) and all(r.weights != UNQUANTIZED for r in merged)
    assert set(kv_only) | set(merged) == set(everything)
    assert ("vLLM", "applied") in {(r.engine, r.verdict) for r in merged}
    assert ("vLLM", "applied") not in {(r.engine, r.verdict) for r in kv_only}


# --- per model type: engine model files that never load KV scales --------------------------------------------

# Golden facts, read in the released sources (file:line@release in each row's source):
#   vLLM qwen3_moe.py:652@0.17.0: `if name.endswith(ignore_suffixes) and name not in params_dict: continue`, with
#     ".k_scale" / ".v_scale" in ignore_suffixes, runs before maybe_remap_kv_scale_name (same at 0.15.0:647, 0.17.1);
#     0.18.0 remaps first (qwen3_moe.py:566@0.18.0): PR 35656.
#   vLLM Qwen3.5: AutoWeightsLoader applies quant_config.get_cache_scale_mapper() (utils.py:478@0.34.0,
#     utils.py:414@0.27.1), whose default rule maps .k_scale onto .attn.k_scale (base_config.py:261@0.34.0);
#     0.17.0-0.23.0 call maybe_remap_kv_scale_name in qwen3_5.py (qwen3_5.py:400@0.17.0): applied.
#   SGLang 0.5.23: qwen2.py:719 and glm4.py:637 and mixtral.py:479 log "Parameter ... not found in params_dict";
#     qwen3_moe.py:1266 skips silently; qwen3_next.py:1266 asserts the skipped scale is 1.0; olmo2.py:480
#     indexes params_dict[name] (KeyError); qwen3_5.py:1694 maps self_attn.k_scale onto attn.k_scale.
@pytest.mark.parametrize("engine,version,model_type,kind,verdicts", [
    ("vLLM", "0.15.0", "qwen3_moe", COMPRESSED_TENSORS, ["ignored"]),
    ("vLLM", "0.17.1", "qwen3_moe", COMPRESSED_TENSORS, ["ignored"]),
    ("vLLM", "0.17.1", "qwen3_moe", MODELOPT, ["ignored"]),
    ("vLLM", "0.18.0", "qwen3_moe", COMPRESSED_TENSORS, []),  # fixed in 0.18.0
    ("vLLM", "0.14.1", "qwen3_moe", COMPRESSED_TENSORS, []),  # before the releases read
    ("vLLM", "0.34.0", "qwen3_5", COMPRESSED_TENSORS, ["applied"]),  # vLLM issue 54623 not borne out
    ("vLLM", "0.34.0", "qwen3_5_text", COMPRESSED_TENSORS, ["applied"]),
    ("vLLM", "0.16.0", "qwen3_5", COMPRESSED_TENSORS, []),  # no Qwen3.5 model file before 0.17.0
    ("vLLM", "0.34.0", "llama", COMPRESSED_TENSORS, []),
    ("SGLang", "0.5.23", "qwen2", COMPRESSED_TENSORS, ["ignored"]),
    ("SGLang", "0.5.19", "qwen2", COMPRESSED_TENSORS, ["ignored"]),
    ("SGLang", "0.5.18", "qwen2", COMPRESSED_TENSORS, []),  # no compressed-tensors KV method at all there
    ("SGLang", "0.5.23", "qwen2", MODELOPT, ["ignored"]),
    ("SGLang", "0.5.23", "qwen3_moe", COMPRESSED_TENSORS, ["ignored"]),
    ("SGLang", "0.5.23", "mixtral", COMPRESSED_TENSORS, ["ignored"]),
    ("SGLang", "0.5.23", "glm4", COMPRESSED_TENSORS, ["ignored"]),
    ("SGLang", "0.5.23", "qwen3_next", COMPRESSED_TENSORS, ["refused"]),
    ("SGLang", "0.5.23", "olmo2", COMPRESSED_TENSORS, ["refused"]),
    ("SGLang", "0.5.23", "qwen3_5_moe", COMPRESSED_TENSORS, ["applied"]),
    ("SGLang", "0.5.22", "qwen3_next", COMPRESSED_TENSORS, []),  # only 0.5.23 read
])
def test_model_type_verdicts(engine, version, model_type, kind, verdicts):
    assert [r.verdict for r in model_type_verdicts(engine, version, model_type, kind)] == verdicts


def test_model_type_rows_cite_a_source_line():
    rows = [r for r in ENGINE_MATRIX if r.model_type != ANY]
    assert len(rows) >= 10
    for row in rows:
        path, _, version = row.source.partition("@")
        assert re.fullmatch(r"[\w/.]+\.py:\d+", path) and version, row.source


@pytest.mark.parametrize("versions,version,inside", [
    ("0.15.0-0.17.x", "0.17.1", True), ("0.15.0-0.17.x", "0.18.0", False), ("0.15.0-0.17.x", "0.14.1", False),
    ("0.15.0-0.17.x", "0.15.0", True), (">=0.5.19", "0.5.23", True), (">=0.5.19", "0.5.18", False),
    ("<=0.5.18", "0.5.18", True), ("<=0.5.18", "0.5.19", False), ("0.5.23", "0.5.23", True),
    ("0.5.23", "0.5.3", False), ("<=1.3.0rc20", "1.3.0rc19", True), ("<=1.3.0rc20", "1.3.0", False),
    (">1.3.0rc20", "1.3.0", True), ("0.17-main", "main", True), ("0.17-main", "0.16.2", False),
    ("0.19.x", "0.19.1", True), ("0.19.x", "0.20.0", False),
])
def test_version_in(versions, version, inside):
    assert version_in(versions, version) is inside


def test_loader_warnings_name_engine_versions_model_type_and_source():
    lines = loader_warnings(COMPRESSED_TENSORS, "qwen3_moe")
    assert lines == [
        "vLLM 0.15.0-0.17.x ignores KV scales for model type qwen3_moe: " + _one(
            "vLLM", "0.15.0-0.17.x", COMPRESSED_TENSORS, ANY, "any").note
        + " (vllm/model_executor/models/qwen3_moe.py:652@0.17.0)",
        "SGLang 0.5.23 ignores KV scales for model type qwen3_moe: " + _one(
            "SGLang", "0.5.23", COMPRESSED_TENSORS, ANY, "any", model_type="qwen3_moe").note
        + " (sglang/srt/models/qwen3_moe.py:1266@0.5.23)",
    ]
    assert loader_warnings(COMPRESSED_TENSORS, "qwen3_next")[0].startswith(
        "SGLang 0.5.23 refuses KV scales for model type qwen3_next: ")
    assert loader_warnings(COMPRESSED_TENSORS, "llama") == []
    assert loader_warnings(COMPRESSED_TENSORS, "qwen3_5") == []  # applied: no warning
    assert loader_warnings(COMPRESSED_TENSORS, None) == []
    assert loader_warnings(SGLANG_JSON, "qwen2") == []  # the rows are for checkpoint tensors


def test_lookup_by_model_type():
    qwen2_rows = [r for r in ENGINE_MATRIX if "qwen2" in r.model_types]
    assert qwen2_rows
    llama = engine_verdicts(COMPRESSED_TENSORS, "fp8_e4m3", "tensor", model_type="llama")
    assert not [r for r in llama if r.model_type != ANY]
    qwen2 = engine_verdicts(COMPRESSED_TENSORS, "fp8_e4m3", "tensor", model_type="qwen2")
    assert [r for r in qwen2 if r.model_type != ANY] == [r for r in qwen2_rows if r.kind == COMPRESSED_TENSORS]
    unknown = engine_verdicts(COMPRESSED_TENSORS, "fp8_e4m3", "tensor")  # None: every row
    assert set(qwen2) < set(unknown)


# --- the docs -------------------------------------------------------------------------------------------

def test_docs_hold_the_rendered_matrix():
    text = DOCS.read_text(encoding="utf-8")
    start, end = "<!-- matrix:start -->\n", "<!-- matrix:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    section = text[text.index(start) + len(start):text.index(end)]
    assert section == matrix_markdown(), (
        "docs/engines.md's matrix differs from kvq/engines/matrix.py: paste the output of "
        "python -c \"from kvq.engines.matrix import matrix_markdown; print(matrix_markdown(), end='')\"")


def test_markdown_table_has_one_line_per_row_and_eight_cells():
    lines = matrix_markdown().splitlines()
    assert len(lines) == 2 + len(ENGINE_MATRIX)
    for line in lines:
        cells = re.split(r"(?<!\\)\|", line)[1:-1]  # unescaped pipes separate cells
        assert len(cells) == 8, line
    first = lines[2].split(" | ")
    row = ENGINE_MATRIX[0]
    assert first[0] == f"| {row.engine}" and first[1] == row.versions and first[-1] == f"`{row.source}` |"
    # a pipe in a cell is escaped, not a new column
    odd = EngineRow("vLLM", "0.33.0", "a | b", COMPRESSED_TENSORS, "tensor", "fp8_e4m3", "applied", "n", "p@1")
    assert len(re.split(r"(?<!\\)\|", matrix_markdown((odd,)).splitlines()[2])[1:-1]) == 8


def test_load_matrix_names_a_malformed_entry(tmp_path):
    good = ("- {engine: vLLM, versions: 0.33.0, backend: all, kind: compressed-tensors, granularity: tensor, "
            "number: fp8_e4m3, verdict: applied, note: n, source: p@1}\n")
    path = tmp_path / "matrix.yaml"
    path.write_text(good, encoding="utf-8")
    assert load_matrix(path) == (EngineRow("vLLM", "0.33.0", "all", COMPRESSED_TENSORS, "tensor", "fp8_e4m3",
                                           "applied", "n", "p@1"),)
    path.write_text(good + good.replace("note: n", "notes: n"), encoding="utf-8")  # a misspelt field
    with pytest.raises(ValueError, match=r"entry 1: not an engine row"):
        load_matrix(path)
    path.write_text(good.replace("versions: 0.33.0", "versions: 0.33"), encoding="utf-8")  # YAML reads a float
    with pytest.raises(ValueError, match=r"entry 0 \(vLLM 0.33\): every value must be a string"):
        load_matrix(path)
