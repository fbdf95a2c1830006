"""``kvq eval`` through ``kvq.cli.main``: the table as JSON, and one-line errors with exit codes."""

from __future__ import annotations

import json
import math

import pytest

from kvq.cli import main


@pytest.fixture(scope="module")
def eval_report(tiny_llama, tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "table.json"
    code = main(["eval", "--model", str(tiny_llama), "--dataset", "pydoc", "--scales", str(tiny_artifacts["int8"]),
                 "--scales", str(tiny_artifacts["fp8"]), "--recipe", "int4-dynamic-per-token",
                 "--recipe", "fp8-e4m3-scale-1.0", "--samples", "2", "--seqlen", "32", "--device", "cpu",
                 "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_eval_table_has_every_recipe_next_to_the_baseline(eval_report):
    rows = eval_report["rows"]
    names = [r["name"] for r in rows]
    # baseline, the artifacts in order, the fp8 fallback added once, then the eval-only recipes not yet there.
    assert names == ["baseline (float32)", "int8-asym-per-head", "fp8-e4m3-per-tensor", "fp8-e4m3-scale-1.0",
                     "int4-dynamic-per-token"]
    assert [r["kind"] for r in rows] == ["baseline", "static", "static", "uncalibrated", "dynamic"]
    data = eval_report["data"]
    assert data["windows"] == 2 and data["seqlen"] == 32 and data["predicted_tokens"] == 2 * 31
    base = rows[0]
    assert base["delta_ppl"] == 0.0 and base["attention_error"] is None and base["memory_saved"] == 0.0
    elements = 2 * 3 * 2 * 16  # K and V x layers x KV heads x head_dim
    assert base["kv_bytes_per_token"] == elements * 4
    assert rows[1]["kv_bytes_per_token"] == elements and rows[1]["memory_saved"] == 0.75
    assert rows[4]["kv_bytes_per_token"] == elements / 2 + 2 * 3 * 2 * 2 * 2
    for row in rows:
        assert row["ppl"] == pytest.approx(math.exp(row["mean_nll"]), rel=1e-12)
        assert row["delta_ppl"] == pytest.approx(row["ppl"] - base["ppl"], abs=1e-12)
    assert base["delta_pct_stderr"] is None
    assert all(r["delta_pct_stderr"] is not None and r["delta_pct_stderr"] >= 0 for r in rows[1:])
    for row in rows[1:]:
        attn = row["attention_error"]
        assert sorted(attn["per_layer"], key=int) == ["0", "1", "2"]
        assert attn["max"] == max(attn["per_layer"].values()) == attn["per_layer"][str(attn["max_layer"])]
        assert attn["mean"] == pytest.approx(sum(attn["per_layer"].values()) / 3)
        assert attn["max"] > 0


def test_eval_bad_inputs_are_one_line_errors(tiny_llama, tiny_artifacts, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    cases = [
        (["--scales", str(tmp_path / "missing")], 2, "missing"),
        (["--recipe", "int3-dynamic-per-token"], 2, "int8-dynamic-per-token, int4-dynamic-per-token"),
        (["--recipe", "int8-asym-per-head"], 2, "uses calibrated scales"),
        (["--scales", str(tiny_artifacts["int8"]), "--data-files", str(short), "--seqlen", "64"], 1,
         "fewer than one window"),
    ]
    for extra, want_code, want_text in cases:
        code = main(["eval", "--model", str(tiny_llama), "--dataset", "pydoc", "--samples", "1",
                     "--device", "cpu", *extra])
        err = capsys.readouterr().err
        assert code == want_code, err
        assert err.startswith("kvq: error: ") and want_text in err
        assert len(err.strip().splitlines()) <= 2


def test_eval_rejects_scales_of_another_model(tiny_artifacts, tiny_model_factory, capsys):
    other = tiny_model_factory("gemma")
    code = main(["eval", "--model", str(other), "--dataset", "pydoc", "--scales", str(tiny_artifacts["int8"]),
                 "--samples", "1", "--seqlen", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "KV heads 2 vs 1" in err and "head_dim 16 vs 32" in err
