"""Clean inputs inspect clean (exit 0): kvq's own exports of every format, and a checkpoint kvq did not write.

Expected values are the hand-made dyadic scales (tests/export/export_helpers.filled: K = 0.0625 * (layer
+ 1) * step, V = 0.03125 * (layer + 1) * step) or those set on the compressed-tensors model, never a
re-run of kvq's reader.
"""

from __future__ import annotations

import pytest
from bad_input import snapshot
from export_helpers import model_metadata, recipe
from inspect_helpers import CT_HEADS, CT_KV_HEADS, CT_LAYERS, ct_k, ct_q, ct_v, inspect_json

from kvq.export import export_artifact


def _values(report: dict, role: str, rank: int | None = None) -> dict[int, list[float]]:
    return {t["layer"]: t["values"] for t in report["tensors"] if t["role"] == role and t["rank"] == rank}


def test_compressed_tensors_checkpoint_is_clean(ct_checkpoint, tmp_path, capsys):
    before = snapshot(ct_checkpoint)
    code, report, out = inspect_json([ct_checkpoint], tmp_path, capsys)
    assert snapshot(ct_checkpoint) == before  # nothing written but --json
    assert code == 0, report["defects"]
    assert report["kind"] == "compressed-tensors" and report["defects"] == [] and report["clean"]
    assert report["scheme"]["number"] == "fp8_e4m3" and report["scheme"]["granularity"] == "tensor"
    assert report["shape"]["num_layers"] == CT_LAYERS and report["shape"]["num_kv_heads"] == CT_KV_HEADS
    assert _values(report, "k") == {i: [ct_k(i)] for i in range(CT_LAYERS)}
    assert _values(report, "v") == {i: [ct_v(i)] for i in range(CT_LAYERS)}
    names = {t["name"] for t in report["tensors"]}
    assert names == {f"model.layers.{i}.self_attn.{w}_scale" for i in range(CT_LAYERS) for w in "kv"}
    assert {(r["engine"], r["verdict"]) for r in report["engines"]} >= {("vLLM", "applied"), ("SGLang", "applied")}
    assert "no defects" in out


