"""The same inputs and seed give byte-identical artifacts (no time, host or path of the run inside)."""

from kvq.calibration import CalibrationConfig, run_calibration
from kvq.data.data_spec import DataSpec
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import load_recipe


def test_two_runs_write_the_same_bytes(tiny_llama, tmp_path):
    cfg = CalibrationConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), samples=3, seqlen=48, batch_size=2, seed=5)
    recipe = load_recipe("int8-asym-per-head")
    first = run_calibration(cfg, recipe, tmp_path / "a")
    second = run_calibration(cfg, recipe, tmp_path / "b")
    names = sorted(p.name for p in first.files)
    assert names == sorted(p.name for p in second.files) == ["scales.json", "scales.safetensors", "stats.safetensors"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
