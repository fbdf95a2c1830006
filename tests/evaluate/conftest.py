from __future__ import annotations

from pathlib import Path

import pytest

from kvq.calibration import CalibrationConfig, run_calibration
from kvq.data.data_spec import DataSpec
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import load_recipe
from kvq.solving.solver import solve_scales


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama calibrated once on pydoc text; int8-asym-per-head and fp8-e4m3-per-tensor scales."""
    root = tmp_path_factory.mktemp("tiny-cal")
    cfg = CalibrationConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), samples=4, seqlen=64)
    result = run_calibration(cfg, load_recipe("int8-asym-per-head"), root / "int8")
    solve_scales(result.stats, load_recipe("fp8-e4m3-per-tensor")).save(root / "fp8")
    return {"int8": root / "int8", "fp8": root / "fp8"}
