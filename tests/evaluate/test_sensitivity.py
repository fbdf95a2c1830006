"""Per-layer sensitivity and ``kvq plan`` on models whose sensitive layer is known by construction.

* ``sharp``: the tiny Llama with layer 1's q_proj and k_proj scaled by 20: its attention logits are
  400 times larger, so its softmax is sharp and int4 error in K moves it a lot; the attention-output
  error of layer 1 must come out the largest.
* ``muted``: the tiny Llama with layers 0 and 2's o_proj set to zero: their attention output is zero
  whatever K/V hold, so quantizing only one of them changes nothing (NLL change exactly 0, by
  arithmetic), while layer 1 is the only layer whose K/V reach the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvq.artifacts.scales import KVScales
from kvq.calibration import CalibrationConfig, run_calibration
from kvq.cli import main
from kvq.data import load_documents
from kvq.data.data_spec import DataSpec
from kvq.evaluation import StaticQuantizer, eval_windows
from kvq.evaluation.sensitivity import measure_sensitivity, skip_plan_quantizer
from kvq.model.loading import load_model
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import load_recipe

SENSITIVE = 1


def _edited(source: Path, folder: Path, edit) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        edit(model.model.layers)
    model.save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder / "model")
    cfg = CalibrationConfig(model=ModelSpec(model=str(folder / "model"), device="cpu"), data=DataSpec(dataset="pydoc"), samples=4, seqlen=64)
    run_calibration(cfg, load_recipe("int4-asym-per-head"), folder / "int4")
    return folder


def _sharpen(layers) -> None:
    layers[SENSITIVE].self_attn.q_proj.weight.mul_(20.0)
    layers[SENSITIVE].self_attn.k_proj.weight.mul_(20.0)


def _mute_others(layers) -> None:
    for i, layer in enumerate(layers):
        if i != SENSITIVE:
            layer.self_attn.o_proj.weight.zero_()


@pytest.fixture(scope="module")
def sharp(tiny_llama, tmp_path_factory) -> Path:
    return _edited(tiny_llama, tmp_path_factory.mktemp("sharp"), _sharpen)


@pytest.fixture(scope="module")
def muted(tiny_llama, tmp_path_factory) -> Path:
    return _edited(tiny_llama, tmp_path_factory.mktemp("muted"), _mute_others)


def _sensitivity(folder: Path, by: str, skip: int | None = None):
    loaded = load_model(str(folder / "model"), device="cpu")
    windows = eval_windows(load_documents("pydoc", purpose="evaluation").documents, loaded.tokenizer, 32, 2)
    quantizer = StaticQuantizer(KVScales.load(folder / "int4"))
    if skip is not None:
        return skip_plan_quantizer(loaded.model, windows, quantizer, loaded.info.num_layers, skip, by)
    return measure_sensitivity(loaded.model, windows, quantizer, loaded.info.num_layers, by)


def test_attention_sensitivity_finds_the_sharpened_layer(sharp):
    assert _sensitivity(sharp, "attention", skip=1).skip_layers == (SENSITIVE,)
    sens = _sensitivity(sharp, "attention")
    assert sens.order()[0] == SENSITIVE
    others = [v for i, v in sens.per_layer.items() if i != SENSITIVE]
    assert sens.per_layer[SENSITIVE] > 2 * max(others) > 0


def test_perplexity_sensitivity_is_exactly_zero_for_layers_that_reach_nothing(muted):
    sens = _sensitivity(muted, "perplexity")
    assert [sens.per_layer[i] for i in (0, 2)] == [0.0, 0.0]
    assert [sens.stderr[i] for i in (0, 2)] == [0.0, 0.0]
    assert sens.per_layer[SENSITIVE] != 0.0
    assert sens.per_layer[SENSITIVE] == pytest.approx(sens.all_layers_delta_nll, abs=1e-12)  # the only one that counts
    # the attention measure agrees: a layer whose attention output is all zeros has no error to measure
    attn = _sensitivity(muted, "attention")
    assert attn.per_layer[0] == attn.per_layer[2] == 0.0 < attn.per_layer[SENSITIVE]


@pytest.mark.parametrize("by", ["attention", "perplexity"])
def test_kvq_plan_skip_1_keeps_the_sensitive_layer_unquantized(sharp, muted, by, capsys):
    folder = sharp if by == "attention" else muted
    code = main(["plan", str(folder / "int4"), "--model", str(folder / "model"), "--dataset", "pydoc", "--skip", "1",
                 "--by", by, "--samples", "2", "--seqlen", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    plan = json.loads((folder / "int4" / "plan.json").read_text())
    assert plan["skip_layers"] == [SENSITIVE] and plan["sensitivity"]["by"] == by
    assert plan["sensitivity"]["order"][0] == SENSITIVE and plan["num_layers"] == 3
    assert f"sensitivity by {by}" in out
    # int4 has no vLLM export: the plan says so instead of printing a flag that would not apply
    assert plan["engines"]["vllm"]["applies"] is False and "--kv-cache-dtype-skip-layers" not in out
    # KV bytes: 2 layers of int4 codes, 1 layer float32 (2 x 2 KV heads x 16 per layer)
    assert plan["kv_bytes_per_token"] == {"plan": 2 * 64 * 0.5 + 64 * 4, "all_quantized": 3 * 64 * 0.5,
                                          "unquantized": 3 * 64 * 4}
