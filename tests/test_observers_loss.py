"""The loss observer: its choice equals a brute-force greedy search written here (full forwards of the model's
own ``labels=`` loss with a hand-written fake-quantized cache), a fixed seed gives the same bytes, and
``kvq solve`` refuses it without the model."""

from __future__ import annotations

import json

import pytest
import torch
from bad_input import run_in_process, snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvq
from kvq.artifacts.stats import KVStats
from kvq.data import load_documents, select_samples
from kvq.recipe.schema import parse_recipe
from kvq.solving.loss import candidate_ranges

RECIPE = {"name": "int4-loss", "format": "int4", "symmetric": False, "granularity": "head", "observer": "loss"}
CALIBRATION = dict(dataset="pydoc", samples=4, seqlen=32, seed=3, loss_windows=4)


@pytest.fixture(scope="module")
def calibrated(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("loss") / "a"
    result = kvq.calibrate(str(tiny_llama), recipe=parse_recipe(RECIPE, "test", "int4-loss"), out=out, **CALIBRATION)
    return out, result


def hand_qdq(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int4 asymmetric per KV head, written from the convention: 0 inside the range, 16 levels, zero-point."""
    lo, hi = torch.clamp(lo.float(), max=0.0), torch.clamp(hi.float(), min=0.0)
    scale = torch.clamp((hi - lo) / 15.0, min=torch.finfo(torch.float32).eps).view(1, -1, 1, 1)  # (1, heads, 1, 1)
    zp = torch.clamp(torch.round(-8.0 - lo.view(1, -1, 1, 1) / scale), -8, 7)
    q = torch.clamp(torch.round(x.float() / scale) + zp, -8, 7)
    return ((q - zp) * scale).to(x.dtype)


class HandCache(DynamicCache):
    """A cache that stores (and hands attention) K and V through ``hand_qdq`` where a range is given."""

    def __init__(self, ranges: dict, **kwargs):
        super().__init__(**kwargs)
        self.ranges = ranges

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if (layer_idx, "k") in self.ranges:
            key_states = hand_qdq(key_states, *self.ranges[(layer_idx, "k")])
        if (layer_idx, "v") in self.ranges:
            value_states = hand_qdq(value_states, *self.ranges[(layer_idx, "v")])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@pytest.mark.timeout(600)
def test_choice_equals_brute_force(calibrated, tiny_llama):
    out, result = calibrated
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    picked = select_samples(load_documents("pydoc").documents, tok, CALIBRATION["samples"], CALIBRATION["seqlen"],
                            CALIBRATION["seed"]).token_ids[:CALIBRATION["loss_windows"]]
    windows = [torch.tensor([w]) for w in picked]  # (1, n) each
    stats = KVStats.load(out / "stats.safetensors")
    recipe = result.scales.recipe

    def losses_of(ranges: dict) -> list[float]:
        out = []
        with torch.no_grad():
            for ids in windows:
                out.append(float(model(input_ids=ids, labels=ids, use_cache=True,
                                       past_key_values=HandCache(ranges, config=model.config)).loss))
        return out

    def beats(losses: list[float], reference: list[float]) -> bool:
        """The rule, written from its definition: mean(d) + 2 x sample stderr(d) < 0 over the windows."""
        d = torch.tensor(losses, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
        return bool(d.mean() + 2 * d.std(correction=1) / len(d) ** 0.5 < 0)

    candidates = {i: candidate_ranges(stats, i, recipe) for i in sorted(stats.layers)}
    names = ["minmax", "percentile", "mse", "attention"]
    assert all(list(c) == names for c in candidates.values())
    # step 1: every K and V at one observer's range; the least loss of those beating all-minmax, else minmax
    uniform = {name: losses_of({(i, w): candidates[i][name][n] for i in candidates for n, w in enumerate("kv")})
               for name in names}
    better = [name for name in names[1:] if beats(uniform[name], uniform["minmax"])]
    start = min(better, key=lambda name: sum(uniform[name])) if better else "minmax"
    chosen: dict = {(i, w): candidates[i][start][n] for i in candidates for n, w in enumerate("kv")}
    # step 2: greedy, layer by layer, K before V, against the current choice
    expected: dict = {}
    for i in sorted(stats.layers):
        expected[str(i)] = {}
        for n, which in enumerate("kv"):
            losses = {name: losses_of({**chosen, (i, which): pair[n]}) for name, pair in candidates[i].items()}
            better = [name for name in losses if name != start and beats(losses[name], losses[start])]
            best = min(better, key=lambda name: sum(losses[name])) if better else start  # first of the least
            expected[str(i)][which] = best
            chosen[(i, which)] = candidates[i][best][n]
    record = json.loads(json.loads((out / "scales.json").read_text())["metadata"]["loss_observer"])
    assert {i: {w: layer[w] for w in "kv"} for i, layer in record["layers"].items()} == expected
    assert record["windows"] == 4 and record["start"] == start
    picks = [c for layer in expected.values() for c in layer.values()]
    assert start != "minmax" or set(picks) - {"minmax"}, (start, picks)  # the search moved away from minmax
    # the scales are those of the chosen ranges
    for i, layer in result.scales.layers.items():
        lo, hi = chosen[(i, "v")]
        assert torch.equal(layer.v_scale, torch.clamp((hi.clamp(min=0) - lo.clamp(max=0)) / 15.0,
                                                      min=torch.finfo(torch.float32).eps))
    assert result.scales.loss_search.forwards > 0


@pytest.mark.timeout(600)
def test_fixed_seed_same_bytes(calibrated, tiny_llama, tmp_path):
    out, _ = calibrated
    again = tmp_path / "b"
    kvq.calibrate(str(tiny_llama), recipe=parse_recipe(RECIPE, "test", "int4-loss"), out=again, **CALIBRATION)
    for name in ("scales.safetensors", "scales.json", "stats.safetensors"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_solve_needs_the_model(calibrated, tmp_path, capsys):
    out, _ = calibrated
    recipe = tmp_path / "loss.yaml"
    recipe.write_text("format: int4\nsymmetric: false\ngranularity: head\nobserver: loss\n")
    target = tmp_path / "solved"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    before = snapshot(target)
    result = run_in_process(["solve", str(out), "--recipe", str(recipe), "--out", str(target)], capsys)
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("kvq: error: recipe loss uses observer loss") and "no model is given" in lines[0]
    assert len(lines) <= 2 and all(line.startswith("  hint:") for line in lines[1:])
    assert "Traceback" not in result.stderr
    assert snapshot(target) == before


@pytest.mark.timeout(600)
def test_solve_with_the_model_matches_calibrate(calibrated, tiny_llama, tmp_path, capsys):
    out, _ = calibrated
    recipe = tmp_path / "int4-loss.yaml"
    recipe.write_text("format: int4\nsymmetric: false\ngranularity: head\nobserver: loss\n")
    target = tmp_path / "solved"
    result = run_in_process(["solve", str(out), "--recipe", str(recipe), "--out", str(target), "--model",
                             str(tiny_llama), "--loss-windows", "4"], capsys)
    assert result.code == 0, result.stderr
    assert "observer loss: 4 window(s)" in result.stdout and "s per layer" in result.stdout
    solved, calibrated_json = (json.loads((d / "scales.json").read_text()) for d in (target, out))
    assert solved["layers"] == calibrated_json["layers"]  # the same windows re-read from the statistics' data
    assert solved["metadata"]["loss_observer"] == calibrated_json["metadata"]["loss_observer"]


@pytest.mark.timeout(600)
def test_report_shows_the_choice_per_layer(calibrated, tmp_path):
    out, result = calibrated
    written = kvq.report(out, out=tmp_path / "report")
    text = next(p for p in written if p.name == "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| loss observer |"))
    choices = result.scales.loss_search.choices
    expected = ", ".join(f"{i} {choices[i]['k']}/{choices[i]['v']}" for i in sorted(choices))
    assert "on 4 calibration windows" in row and expected in row
