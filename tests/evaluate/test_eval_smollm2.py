"""The real default model end to end: calibrate on C4, validate on held-out C4, eval on WikiText-2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvq.cli import main
from kvq.data import load_documents
from kvq.evaluate import eval_windows, window_nll
from kvq.models import load_model

pytestmark = pytest.mark.slow


def test_smollm2_validate_and_eval(shared_data, tmp_path, capsys):
    out = tmp_path / "cal"
    assert main(["calibrate", "--dataset", "c4", "--data-files", str(shared_data / "c4-en-validation-sample.jsonl"),
                 "--samples", "4", "--seqlen", "64", "--recipe", "int8-asym-per-head", "--out", str(out),
                 "--device", "cpu"]) == 0

    report_path = tmp_path / "validate.json"
    assert main(["validate", str(out), "--dataset", "c4", "--data-files",
                 str(shared_data / "c4-en-validation-heldout.jsonl"), "--samples", "2", "--seqlen", "64",
                 "--device", "cpu", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["warnings"] == []  # held-out data: no in-sample warning, same model
    heads = report["heads"]
    assert len(heads) == 30 * 3 * 2
    sqnrs = [math.inf if h["sqnr_db"] is None else h["sqnr_db"] for h in heads]
    assert sqnrs == sorted(sqnrs)

    wikitext = shared_data / "wikitext-2-raw-test.txt"
    table_path = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--data-files", str(wikitext), "--scales", str(out), "--recipe", "int4-dynamic-per-token",
                 "--samples", "2", "--seqlen", "64", "--device", "cpu", "--json", str(table_path)]) == 0
    printed = capsys.readouterr().out
    assert "int8-asym-per-head" in printed and "int4-dynamic-per-token" in printed
    table = json.loads(table_path.read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["baseline (float32)", "int8-asym-per-head", "int4-dynamic-per-token"]
    assert table["data"]["windows"] == 2 and table["data"]["predicted_tokens"] == 2 * 63

    # The baseline is the plain model forward over the first two 64-token windows of WikiText-2.
    loaded = load_model(None, device="cpu")
    text = wikitext.read_text(encoding="utf-8")
    ids = loaded.tokenizer(text[:4000])["input_ids"][:128]
    windows = eval_windows(load_documents("wikitext2", [str(wikitext)]).documents, loaded.tokenizer, 64, 2)
    assert windows.input_ids.reshape(-1).tolist() == ids
    with torch.inference_mode():
        nll = sum(window_nll(loaded.model, windows.input_ids[r : r + 1], None) for r in range(2))
    assert rows["baseline (float32)"]["ppl"] == math.exp(nll / 126)
    assert rows["int4-dynamic-per-token"]["attention_error"]["max"] > 0
