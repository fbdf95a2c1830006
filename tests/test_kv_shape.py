"""Per-layer KV shapes: :class:`kvq.model.model_spec.KVShape` with each layer's K and V (heads, dim).

Oracles: the configs transformers 5.23 builds (``per_layer_config[i]``, read through transformers' own view)
and hand arithmetic; artifacts whose metadata states per-layer shapes are refused where the tensors disagree.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from kvq.artifacts.files import StatedShape
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.model.kv_config import kv_shape
from kvq.model.model_spec import KVShape, LayerKV


def _gemma4(**extra):
    return AutoConfig.for_model(
        "gemma4_text", vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **extra)


def test_a_uniform_shape_stays_uniform_and_cheap():
    same = LayerKV((2, 16), (2, 16))
    shape = KVShape.from_layers(3, {0: same, 1: same, 2: same}, None)
    assert shape == KVShape(3, 2, 16) and shape.uniform and shape.per_layer is None
    assert shape.of(1) == same
    assert shape.elements_per_token == 2 * 3 * 2 * 16
    assert shape.to_metadata() == {"num_layers": "3", "num_kv_heads": "2", "head_dim": "16", "cached_layers": "0,1,2"}


def test_per_layer_shapes_count_each_layer_at_its_own_size():
    # MLA-like: 1 head of 32 as keys, 1 head of 8 as values; layer 2 holds no cache
    shape = KVShape.from_layers(3, {0: LayerKV((2, 16), (2, 16)), 1: LayerKV((1, 32), (1, 8))}, (0, 1))
    assert not shape.uniform and (shape.num_kv_heads, shape.head_dim) == (2, 16)  # the first cached layer's K
    assert shape.of(1).k == (1, 32) and shape.of(1).v == (1, 8)
    assert shape.elements_of("k") == 2 * 16 + 32 and shape.elements_of("v") == 2 * 16 + 8
    assert shape.elements_per_token == 2 * 16 * 2 + 32 + 8
    assert shape.heads_per_token == 2 + 2 + 1 + 1
    meta = shape.to_metadata()
    assert meta["kv_shapes"] == "2x16/2x16,1x32/1x8" and meta["cached_layers"] == "0,1"
    assert StatedShape.parse(meta, "test").kv_shape() == shape


def test_gemma4_config_is_read_per_layer():
    """transformers' own per-layer view is the oracle: config.per_layer_config[i].head_dim / num_key_value_heads."""
    for extra in ({}, {"attention_k_eq_v": True, "num_global_key_value_heads": 1}):
        config = _gemma4(**extra)
        with pytest.raises(RuntimeError):  # AmbiguousGlobalPerLayerAttributeError: the reason kvq reads per layer
            _ = config.head_dim
        shape = kv_shape(config)
        for i in range(4):
            layer = config.per_layer_config[i]
            assert shape.of(i).k == shape.of(i).v == (layer.num_key_value_heads, layer.head_dim)
        assert not shape.uniform
        # the same shape from config.json's form (what kvq inspect reads)
        from kvq.inspection.found import shape_from_config

        declared = shape_from_config(config.to_dict(), "config.json")
        assert declared.layers == {i: shape.of(i) for i in range(4)}


def test_kv_sharing_layers_hold_no_cache_in_the_loaded_and_the_json_config():
    config = _gemma4(num_kv_shared_layers=1)  # layer 3 reuses layer 1's cache
    assert config.kv_sharing_modes[3] == "reuse"
    assert kv_shape(config).kv_layers == (0, 1, 2)
    from kvq.inspection.found import shape_from_config

    assert shape_from_config(config.to_dict(), "config.json").cached_layers == (0, 1, 2)


def _stats_file(tmp_path, meta_extra: dict, v_dim: int = 8):
    stats = KVStats()
    stats.observe(0, -torch.ones(2, 16), torch.ones(2, 16), -torch.ones(2, 16), torch.ones(2, 16), 4)
    stats.observe(1, -torch.ones(1, 32), torch.ones(1, 32), -torch.ones(1, v_dim), torch.ones(1, v_dim), 4)
    shape = KVShape.from_layers(2, {0: LayerKV((2, 16), (2, 16)), 1: LayerKV((1, 32), (1, 8))}, None)
    stats.metadata = {**shape.to_metadata(), **meta_extra}
    path = tmp_path / "stats.safetensors"
    path.write_bytes(stats.to_bytes())
    return path


def test_statistics_of_per_layer_shapes_round_trip(tmp_path):
    loaded = KVStats.load(_stats_file(tmp_path, {}))
    assert tuple(loaded.layers[1].k.min.shape) == (1, 32) and tuple(loaded.layers[1].v.min.shape) == (1, 8)


@pytest.mark.parametrize(("meta", "v_dim", "message"), [
    ({}, 16, r"layers.1.v.min is float32 \(1, 16\); every statistic must be a float tensor of shape \(1, 8\)"),
    ({"kv_shapes": "2x16/2x16"}, 8, "lists 1 layer shapes, but 2 layers"),
    ({"kv_shapes": "2x16/2x16,1x32/1x0"}, 8, "is not K heads x dim"),
    ({"kv_shapes": "2x16/2x16,1x32/1x99999999"}, 8, "is not K heads x dim"),
    ({"kv_shapes": "1x1/1x1," * 100_000}, 8, "longer than 2 layer shapes"),
    ({"num_kv_heads": "4"}, 8, "are not the first cached layer's K shape"),
])
def test_per_layer_metadata_is_checked_against_the_tensors(tmp_path, meta, v_dim, message):
    with pytest.raises(UsageError, match=message):
        KVStats.load(_stats_file(tmp_path, meta, v_dim))
