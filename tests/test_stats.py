import json

import pytest
import torch

from kvq.artifacts.stats import KVStats
from kvq.errors import KvqError, UsageError
from kvq.quant.histogram import SCHEMA


def _minmax(x, mask):
    """Per (head, channel) min / max of x (batch, heads, seq, dim) over the real tokens of mask (batch, seq)."""
    real = x.permute(0, 2, 1, 3)[mask] if mask is not None else x.permute(0, 2, 1, 3).flatten(0, 1)  # (n, heads, dim)
    return real.amin(dim=0), real.amax(dim=0)


def observe_batch(stats, layer, k, v, mask=None):
    k_min, k_max = _minmax(k, mask)
    v_min, v_max = _minmax(v, mask)
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


def test_save_load_round_trip(tmp_path):
    stats = KVStats(metadata={"model": "m", "tokens": "7"})
    observe_batch(stats, 0, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    observe_batch(stats, 1, torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    path = stats.save(tmp_path)
    assert path == tmp_path / "stats.safetensors"
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


def _good_stats() -> KVStats:
    stats = KVStats(metadata={"num_layers": "3"})
    for i in range(3):
        observe_batch(stats, i, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    return stats


def _write(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="statistics file .*missing.safetensors does not exist"):
        KVStats.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="bad.safetensors is not a complete safetensors file"):
        KVStats.load(bad)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="empty.safetensors is empty"):
        KVStats.load(empty)


def test_a_truncated_file_is_refused(tmp_path):
    path = _good_stats().save(tmp_path / "a")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    with pytest.raises(UsageError, match="cut.safetensors is not a complete safetensors file"):
        KVStats.load(cut)


def test_min_above_max_is_refused_naming_layer_kv_head_channel(tmp_path):
    stats = _good_stats()
    tensors = stats.tensors()
    tensors["layers.1.v.min"] = tensors["layers.1.v.min"].clone()
    tensors["layers.1.v.min"][1, 2] = tensors["layers.1.v.max"][1, 2] + 1.0
    path = _write(tmp_path / "s.safetensors", tensors, {"num_layers": "3"})
    with pytest.raises(UsageError, match=r"s\.safetensors: layer 1 V head 1 channel 2: min .* > max"):
        KVStats.load(path)


def test_nan_statistics_are_refused(tmp_path):
    tensors = _good_stats().tensors()
    tensors["layers.0.k.max"] = tensors["layers.0.k.max"].clone()
    tensors["layers.0.k.max"][0, 3] = float("nan")
    path = _write(tmp_path / "s.safetensors", tensors, {})
    with pytest.raises(UsageError, match="layer 0 K head 0 channel 3: min / max hold NaN or inf"):
        KVStats.load(path)


@pytest.mark.parametrize("drop,num_layers,missing", [(1, "3", "1"), (2, "3", "2"), (1, None, "1")])
def test_a_missing_layer_is_refused(tmp_path, drop, num_layers, missing):
    tensors = {k: v for k, v in _good_stats().tensors().items() if not k.startswith(f"layers.{drop}.")}
    path = _write(tmp_path / "s.safetensors", tensors, {} if num_layers is None else {"num_layers": num_layers})
    with pytest.raises(UsageError, match=rf"layer\(s\) {missing} missing"):
        KVStats.load(path)


@pytest.mark.parametrize("bad,expected", [
    (torch.zeros(2, 4, dtype=torch.int32), "int32 \\(2, 4\\)"),
    (torch.zeros(8), "float32 \\(8,\\)"),
    (torch.zeros(2, 5), "float32 \\(2, 5\\)"),
])
def test_wrong_dtype_or_shape_is_refused(tmp_path, bad, expected):
    tensors = _good_stats().tensors()
    tensors["layers.2.k.absmax"] = bad
    path = _write(tmp_path / "s.safetensors", tensors, {})
    with pytest.raises(UsageError, match=f"layers.2.k.absmax is {expected}; every statistic must be a float"):
        KVStats.load(path)


def test_malformed_layer_tokens_are_refused(tmp_path):
    path = _write(tmp_path / "s.safetensors", _good_stats().tensors(), {"layer_tokens": "[1, 2]"})
    with pytest.raises(UsageError, match="layer_tokens is not a list of 3 token counts"):
        KVStats.load(path)


def _stats_with_histograms(level: str) -> KVStats:
    from kvq.calibration.consumer import StatsConsumer
    from kvq.capture import CapturedKV

    stats = KVStats(metadata={"num_layers": "2"})
    observer = StatsConsumer(stats, level)
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        observer.kv(CapturedKV(layer_idx=i, key=torch.randn(1, 2, 7, 4, generator=g),
                               value=torch.randn(1, 2, 7, 4, generator=g), token_mask=None))
    return stats


@pytest.mark.parametrize("level", ["head", "channel"])
def test_histograms_round_trip(tmp_path, level):
    stats = _stats_with_histograms(level)
    path = tmp_path / "stats.safetensors"
    path.write_bytes(stats.to_bytes())
    loaded = KVStats.load(path)
    assert loaded.histograms == level
    for i in range(2):
        for a, b in ((loaded.layers[i].k, stats.layers[i].k), (loaded.layers[i].v, stats.layers[i].v)):
            assert torch.equal(a.hist, b.hist)
            # 7 tokens, 4 channels: each head counts 28 values, each channel 7
            assert set(a.hist.sum(-1).flatten().tolist()) == {28 if level == "head" else 7}


def test_bad_histograms_are_refused(tmp_path):
    from safetensors.torch import load_file

    stats = _stats_with_histograms("head")
    good = tmp_path / "good.safetensors"
    good.write_bytes(stats.to_bytes())
    tensors = load_file(str(good))
    meta = KVStats.load(good).metadata | {"layer_tokens": "[7, 7]", "histograms": f"{SCHEMA} head"}
    off = dict(tensors)
    off["layers.1.v.hist"] = off["layers.1.v.hist"].clone()
    off["layers.1.v.hist"][0, 0] += 1
    with pytest.raises(UsageError, match=r"layers\.1\.v\.hist: counts do not add up to the 28 values seen per head"):
        KVStats.load(_write(tmp_path / "off.safetensors", off, meta))
    with pytest.raises(UsageError, match="not on the grid this kvq reads"):
        KVStats.load(_write(tmp_path / "grid.safetensors", tensors, meta | {"histograms": "signed-log2/8/-20/20 head"}))
    lacking = {k: t for k, t in tensors.items() if k != "layers.0.k.hist"}
    with pytest.raises(UsageError, match="layer 0 lacks k.hist or v.hist"):
        KVStats.load(_write(tmp_path / "lacking.safetensors", lacking, meta))
    unannounced = {k: v for k, v in meta.items() if k != "histograms"}
    with pytest.raises(UsageError, match="holds k.hist but the metadata names no histogram grid"):
        KVStats.load(_write(tmp_path / "unannounced.safetensors", tensors, unannounced))
    floats = dict(tensors)
    floats["layers.0.k.hist"] = floats["layers.0.k.hist"].float()
    with pytest.raises(UsageError, match=r"layers\.0\.k\.hist is float32 \(2, 1281\); expected int64"):
        KVStats.load(_write(tmp_path / "floats.safetensors", floats, meta))


def test_merging_statistics_with_and_without_histograms_is_refused():
    with pytest.raises(KvqError, match="histograms cannot be merged"):
        _stats_with_histograms("head").merge(_good_stats())
