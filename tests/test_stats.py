import json

import pytest
import torch

from kvq.calibrate.capture import masked_minmax
from kvq.errors import KvqError, UsageError
from kvq.stats import KVStats


def observe_batch(stats, layer, k, v, mask=None):
    k_min, k_max = masked_minmax(k, mask)
    v_min, v_max = masked_minmax(v, mask)
    tokens = int(mask.sum()) if mask is not None else k.shape[0] * k.shape[2]
    stats.observe(layer, k_min, k_max, v_min, v_max, tokens)


def test_two_halves_merged_equal_the_whole():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(6, 3, 10, 8, generator=g)  # (batch, kv_heads, seq, head_dim)
    v = torch.randn(6, 3, 10, 8, generator=g) * 5
    whole, first, second = KVStats(), KVStats(), KVStats()
    for layer in (0, 1):
        observe_batch(whole, layer, k * (layer + 1), v)
        observe_batch(first, layer, k[:3] * (layer + 1), v[:3])
        observe_batch(second, layer, k[3:] * (layer + 1), v[3:])
    merged = first.merge(second)
    assert merged.layers.keys() == whole.layers.keys()
    for i in whole.layers:
        for a, b in ((merged.layers[i].k, whole.layers[i].k), (merged.layers[i].v, whole.layers[i].v)):
            assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max) and torch.equal(a.absmax, b.absmax)
        assert merged.layers[i].tokens == whole.layers[i].tokens == 60
    # Streaming: observing the halves one after the other into one accumulator is the same.
    stream = KVStats()
    observe_batch(stream, 0, k[:3], v[:3])
    observe_batch(stream, 0, k[3:], v[3:])
    assert torch.equal(stream.layers[0].k.max, whole.layers[0].k.max)


def test_padding_is_excluded_exactly():
    k = torch.zeros(2, 1, 4, 2)
    k[0, 0, :2] = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    k[1, 0, :3] = torch.tensor([[0.0, 3.0], [-2.0, 1.0], [1.5, 1.5]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    k[~mask.unsqueeze(1).expand(2, 1, 4)] = 1e6  # padded positions hold huge values
    mn, mx = masked_minmax(k, mask)
    assert mn.tolist() == [[-2.0, -1.0]]
    assert mx.tolist() == [[2.0, 3.0]]


def test_save_load_round_trip(tmp_path):
    stats = KVStats(metadata={"model": "m", "tokens": "7"})
    observe_batch(stats, 0, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    observe_batch(stats, 1, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    path = stats.save(tmp_path / "stats.safetensors")
    back = KVStats.load(tmp_path)  # a folder works too
    assert back.metadata == {"model": "m", "tokens": "7"}
    for i in (0, 1):
        assert torch.equal(back.layers[i].k.min, stats.layers[i].k.min)
        assert torch.equal(back.layers[i].v.max, stats.layers[i].v.max)
        assert back.layers[i].tokens == 7
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert sorted(fh.keys()) == sorted(
            f"layers.{i}.{w}.{s}" for i in (0, 1) for w in "kv" for s in ("min", "max", "absmax")
        )
        assert fh.get_tensor("layers.0.k.absmax").dtype == torch.float32
        assert json.loads(fh.metadata()["layer_tokens"]) == [7, 7]


def test_check_complete_names_missing_layers_and_nan():
    stats = KVStats()
    observe_batch(stats, 0, torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2))
    with pytest.raises(KvqError, match=r"2 of 3 attention layers were never observed \(layers 1, 2\)"):
        stats.check_complete(3)
    stats.layers[0].v.min[0, 0] = float("nan")
    with pytest.raises(KvqError, match="layer 0: V holds NaN or inf"):
        stats.check_complete(1)


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="statistics file .*missing.safetensors does not exist"):
        KVStats.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        KVStats.load(bad)
