"""``kvq validate``: the error cache, the worst-first ordering, the JSON report, the checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvq.calibrate.capture import real_tokens
from kvq.cli import main
from kvq.errors import UsageError
from kvq.evaluate.checks import check_scales_match, same_data_warning
from kvq.evaluate.validate import ErrorCache, LayerError, head_errors
from kvq.kernels import RoundTripError, roundtrip_error
from kvq.models import ModelInfo
from kvq.recipe import load_recipe
from kvq.scales import KVScales, LayerScales


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


def test_error_cache_counts_real_tokens_only_and_matches_the_kernel():
    recipe = load_recipe("int8-sym-per-head")
    scale = torch.tensor([0.02, 0.05])
    scales = KVScales(recipe, {0: LayerScales(scale, scale)})
    errors: dict[int, LayerError] = {}
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # (batch, seq): 5 real tokens
    k = torch.rand(2, 2, 4, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # |k| < 1: inside both ranges
    k[0, :, 3] = 1e6  # padding that would dominate (and clip) if it were counted
    k[1, :, 2:] = 1e6
    cache = ErrorCache(scales, errors, mask, torch.device("cpu"))
    assert cache.update(k, k.clone(), 0)[0] is k
    assert errors[0].k.count.tolist() == [5 * 8, 5 * 8]
    assert int(errors[0].k.clipped.sum()) == 0
    want = roundtrip_error(real_tokens(k, mask.bool()), scale, None, "int8")
    assert torch.equal(errors[0].k.sse, want.sse)
    # A second batch folds in.
    ErrorCache(scales, errors, None, torch.device("cpu")).update(k[:, :, :2], k[:, :, :2], 0)
    assert errors[0].k.count.tolist() == [9 * 8, 9 * 8]


def test_error_cache_on_grid_values_reports_zero_error():
    recipe = load_recipe("int8-asym-per-head")
    scale = torch.tensor([0.125, 0.5])
    zp = torch.tensor([-20, 11], dtype=torch.int32)
    q = torch.randint(-128, 128, (1, 2, 9, 4)).to(torch.float32)
    x = (q - zp.reshape(1, 2, 1, 1)) * scale.reshape(1, 2, 1, 1)  # (h,) -> (1, h, 1, 1)
    errors: dict[int, LayerError] = {}
    ErrorCache(KVScales(recipe, {0: LayerScales(scale, scale, zp, zp)}), errors, None,
               torch.device("cpu")).update(x, x, 0)
    rows = head_errors(errors)
    assert all(r.mse == 0.0 and math.isinf(r.sqnr_db) and r.clipped == 0 for r in rows)


def _info(layers=3, heads=2, dim=16, config_hash="abc") -> ModelInfo:
    return ModelInfo("m", config_hash, layers, heads, dim, "llama", None)


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
    from kvq.artifact import file_sha256
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
