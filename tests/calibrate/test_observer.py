"""Calibration's statistics are those of the K/V the model places in its own cache (keys post-RoPE)."""

import pytest
import tiny_models
import torch

from kvq.artifacts.stats import KVStats
from kvq.calibration import StatsConsumer, collect_stats
from kvq.capture import CaptureCache
from kvq.data import batches
from kvq.errors import KvqError
from kvq.model.loading import load_model


def model_cache_stats(model, ids, mask=None):
    """Min/max per (kv head, channel) of the K/V the model itself stores in a DynamicCache."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    result = {}
    for i, layer in enumerate(out.past_key_values.layers):
        k, v = layer.keys, layer.values  # (batch, kv_heads, seq, head_dim)
        result[i] = (k.amin(dim=(0, 2)), k.amax(dim=(0, 2)), v.amin(dim=(0, 2)), v.amax(dim=(0, 2)))
    return result


@pytest.mark.parametrize("arch", sorted(tiny_models.CONFIGS))
def test_captured_kv_equal_the_models_own_cache(tiny_model_factory, arch):
    lm = load_model(str(tiny_model_factory(arch)), device="cpu")
    ids = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(1))  # within every sliding window
    with torch.inference_mode():
        expected = model_cache_stats(lm.model, ids)
        stats = collect_stats(lm.model, batches(ids.tolist(), 2, pad_id=0))
    assert sorted(stats.layers) == list(range(lm.info.num_layers))
    for i, (k_min, k_max, v_min, v_max) in expected.items():
        layer = stats.layers[i]
        assert layer.k.min.shape == (lm.info.num_kv_heads, lm.info.head_dim)  # per KV head: before repeat_kv
        assert torch.equal(layer.k.min, k_min) and torch.equal(layer.k.max, k_max)
        assert torch.equal(layer.v.min, v_min) and torch.equal(layer.v.max, v_max)
        assert layer.tokens == 24


def test_keys_are_post_rope(tiny_llama):
    """The k_proj output (pre-RoPE) has other statistics than what kvq records."""
    lm = load_model(str(tiny_llama), device="cpu")
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(2))
    pre_rope = {}
    attn = lm.model.model.layers[0].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: pre_rope.setdefault("k", out))
    with torch.inference_mode():
        stats = collect_stats(lm.model, batches(ids.tolist(), 1, 0))
        expected = model_cache_stats(lm.model, ids)
    hook.remove()
    k = pre_rope["k"].view(1, 40, lm.info.num_kv_heads, lm.info.head_dim)  # (batch, seq, kv_heads*dim) -> split heads
    assert not torch.equal(k.amax(dim=(0, 1)), stats.layers[0].k.max)
    assert torch.equal(expected[0][1], stats.layers[0].k.max)


def test_padding_never_enters_the_statistics(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    pad_id = 7
    samples = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23], [31, 32, 33, 34, 35]]
    with torch.inference_mode():
        padded = collect_stats(lm.model, batches(samples, 3, pad_id))
        alone = KVStats()
        for s in samples:
            alone = alone.merge(collect_stats(lm.model, batches([s], 1, pad_id)))
        unmasked = model_cache_stats(lm.model, torch.tensor([s + [pad_id] * (8 - len(s)) for s in samples]))
    for i in padded.layers:
        for a, b in ((padded.layers[i].k, alone.layers[i].k), (padded.layers[i].v, alone.layers[i].v)):
            torch.testing.assert_close(a.min, b.min, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.max, b.max, rtol=1e-5, atol=1e-5)
        assert padded.layers[i].tokens == 16
    # Counting the pads would have changed the statistics.
    k_max_with_pads = torch.maximum(unmasked[0][1], padded.layers[0].k.max)
    assert not torch.equal(k_max_with_pads, padded.layers[0].k.max)


def test_every_batch_is_counted_not_only_the_last(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    samples = [[100 + j for j in range(10)], [2000 + 3 * j for j in range(10)], [40 + 7 * j for j in range(10)]]
    with torch.inference_mode():
        together = collect_stats(lm.model, batches(samples, 1, 0))
        each = [collect_stats(lm.model, batches([s], 1, 0)) for s in samples]
    for i in together.layers:
        k_max = torch.stack([e.layers[i].k.max for e in each]).amax(dim=0)
        v_min = torch.stack([e.layers[i].v.min for e in each]).amin(dim=0)
        assert torch.equal(together.layers[i].k.max, k_max)
        assert torch.equal(together.layers[i].v.min, v_min)
        assert together.layers[i].tokens == 30
        assert not torch.equal(together.layers[i].k.max, each[-1].layers[i].k.max)


def test_lm_head_is_not_computed(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    calls = []
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        collect_stats(lm.model, batches([[1, 2, 3]], 1, 0))
    hook.remove()
    assert calls == []


def test_nan_in_a_layer_stops_the_run_naming_it(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(KvqError, match=r"layer 1: K holds NaN or inf \(batch 0"):
        collect_stats(lm.model, batches([[1, 2, 3]], 1, 0))


def test_the_observer_changes_nothing_and_stores_nothing():
    stats = KVStats()
    cache = CaptureCache(StatsConsumer(stats), torch.ones(1, 3, dtype=torch.long))
    k = torch.randn(1, 2, 3, 4)
    out_k, out_v = cache.update(k, k * 2, 0)
    assert out_k is k and cache.get_seq_length() == 0
    assert stats.layers[0].tokens == 3
