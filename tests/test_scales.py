"""KVScales: save / load round trip, and the refusals of a scales file that is not sound."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.errors import UsageError
from kvq.recipe.schema import KVRecipe, QuantSpec


def _recipe(symmetric: bool = True, fmt: str = "int8", granularity: str = "head") -> KVRecipe:
    spec = QuantSpec(format=fmt, symmetric=symmetric, granularity=granularity)
    return KVRecipe(name="t", key=spec, value=spec)


def _scales(symmetric: bool = True) -> KVScales:
    layers = {}
    for i in range(2):
        zp = None if symmetric else torch.tensor([-3, 4], dtype=torch.int32)
        layers[i] = LayerScales(torch.tensor([0.5, 0.25]) * (i + 1), torch.tensor([0.125, 1.0]), zp, zp)
    return KVScales(recipe=_recipe(symmetric), layers=layers, metadata={"num_layers": "2", "model": "m"})


def _file(tmp_path, scales: KVScales, edit=None, metadata=None):
    """scales.safetensors of ``scales`` with tensors changed by ``edit`` and metadata replaced by ``metadata``."""
    tensors = {name: t.clone() for name, t in scales.tensors().items()}  # no shared storage for save_file
    meta = {**scales.metadata, "recipe": json.dumps(scales.recipe.to_json())}
    if edit is not None:
        edit(tensors)
    path = tmp_path / "scales.safetensors"
    save_file(tensors, str(path), metadata=meta if metadata is None else metadata)
    return path


def test_round_trip(tmp_path):
    scales = _scales(symmetric=False)  # K and V share one zero-point tensor: saved as two
    paths = scales.save(tmp_path / "out")
    assert [p.name for p in paths] == ["scales.safetensors", "scales.json"]
    back = KVScales.load(tmp_path / "out")
    assert back.recipe == scales.recipe and back.metadata == scales.metadata
    for i in (0, 1):
        assert torch.equal(back.layers[i].k_scale, scales.layers[i].k_scale)
        assert torch.equal(back.layers[i].v_zero_point, scales.layers[i].v_zero_point)


def test_empty_file_is_refused_not_an_index_error(tmp_path):
    path = tmp_path / "scales.safetensors"
    path.write_bytes(b"")
    with pytest.raises(UsageError, match="scales file .*scales.safetensors is empty"):
        KVScales.load(path)
    save_file({}, str(path), metadata={"recipe": json.dumps(_recipe().to_json())})  # valid, but no tensor
    with pytest.raises(UsageError, match="scales.safetensors holds no layers"):
        KVScales.load(path)


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "inf"), (0.0, "zero"),
                                        (-0.5, "negative")])
def test_bad_scale_values_name_the_file_and_layer(tmp_path, value, what):
    def edit(t):
        t["layers.1.v_scale"] = torch.tensor([0.5, value])

    path = _file(tmp_path, _scales(), edit)
    with pytest.raises(UsageError) as err:
        KVScales.load(path)
    assert str(err.value).startswith(f"scales file {path}: layer 1 V scale holds {what} values")
    assert "dtype" not in err.value.message


def test_zero_point_out_of_range_is_refused(tmp_path):
    def edit(t):
        t["layers.0.k_zero_point"] = torch.tensor([-3, 128], dtype=torch.int32)

    with pytest.raises(UsageError, match=r"layer 0 K zero point holds values outside int8's range \[-128, 127\]"):
        KVScales.load(_file(tmp_path, _scales(symmetric=False), edit))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"layers.0.k_zero_point": torch.tensor([1.0, 2.0])}), "zero point is float32"),
    (lambda t: t.pop("layers.1.v_zero_point"), "layer 1 V lacks its zero point"),
    (lambda t: t.update({"layers.0.k_scale": torch.tensor(0.5)}), r"layer 0 K scale is float32 \(\)"),
    (lambda t: t.update({"layers.0.k_scale": torch.tensor([1, 2], dtype=torch.int32)}), "K scale is int32"),
    (lambda t: t.pop("layers.0.k_scale"), "layer 0 lacks k_scale"),
    (lambda t: t.update({"layers.0.q_scale": torch.tensor(1.0)}), "layer 0 has a q_scale but the recipe has no query: section"),
    (lambda t: t.update({"layers.0.w_scale": torch.tensor(1.0)}), "unexpected tensor 'layers.0.w_scale'"),
])
def test_wrong_tensors_are_refused(tmp_path, edit, message):
    with pytest.raises(UsageError, match=message):
        KVScales.load(_file(tmp_path, _scales(symmetric=False), edit))


def test_a_missing_layer_is_refused(tmp_path):
    def edit(t):
        for name in [n for n in t if n.startswith("layers.1.")]:
            del t[name]

    with pytest.raises(UsageError, match=r"layer\(s\) 1 missing \(layers 0..1 must all be present\)"):
        KVScales.load(_file(tmp_path, _scales(), edit))


@pytest.mark.parametrize("metadata,message", [
    ({"num_layers": "2"}, "has no recipe in its metadata"),
    ({"recipe": "{not json"}, "its recipe metadata is not a valid kvq recipe"),
    ({"recipe": json.dumps({"name": "x"})}, "its recipe metadata is not a valid kvq recipe"),
])
def test_missing_or_bad_recipe_metadata_is_refused(tmp_path, metadata, message):
    with pytest.raises(UsageError, match=message):
        KVScales.load(_file(tmp_path, _scales(), metadata=metadata))
