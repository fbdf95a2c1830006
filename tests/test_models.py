"""Model placement: device maps with CPU and disk offload give the statistics of the plain run, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from bad_input import assert_contract, run_in_process, snapshot
from safetensors import safe_open

from kvq.calibration import CalibrationConfig, run_calibration
from kvq.data.data_spec import DataSpec
from kvq.model.loading import load_model, parse_max_memory
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import load_recipe


def _tensors(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.slow
def test_offloaded_layers_give_bit_identical_statistics(tmp_path):
    """SmolLM2 (540 MB in float32) with 300 MB of CPU memory: some layers in memory, the rest on disk."""
    common = dict(data=DataSpec("pydoc"), samples=3, seqlen=48, batch_size=2)
    recipe = load_recipe("int8-asym-per-head")
    plain = run_calibration(CalibrationConfig(ModelSpec(None, device="cpu"), **common), recipe, tmp_path / "plain")
    offload = tmp_path / "offload"
    placed = load_model(None, device_map="auto", max_memory="cpu=300MB", offload_folder=str(offload))
    placement = set(placed.model.hf_device_map.values())
    assert placement == {"cpu", "disk"}, placement  # some modules in memory, some on disk
    del placed
    mapped = run_calibration(CalibrationConfig(ModelSpec(None, device="cpu", device_map="auto", max_memory="cpu=300MB",
                                                   offload_folder=str(offload)), **common), recipe, tmp_path / "mapped")
    a, b = _tensors(tmp_path / "plain" / "stats.safetensors"), _tensors(tmp_path / "mapped" / "stats.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mapped.stats.total_tokens == plain.stats.total_tokens
    assert json.loads((tmp_path / "plain" / "scales.json").read_text())["layers"] == \
        json.loads((tmp_path / "mapped" / "scales.json").read_text())["layers"]


def test_max_memory_is_parsed_as_accelerate_takes_it():
    assert parse_max_memory("cpu=200GiB") == {"cpu": "200GiB"}
    assert parse_max_memory(" cpu = 1.5GB ") == {"cpu": "1.5GB"}


@pytest.mark.parametrize("flags,expected", [
    (["--device-map", "everywhere"], "--device-map 'everywhere' is not one of auto"),
    (["--device-map", "auto", "--max-memory", "7=1GiB"], "names GPU 7"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "'cpu=lots' is not DEVICE=SIZE"),
    (["--device-map", "auto", "--max-memory", "tpu=1GiB"], "names device 'tpu'"),
    (["--max-memory", "cpu=1GiB"], "place the model with a device map"),
    (["--device-map", "auto", "--offload-folder", "/proc/kvq-offload"], "--offload-folder /proc/kvq-offload cannot be written"),
])
def test_bad_placement_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    argv = ["calibrate", "--model", str(tiny_llama), "--dataset", "pydoc", "--samples", "1", "--seqlen", "16",
            "--out", str(out), *flags]
    assert_contract(run_in_process(argv, capsys), 2, expected)
    assert snapshot(out) is None


def test_attention_types_read_from_each_kind_of_config():
    import tiny_models

    from kvq.model.layer_types import attention_types, sliding_window_layers

    assert attention_types(tiny_models.CONFIGS["llama"]()) == ("full_attention",) * 3
    assert attention_types(tiny_models.CONFIGS["mistral"]()) == ("sliding_attention",) * 3  # one window for all
    assert sliding_window_layers(tiny_models.CONFIGS["gemma2"]()) == (0, 2)
    assert sliding_window_layers(tiny_models.CONFIGS["qwen2"]()) == ()  # use_sliding_window false
