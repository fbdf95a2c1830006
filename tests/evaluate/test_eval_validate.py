"""``kvq validate``: the error cache, the worst-first ordering, the JSON report, the checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.cli import main
from kvq.data.data_spec import DataSpec
from kvq.errors import UsageError
from kvq.evaluation.preflight import check_scales_match, same_data_warning
from kvq.evaluation.round_trip import LayerError, ValidateConfig, head_errors, run_validation
from kvq.kernels import RoundTripError
from kvq.model.model_spec import KVShape, ModelInfo, ModelSpec
from kvq.recipe.schema import load_recipe


def _err(sse: list[float], signal: list[float], clipped: list[int]) -> RoundTripError:
    n = len(sse)
    return RoundTripError(
        sse=torch.tensor(sse, dtype=torch.float64),
        signal=torch.tensor(signal, dtype=torch.float64),
        max_abs_err=torch.zeros(n),
        clipped=torch.tensor(clipped, dtype=torch.int64),
        count=torch.full((n,), 100, dtype=torch.int64),
    )


def test_heads_are_ordered_worst_sqnr_first():
    errors = {
        0: LayerError(k=_err([1.0, 0.0], [100.0, 5.0], [0, 0]), v=_err([10.0, 1.0], [100.0, 1000.0], [0, 0])),
        1: LayerError(k=_err([0.0, 1.0], [5.0, 10.0], [3, 0]), v=_err([1.0, 1.0], [10.0, 10.0], [0, 7])),
    }
    rows = head_errors(errors)
    assert len(rows) == 8
    sqnrs = [r.sqnr_db for r in rows]
    assert sqnrs == sorted(sqnrs)
    # 10 dB: layer 0 V head 0 and the three 10 dB heads of layer 1; ties go by clip rate, then position.
    assert [(r.layer, r.kv_head, r.tensor) for r in rows[:4]] == [(1, 1, "v"), (0, 0, "v"), (1, 0, "v"), (1, 1, "k")]
    assert rows[0].sqnr_db == pytest.approx(10.0)
    assert [(r.layer, r.kv_head, r.tensor) for r in rows[-2:]] == [(1, 0, "k"), (0, 1, "k")]  # exact: +inf last
    assert math.isinf(rows[-1].sqnr_db)


# --- the report against an independent computation ----------------------------------------------

SEQLEN = 40


def _documents(path) -> list[str]:
    """Five texts of Python's documentation, 2 shorter than SEQLEN tokens (padded in a batch), written
    as jsonl; with --samples 5, validate takes the first SEQLEN tokens of each, in some order."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    texts = [topics[keys[i]][:n] for i, n in ((3, 60), (10, 400), (20, 1000), (30, 90), (40, 2000))]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _model_cache(model_dir, texts: list[str]) -> dict[str, dict[int, np.ndarray]]:
    """K and V of every layer as the model's own cache holds them, each sample run alone (no padding),
    concatenated along tokens: {"k"|"v": {layer: (kv_heads, tokens, head_dim) float32}}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    parts: dict[str, dict[int, list[torch.Tensor]]] = {"k": {}, "v": {}}
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"][:SEQLEN]])  # (1, tokens)
            cache = model(input_ids=ids, use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):  # keys / values: (1, kv_heads, tokens, head_dim)
                parts["k"].setdefault(i, []).append(layer.keys[0])
                parts["v"].setdefault(i, []).append(layer.values[0])
    return {w: {i: torch.cat(xs, dim=1).numpy() for i, xs in by_layer.items()} for w, by_layer in parts.items()}


def _int_asym_oracle(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy: x_hat = (clip(round(x / s) + zp, -128, 127) - zp) * s in float32 (np.round: half to even),
    and whether round(x / s) + zp fell outside [-128, 127] (clipped). x (h, n, d), s and zp (h,)."""
    s = scale.astype(np.float32)[:, None, None]  # (h,) -> (h, 1, 1)
    z = zp.astype(np.float32)[:, None, None]  # (h,) -> (h, 1, 1)
    r = np.round(x / s) + z
    return ((np.clip(r, -128, 127) - z) * s).astype(np.float32), (r < -128) | (r > 127)


def _fp8_oracle(x: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' fp8 e4m3 fake-quantize with a per-tensor scale; clipped where |x / s| > 464,
    the midpoint of e4m3's largest value 448 and the next grid step 480."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor")
    s = torch.from_numpy(scale.astype(np.float32)).reshape(1, 1, 1)  # () -> (1, 1, 1)
    x_hat = ct_fake_quantize(torch.from_numpy(x), s, None, args).numpy()
    return x_hat, np.abs(x / s.numpy()) > 464


@pytest.mark.parametrize(("artifact", "batch_size", "rtol"), [("int8", 1, 1e-9), ("int8", 2, 1e-5), ("fp8", 2, 1e-5)])
def test_validate_report_matches_an_independent_computation(tiny_llama, tiny_artifacts, tmp_path, artifact,
                                                            batch_size, rtol):
    """Per (layer, KV head, K|V): SQNR, MSE, RMSE, max |error|, clipped and count, computed here by hand
    from the model's own cache and an independent quantizer (numpy for int8, compressed-tensors for
    fp8). One sample per batch computes the same K/V as the oracle (equal up to float64 summation
    order); padded batches of 2 may round K/V differently in float32 (relative ~1e-7 seen)."""
    data = tmp_path / "docs.jsonl"
    texts = _documents(data)
    result = run_validation(ValidateConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="docs", data_files=[str(data)]), samples=5, seqlen=SEQLEN, batch_size=batch_size, scales=str(tiny_artifacts[artifact])))
    cached = _model_cache(tiny_llama, texts)
    scales = KVScales.load(tiny_artifacts[artifact])
    rows = {(r.layer, r.kv_head, r.tensor): r for r in result.heads()}
    assert len(rows) == 3 * 2 * 2
    clipped_total = 0
    for which in ("k", "v"):
        for i, x in cached[which].items():
            layer = scales.layers[i]
            if artifact == "int8":
                x_hat, clipped = _int_asym_oracle(x, layer.scale(which).numpy(), layer.zero_point(which).numpy())
            else:
                x_hat, clipped = _fp8_oracle(x, layer.scale(which).numpy())
            err = (x - x_hat).astype(np.float64)  # the float32 difference, squared in float64
            for h in range(x.shape[0]):
                row = rows[(i, h, which)]
                n = x[h].size
                sse, signal = float((err[h] ** 2).sum()), float((x[h].astype(np.float64) ** 2).sum())
                assert row.count == n
                assert row.mse == pytest.approx(sse / n, rel=rtol)
                assert row.rmse == pytest.approx(math.sqrt(sse / n), rel=rtol)
                assert row.sqnr_db == pytest.approx(10 * math.log10(signal / sse), rel=rtol)
                assert row.max_abs_err == pytest.approx(float(np.abs(err[h]).max()), rel=rtol)
                assert row.clipped == int(clipped[h].sum())
                assert row.clip_rate == row.clipped / n
                clipped_total += row.clipped
    assert result.tokens * 16 == rows[(0, 0, "k")].count  # every real token, no padding
    assert artifact == "fp8" or clipped_total > 0  # held-out text: some values fall outside the range


