"""The Python API: the CLI is a thin layer over it (byte-identical artifacts), and it takes loaded models."""

from __future__ import annotations

import pytest
import torch

import kvq
from kvq.artifacts.stats import KVStats
from kvq.cli import main
from kvq.errors import UsageError

ARTIFACTS = ("stats.safetensors", "scales.safetensors", "scales.json")
COMMON = dict(dataset="pydoc", samples=3, seqlen=32, batch_size=2, recipe="int8-asym-per-head")


def cli_args(model, out) -> list[str]:
    return ["calibrate", "--model", str(model), "--dataset", "pydoc", "--samples", "3", "--seqlen", "32",
            "--batch-size", "2", "--recipe", "int8-asym-per-head", "--out", str(out)]


@pytest.fixture(scope="module")
def cli_out(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "cli"
    assert main(cli_args(tiny_llama, out)) == 0
    return out


def test_api_and_cli_write_byte_identical_artifacts(tiny_llama, cli_out, tmp_path, monkeypatch):
    calls = []
    api = kvq.calibrate(str(tiny_llama), out=tmp_path / "api", progress=lambda done, total: calls.append((done, total)),
                        **COMMON)
    for name in ARTIFACTS:
        assert (tmp_path / "api" / name).read_bytes() == (cli_out / name).read_bytes(), name
    assert sorted(p.name for p in api.files) == sorted(ARTIFACTS)
    assert calls == [(0, 3), (2, 3), (3, 3)]  # 3 samples in batches of 2
    monkeypatch.chdir(tmp_path / "api")  # without out=, nothing is written anywhere
    quiet = kvq.calibrate(str(tiny_llama), **COMMON)
    assert quiet.files == [] and sorted(p.name for p in (tmp_path / "api").iterdir()) == sorted(ARTIFACTS)
    assert quiet.stats.to_bytes() == (cli_out / "stats.safetensors").read_bytes()
    assert quiet.scales.to_files() == {n: (cli_out / n).read_bytes() for n in ARTIFACTS[1:]}


def test_solve_and_export_take_objects_or_paths(cli_out, tmp_path):
    from_path = kvq.solve(cli_out, "fp8-e4m3-per-tensor")
    from_object = kvq.solve(KVStats.load(cli_out / "stats.safetensors"), "fp8-e4m3-per-tensor",
                            out=tmp_path / "fp8")
    assert from_path.to_files() == from_object.to_files()
    assert main(["solve", str(cli_out), "--recipe", "fp8-e4m3-per-tensor", "--out", str(tmp_path / "cli")]) == 0
    for name in ARTIFACTS[1:]:
        assert (tmp_path / "fp8" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    by_object = kvq.export_scales(from_object, "sglang-json", out=tmp_path / "a.json", legacy=True)
    by_path = kvq.export_scales(tmp_path / "fp8", "sglang-json", out=tmp_path / "b.json", legacy=True)
    assert by_object.written == ["a.json"] and by_path.written == ["b.json"]
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_a_loaded_model_gives_the_statistics_of_its_path(tiny_llama, cli_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    model.train()  # the caller's mode: calibrated in eval mode, given back as it was
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = kvq.calibrate(model, tokenizer, **COMMON)
    assert model.training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert result.stats.to_bytes() == (cli_out / "stats.safetensors").read_bytes()
    assert kvq.calibrate(model, **COMMON).stats.to_bytes() == result.stats.to_bytes()  # tokenizer from the folder


def test_validate_and_evaluate_take_a_loaded_model(tiny_llama, cli_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    windows = []
    by_object = kvq.evaluate(model, tokenizer, scales=cli_out, dataset="pydoc", samples=3, seqlen=32, batch_size=2,
                             progress=lambda done, total: windows.append((done, total)))
    by_path = kvq.evaluate(str(tiny_llama), scales=[cli_out], dataset="pydoc", samples=3, seqlen=32, batch_size=2)
    assert windows == [(0, 3), (2, 3), (3, 3)]
    assert [e.window_nll for e in by_object.measurement.entries] == [e.window_nll for e in by_path.measurement.entries]
    assert by_object.measurement.baseline.window_nll == by_path.measurement.baseline.window_nll
    checked = kvq.validate(cli_out, model, tokenizer, dataset="pydoc", samples=2, seqlen=32)
    again = kvq.validate(cli_out, str(tiny_llama), dataset="pydoc", samples=2, seqlen=32)
    assert [h.sqnr_db for h in checked.heads()] == [h.sqnr_db for h in again.heads()]


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, t: kvq.calibrate(m, t, device="cpu", **COMMON), "device choose how kvq loads a model"),
    (lambda m, t: kvq.calibrate(str(m.config._name_or_path), t, **COMMON), "a tokenizer goes with a loaded model"),
    (lambda m, t: kvq.calibrate(42, **COMMON), "model must be a path, a hub id or a loaded transformers model"),
    (lambda m, t: kvq.calibrate(m, t, **{**COMMON, "samples": 0}), "samples=0 must be a whole number"),
    (lambda m, t: kvq.calibrate(m, t, **COMMON, resume=True), "none is given"),
])
def test_bad_api_arguments_are_refused_before_any_work(tiny_llama, call, message):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with pytest.raises(UsageError, match=message):
        call(model, object())


def test_a_misspelt_keyword_is_a_type_error(tiny_llama):
    with pytest.raises(TypeError, match="unexpected keyword argument 'sampels'"):
        kvq.calibrate(str(tiny_llama), sampels=3)
