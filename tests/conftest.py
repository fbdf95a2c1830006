from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(TESTS))  # tiny_models


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, all with the same reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpus samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per session) a small random model of an architecture; returns its folder."""
    import tiny_models

    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = tiny_models.build(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def calibrated_tiny(tiny_model_factory, tmp_path_factory):
    """``kvq calibrate`` (the CLI) of a tiny ``arch`` with recipe ``"fp8"`` or ``"int8"`` (tiny_models.CAL_RECIPES)
    on CAL_SAMPLES pydoc samples of CAL_SEQLEN tokens, one per forward, once per session; (model folder, out)."""
    from tiny_models import CAL_RECIPES, CAL_SAMPLES, CAL_SEQLEN

    from kvq.cli import main

    done: dict[tuple[str, str], tuple[Path, Path]] = {}

    def run(arch: str, recipe: str) -> tuple[Path, Path]:
        if (arch, recipe) not in done:
            folder = tiny_model_factory(arch)
            out = tmp_path_factory.mktemp(f"cal-{arch}-{recipe}")
            code = main(["calibrate", "--model", str(folder), "--dataset", "pydoc", "--samples", str(CAL_SAMPLES),
                         "--seqlen", str(CAL_SEQLEN), "--batch-size", "1", "--device", "cpu",
                         "--recipe", CAL_RECIPES[recipe], "--out", str(out), "--force"])
            assert code == 0
            done[arch, recipe] = (folder, out)
        return done[arch, recipe]

    return run


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def modelopt_fp8_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama dressed as a ModelOpt FP8-weight checkpoint: its files (hard links) plus the
    hf_quant_config.json ModelOpt 0.47.0's HF export writes (quant_algo FP8, no KV algo yet), the only
    kind of model whose ModelOpt KV scales vLLM and SGLang apply (docs/engines.md)."""
    import json
    import os

    folder = tmp_path_factory.mktemp("modelopt-fp8")
    for path in tiny_llama.iterdir():
        os.link(path, folder / path.name)
    (folder / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    }))
    return folder
