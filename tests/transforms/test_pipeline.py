"""Transforms through the whole product: recipe -> calibrate -> solve -> export / validate / eval.

Oracles: a calibration of the untransformed model on the same samples (k' * s == k for smoothed keys),
the model's own checkpoint tensors (untouched ones byte-equal after export), transformers +
compressed-tensors loading the exported checkpoint (its own fp8 KV cache, its own ``labels=`` loss).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from kvq.artifacts.files import TRANSFORMS_FILE
from kvq.calibration import CalibrationConfig, run_calibration
from kvq.data.data_spec import DataSpec
from kvq.errors import UsageError
from kvq.evaluation.perplexity import EvalConfig, run_eval
from kvq.export import export_artifact
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import parse_recipe
from kvq.solving.from_stats import solve_artifact

SAMPLES, SEQLEN = 4, 64


def _recipe(number: str, granularity: str, transforms: list, symmetric: bool = True):
    data = {"format": number, "symmetric": symmetric, "granularity": granularity, "transforms": transforms}
    return parse_recipe(data, "test", f"{number}-{granularity}-{len(transforms)}t")


def _calibrate(model, recipe, out):
    cfg = CalibrationConfig(model=ModelSpec(model=str(model), device="cpu"), data=DataSpec(dataset="pydoc"), samples=SAMPLES, seqlen=SEQLEN)
    return run_calibration(cfg, recipe, out)


@pytest.fixture(scope="module")
def calibrated(tiny_llama, tmp_path_factory):
    """The tiny Llama calibrated on the same samples without transforms, with smooth-keys, and with both."""
    root = tmp_path_factory.mktemp("transforms-cal")
    return {
        "plain": _calibrate(tiny_llama, _recipe("fp8_e4m3", "tensor", []), root / "plain"),
        "smooth": _calibrate(tiny_llama, _recipe("fp8_e4m3", "tensor", ["smooth-keys"]), root / "smooth"),
        "both": _calibrate(tiny_llama, _recipe("fp8_e4m3", "tensor", ["smooth-keys", "rotate-values"]), root / "both"),
        "root": root,
    }


def test_calibration_records_the_transforms_and_sees_the_transformed_keys(calibrated):
    plain, smooth = calibrated["plain"], calibrated["smooth"]
    folder = calibrated["root"] / "smooth"
    assert sorted(p.name for p in folder.iterdir()) == ["scales.json", "scales.safetensors", "stats.safetensors",
                                                      TRANSFORMS_FILE]
    assert not (calibrated["root"] / "plain" / TRANSFORMS_FILE).exists()
    assert smooth.stats.metadata["transforms"] == '[{"alpha": 0.5, "name": "smooth-keys"}]'
    with safe_open(str(folder / TRANSFORMS_FILE), "pt") as fh:
        factors = {i: fh.get_tensor(f"layers.{i}.k_factor") for i in range(3)}
        assert fh.metadata()["weights_hash"] == smooth.scales.metadata["weights_hash"]
    for i in range(3):
        s = factors[i].to(torch.float32)  # (kv_heads, head_dim), positive
        assert (s > 0).all()
        # K' = K / s per channel, so max(K') * s is max(K) of the untransformed model, on the same tokens
        torch.testing.assert_close(smooth.stats.layers[i].k.max * s, plain.stats.layers[i].k.max,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(smooth.stats.layers[i].v.max, plain.stats.layers[i].v.max, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(smooth.stats.layers[i].k.max, plain.stats.layers[i].k.max) for i in range(3))


def test_solve_keeps_the_transforms_with_the_scales_and_refuses_other_ones(calibrated, tmp_path):
    source = calibrated["root"] / "both"
    _, scales, written = solve_artifact(source, _recipe("fp8_e4m3", "head", ["smooth-keys", "rotate-values"]),
                                        tmp_path / "solved")
    assert (tmp_path / "solved" / TRANSFORMS_FILE).read_bytes() == (source / TRANSFORMS_FILE).read_bytes()
    assert scales.metadata["weights_hash"] == calibrated["both"].scales.metadata["weights_hash"]
    with pytest.raises(UsageError, match="calibrated on a model transformed with"):
        solve_artifact(source, _recipe("fp8_e4m3", "head", []), tmp_path / "other")
    with pytest.raises(UsageError, match="calibrated on a model transformed with"):
        solve_artifact(source, _recipe("fp8_e4m3", "head", ["rotate-values"]), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def _window_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_vllm_export_writes_the_transformed_weights_and_transformers_serves_them(calibrated, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fp8kv"
    export_artifact(calibrated["root"] / "both", "vllm", out=out, model=str(tiny_llama))
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as a, \
            safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        changed = {name for name in a.keys() if not torch.equal(a.get_tensor(name), b.get_tensor(name))}
    # smooth-keys touches q/k projections, rotate-values v/o: nothing else
    assert changed and all(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in changed)
    assert {name.split(".")[-2] for name in changed} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    served = AutoModelForCausalLM.from_pretrained(out)  # compressed-tensors: fp8 KV cache with kvq's scales
    scales = calibrated["both"].scales
    for i, layer in enumerate(served.model.layers):
        assert torch.equal(layer.self_attn.k_scale.detach().flatten(), scales.layers[i].k_scale.reshape(1))
    # perplexity of the served checkpoint (its own loss) next to kvq eval of the same scales on the same windows
    result = run_eval(EvalConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), scales=[str(calibrated["root"] / "both")], samples=2, seqlen=SEQLEN, attention_error=False, fp8_fallback=False))
    windows = result.windows.input_ids
    kvq_ppl = result.measurement.entries[0].ppl
    served_ppl = math.exp(sum(_window_loss(served, windows[r:r + 1]) for r in range(2)) / 2)
    original_ppl = math.exp(sum(_window_loss(original, windows[r:r + 1]) for r in range(2)) / 2)
    assert served_ppl == pytest.approx(kvq_ppl, rel=2e-3)
    # the transforms are exact: kvq's unquantized baseline on the transformed model is the original's perplexity
    assert result.measurement.baseline.ppl == pytest.approx(original_ppl, rel=1e-5)


@pytest.mark.parametrize("export_format", ["trtllm", "sglang-json", "lmdeploy"])
def test_scale_only_formats_refuse_transformed_scales(calibrated, tmp_path, export_format):
    with pytest.raises(UsageError, match="holds scales only"):
        export_artifact(calibrated["root"] / "both", export_format, out=tmp_path / "o", legacy=True)
    assert not (tmp_path / "o").exists()


def test_eval_refuses_scales_of_differently_transformed_models(calibrated, tiny_llama):
    with pytest.raises(UsageError, match="differently transformed models"):
        run_eval(EvalConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), samples=1, seqlen=SEQLEN, scales=[str(calibrated["root"] / "plain"), str(calibrated["root"] / "both")]))


def test_a_missing_or_foreign_transforms_record_is_refused(calibrated, tiny_llama, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(calibrated["root"] / "both", copy)
    (copy / TRANSFORMS_FILE).unlink()
    with pytest.raises(UsageError, match="transforms.safetensors is missing"):
        export_artifact(copy, "vllm", out=tmp_path / "o", model=str(tiny_llama))
    shutil.copy(calibrated["root"] / "smooth" / TRANSFORMS_FILE, copy / TRANSFORMS_FILE)
    with pytest.raises(UsageError, match="is not the transforms record of the scales"):
        export_artifact(copy, "vllm", out=tmp_path / "o", model=str(tiny_llama))
    assert not (tmp_path / "o").exists()


def test_validate_folds_the_transforms_before_measuring(calibrated, tiny_llama):
    from kvq.evaluation.round_trip import ValidateConfig, run_validation

    result = run_validation(ValidateConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), scales=str(calibrated["root"] / "both"), samples=2, seqlen=SEQLEN))
    assert sorted(result.errors) == [0, 1, 2]
    # The same samples' K/V of the transformed model: every value within the calibrated range (in-sample, fp8)
    assert all(e.k.clipped.sum() == 0 and e.v.clipped.sum() == 0 for e in result.errors.values())


def test_a_sharded_checkpoint_gets_only_its_touched_shards_rewritten(tiny_llama, tmp_path):
    import json
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.save_pretrained(sharded, max_shard_size="2MB")  # embeddings alone in shards of their own
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    cal = tmp_path / "cal"
    _calibrate(sharded, _recipe("fp8_e4m3", "tensor", ["smooth-keys", "rotate-values"]), cal)
    out = tmp_path / "out"
    export_artifact(cal, "vllm", out=out, model=str(sharded))
    touched = {index[n] for n in index if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for shard in set(index.values()):
        linked = os.stat(out / shard).st_ino == os.stat(sharded / shard).st_ino
        assert linked == (shard not in touched), shard  # untouched shards stay hard links of the model's
    with safe_open(str(out / sorted(touched)[0]), "pt") as new, safe_open(str(sharded / sorted(touched)[0]), "pt") as old:
        assert set(new.keys()) == set(old.keys())
    served = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        assert torch.isfinite(served(ids).logits).all()


def test_transforms_need_the_checkpoints_own_dtype(tiny_llama, tmp_path):
    cfg = CalibrationConfig(model=ModelSpec(model=str(tiny_llama), device="cpu", dtype="bfloat16"), data=DataSpec(dataset="pydoc"), samples=2, seqlen=SEQLEN)
    with pytest.raises(UsageError, match="--dtype bfloat16 cannot be used with transforms"):
        run_calibration(cfg, _recipe("fp8_e4m3", "tensor", ["smooth-keys"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_validate_in_another_dtype_names_both(calibrated, tiny_llama):
    from kvq.evaluation.round_trip import ValidateConfig, run_validation

    with pytest.raises(UsageError, match="in float32, but the model is loaded in bfloat16"):
        run_validation(ValidateConfig(model=ModelSpec(model=str(tiny_llama), device="cpu", dtype="bfloat16"), data=DataSpec(dataset="pydoc"), scales=str(calibrated["root"] / "both"), samples=1, seqlen=SEQLEN))