def test_compressed_tensors_per_head_with_queries_is_clean(ct_head_checkpoint, tmp_path, capsys):
    code, report, _ = inspect_json([ct_head_checkpoint, "--tp", "2"], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["granularity"] == "head"
    k = [t for t in report["tensors"] if t["role"] == "k"]
    assert {tuple(t["shape"]) for t in k} == {(CT_KV_HEADS, 1, 1)}
    assert _values(report, "q") == {i: [ct_q(i, h) for h in range(CT_HEADS)] for i in range(CT_LAYERS)}
    verdicts = {(r["engine"], r["backend"]): r["verdict"] for r in report["engines"]}
    assert verdicts[("SGLang", "all")] == "ignored"  # SGLang reads per-tensor compressed-tensors scales only


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_kvq_vllm_export_is_clean(tiny_llama, make_artifact, tmp_path, capsys, granularity):
    artifact = make_artifact(recipe("fp8_e4m3", True, granularity), model_metadata(tiny_llama))
    out = tmp_path / "fp8kv"
    export_artifact(artifact, "vllm", out=out, model=str(tiny_llama))
    code, report, _ = inspect_json([out, "--tp", "2"], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["kind"] == "compressed-tensors" and report["granularity"] == granularity
    heads = 2  # tiny llama: 2 KV heads
    want = {i: [0.0625 * (i + 1) * s for s in range(1, heads + 1)] if granularity == "head" else [0.0625 * (i + 1)]
            for i in range(3)}
    assert _values(report, "k") == want


def test_kvq_modelopt_export_is_clean(modelopt_fp8_model, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(modelopt_fp8_model))
    out = tmp_path / "modelopt"
    export_artifact(artifact, "modelopt", out=out, model=str(modelopt_fp8_model))
    code, report, _ = inspect_json([out], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["kind"] == "modelopt" and report["scheme"]["number"] == "fp8_e4m3"
    assert _values(report, "v") == {i: [0.03125 * (i + 1)] for i in range(3)}
    assert {t["name"] for t in report["tensors"] if t["role"] == "k"} == {
        f"model.layers.{i}.self_attn.k_proj.k_scale" for i in range(3)}
    # merged into a ModelOpt FP8-weight checkpoint: only the rows of that kind (vLLM applies it; TRT-LLM's
    # PyTorch backend ignores FP8 KV scales), none of the KV-only kind
    weights = {row["weights"] for row in report["engines"]}
    assert weights <= {"fp8", "any"}, weights
    verdicts = {(row["engine"], row["verdict"]) for row in report["engines"]}
    assert ("vLLM", "applied") in verdicts and ("TensorRT-LLM", "ignored") in verdicts, verdicts


@pytest.mark.parametrize("tp", [1, 2])
def test_kvq_sglang_json_export_is_clean(tiny_llama, make_artifact, tmp_path, capsys, tp):
    artifact = make_artifact(recipe("fp8_e4m3", True, "head"), model_metadata(tiny_llama))
    out = tmp_path / "scales.json"
    export_artifact(artifact, "sglang-json", out=out, tp=tp, reduce="max" if tp == 1 else None, legacy=True)
    code, report, _ = inspect_json([out, "--tp", tp, "--model", tiny_llama], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["kind"] == "sglang-json" and report["ranks"] == tp
    # max(K, V) over the rank's heads; K head h = 0.0625 (i+1)(h+1) > V head h = 0.03125 (i+1)(h+1)
    for r in range(tp):
        heads = [1, 2] if tp == 1 else [r + 1]
        assert _values(report, "kv", r) == {i: [0.0625 * (i + 1) * max(heads)] for i in range(3)}


@pytest.mark.parametrize("tp", [1, 2])
def test_kvq_trtllm_export_is_clean(tiny_llama, make_artifact, tmp_path, capsys, tp):
    artifact = make_artifact(recipe("int8", True, "tensor"), model_metadata(tiny_llama))
    out = tmp_path / "trt"
    export_artifact(artifact, "trtllm", out=out, tp=tp)
    code, report, _ = inspect_json([out, "--tp", tp, "--model", tiny_llama], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["kind"] == "trtllm" and report["scheme"]["number"] == "int8" and report["ranks"] == tp
    assert _values(report, "kv", tp - 1) == {i: [0.0625 * (i + 1)] for i in range(3)}


def test_kvq_lmdeploy_export_is_clean(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("int8", False, "tensor"), model_metadata(tiny_llama))
    out = tmp_path / "lmdeploy"
    export_artifact(artifact, "lmdeploy", out=out, tp=2, legacy=True)
    code, report, _ = inspect_json([out, "--tp", "2", "--model", tiny_llama], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["kind"] == "lmdeploy" and report["ranks"] == 2
    assert _values(report, "v", 1) == {i: [0.03125 * (i + 1)] for i in range(3)}
    # filled(): zero point z = layer - 2 per tensor; LMDeploy's centre is -z * scale
    offsets = {t["layer"]: t["offset"] for t in report["tensors"] if t["role"] == "k" and t["rank"] == 0}
    assert offsets == {i: [-(i - 2) * 0.0625 * (i + 1) + 0.0] for i in range(3)}


@pytest.mark.parametrize("fmt,symmetric,granularity", [("fp8_e4m3", True, "channel"), ("int8", False, "head")])
def test_kvq_artifact_is_clean(tiny_llama, make_artifact, tmp_path, capsys, fmt, symmetric, granularity):
    artifact = make_artifact(recipe(fmt, symmetric, granularity), model_metadata(tiny_llama))
    code, report, out = inspect_json([artifact, "--model", tiny_llama, "--tp", "2"], tmp_path, capsys)
    assert code == 0, report["defects"]
    assert report["kind"] == "kvq-artifact" and report["engines"] == []
    assert len(report["tensors"]) == 2 * 3
    assert "kvq export-scales" in out