def _info(layers=3, heads=2, dim=16, config_hash="abc") -> ModelInfo:
    return ModelInfo("m", config_hash, KVShape(layers, heads, dim), "llama")


def test_scales_must_fit_the_model():
    recipe = load_recipe("int8-sym-per-head")
    meta = {"model": "cal-model", "num_layers": "3", "num_kv_heads": "2", "head_dim": "16", "config_hash": "abc"}
    scales = KVScales(recipe, {i: LayerScales(torch.ones(2), torch.ones(2)) for i in range(3)}, meta)
    assert check_scales_match(scales, _info(), "s") == []
    with pytest.raises(UsageError) as wrong:
        check_scales_match(scales, _info(heads=4), "s")
    assert "KV heads 2 vs 4" in wrong.value.message and "cal-model" in wrong.value.message
    warnings = check_scales_match(scales, _info(config_hash="def"), "s")
    assert len(warnings) == 1 and "abc" in warnings[0] and "def" in warnings[0]
    no_meta = KVScales(recipe, {i: LayerScales(torch.ones(5), torch.ones(5)) for i in range(3)})
    with pytest.raises(UsageError, match=r"shape \(5,\)"):
        check_scales_match(no_meta, _info(), "s")


def test_same_data_warning_compares_file_contents(tmp_path):
    from kvq.artifacts.files import file_sha256
    from kvq.data import LoadedDataset

    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("same text")
    b.write_text("same text")
    c.write_text("other text")
    meta = {"data_files": json.dumps([{"path": str(a), "sha256": file_sha256(a)}]), "dataset_origin": "local files"}
    assert "in-sample" in same_data_warning(meta, LoadedDataset("x", [], "local files", (str(b),)), "s")
    assert same_data_warning(meta, LoadedDataset("x", [], "local files", (str(c),)), "s") is None
    pydoc = {"data_files": "[]", "dataset_origin": "pydoc_data.topics (CPython documentation)"}
    assert same_data_warning(pydoc, LoadedDataset("pydoc", [], pydoc["dataset_origin"]), "s") is not None


def test_validate_command_writes_a_worst_first_report(tiny_llama, tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["validate", str(tiny_artifacts["int8"]), "--model", str(tiny_llama), "--dataset", "pydoc",
                 "--samples", "3", "--seqlen", "40", "--batch-size", "2", "--device", "cpu", "--json", str(out),
                 "--top", "5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "worst 5 of 12" in printed and "in-sample" in printed  # calibrated on pydoc too
    report = json.loads(out.read_text())
    assert report["report"] == "validate"
    assert report["recipe"]["name"] == "int8-asym-per-head"
    assert report["model"]["num_layers"] == 3 and report["data"]["samples"] == 3
    heads = report["heads"]
    assert len(heads) == 3 * 2 * 2
    assert {(h["layer"], h["kv_head"], h["tensor"]) for h in heads} == {
        (i, h, t) for i in range(3) for h in range(2) for t in "kv"}
    sqnrs = [math.inf if h["sqnr_db"] is None else h["sqnr_db"] for h in heads]
    assert sqnrs == sorted(sqnrs)
    assert all(h["count"] == report["data"]["tokens"] * 16 for h in heads)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1, 2]
    assert any("in-sample" in w for w in report["warnings"])
    # The default report path is beside the scales.
    assert main(["validate", str(tiny_artifacts["int8"]), "--model", str(tiny_llama), "--dataset", "pydoc",
                 "--samples", "1", "--seqlen", "16", "--device", "cpu"]) == 0
    assert json.loads((tiny_artifacts["int8"] / "validate.json").read_text())["data"]["samples"] == 1


def test_validate_bad_inputs(tiny_artifacts, tiny_model_factory, tmp_path, capsys):
    code = main(["validate", str(tmp_path / "nope"), "--dataset", "pydoc"])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "does not exist" in err
    assert len(err.strip().splitlines()) <= 2  # the error line and its hint
    other = tiny_model_factory("gemma")  # 1 KV head of head_dim 32
    code = main(["validate", str(tiny_artifacts["int8"]), "--model", str(other), "--dataset", "pydoc",
                 "--samples", "1", "--seqlen", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "KV heads 2 vs 1" in err and "head_dim 16 vs 32" in err
