"""The capture hands its consumer exactly what the model caches, and queries exactly as attention gets them.

Oracles: the model's own transformers cache (a plain ``DynamicCache`` that stores every position)
for K/V, and for queries the model's own ``q_proj`` output rotated by the model's own
``apply_rotary_pos_emb`` with the model's own (cos, sin).
"""

import inspect
import sys

import pytest
import tiny_models
import torch
from transformers import DynamicCache

from kvq.capture import CaptureCache, capture_batches, forward
from kvq.data import batches
from kvq.model.loading import load_model


class Recorder:
    """A consumer that keeps every K/V (and query) it is handed, and changes nothing."""

    def __init__(self, wants_queries=False, model=None):
        self.wants_queries = wants_queries
        self.model = model
        self.kvs = {}
        self.queries = {}
        self.implementations = []

    def kv(self, captured):
        self.kvs.setdefault(captured.layer_idx, []).append(captured)
        if self.model is not None:
            self.implementations.append(self.model.config._attn_implementation)
        return captured.key, captured.value

    def query(self, captured):
        self.queries.setdefault(captured.layer_idx, []).append(captured)


def own_cache(model, ids):
    """Every layer's (K, V) the model itself writes into a cache that stores every position."""
    cache = DynamicCache()  # no config: full layers everywhere, nothing is evicted
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(input_ids=ids, use_cache=True, **{name: cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("arch", sorted(tiny_models.CONFIGS))
def test_the_consumer_gets_exactly_the_models_own_kv(tiny_model_factory, arch):
    lm = load_model(str(tiny_model_factory(arch)), device="cpu")
    ids = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(1))
    recorder = Recorder()
    with torch.inference_mode():
        expected = own_cache(lm.model, ids)
        forward(lm.model, ids, CaptureCache(recorder, config=lm.model.config))
    assert sorted(recorder.kvs) == list(range(lm.info.num_layers))
    for i, (k, v) in enumerate(expected):
        (got,) = recorder.kvs[i]
        assert got.key.shape == (2, lm.info.num_kv_heads, 12, lm.info.head_dim)  # before repeat_kv
        assert torch.equal(got.key, k) and torch.equal(got.value, v)
        assert got.tokens == 24 and got.real_key is got.key  # no padding: no gather


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_models_past_their_window(tiny_model_factory, arch):
    """Mistral and Gemma2 (window 16) over 40 tokens: every position captured, attention unchanged."""
    lm = load_model(str(tiny_model_factory(arch)), device="cpu")
    window = lm.model.config.sliding_window
    seq = 40
    assert seq > 2 * window
    ids = torch.randint(0, 5000, (1, seq), generator=torch.Generator().manual_seed(3))
    recorder = Recorder()
    with torch.inference_mode():
        expected = own_cache(lm.model, ids)
        plain_logits = lm.model(input_ids=ids, use_cache=False).logits
        captured_logits = forward(lm.model, ids, CaptureCache(recorder, config=lm.model.config)).logits
    torch.testing.assert_close(captured_logits, plain_logits, rtol=0, atol=0)
    for i, (k, v) in enumerate(expected):
        (got,) = recorder.kvs[i]
        assert got.key.shape[2] == seq
        assert torch.equal(got.key, k) and torch.equal(got.value, v)


def test_padding_is_described_once_and_gathered_on_request(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    samples = [[11, 12, 13, 14, 15], [21, 22]]
    recorder = Recorder()
    with torch.inference_mode():
        capture_batches(lm.model, batches(samples, 2, pad_id=7), recorder)
        alone = [own_cache(lm.model, torch.tensor([s])) for s in samples]
    for i in range(lm.info.num_layers):
        (got,) = recorder.kvs[i]
        assert got.tokens == 7 and got.real_key.shape == (1, 2, 7, 16)
        expected_k = torch.cat([alone[0][i][0], alone[1][i][0]], dim=2)  # (1, kv_heads, 5 + 2, head_dim)
        torch.testing.assert_close(got.real_key, expected_k, rtol=1e-5, atol=1e-5)


def _rotary_oracle(model, layer, ids):
    """Layer ``layer``'s queries, rebuilt from the model's own q_proj output and RoPE."""
    attn = model.model.layers[layer].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, out: seen.setdefault("q", out)),
             model.model.rotary_emb.register_forward_hook(lambda m, a, out: seen.setdefault("cos_sin", out))]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    batch, seq = ids.shape
    q = seen["q"].view(batch, seq, -1, attn.head_dim).transpose(1, 2)  # (b, s, h*d) -> (b, heads, s, d)
    cos, sin = seen["cos_sin"]
    apply_rotary_pos_emb = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return apply_rotary_pos_emb(q, q, cos, sin)[0]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_queries_are_post_rope_per_attention_head(tiny_llama, implementation):
    lm = load_model(str(tiny_llama), device="cpu")
    lm.model.config._attn_implementation = implementation
    ids = torch.randint(0, 5000, (2, 9), generator=torch.Generator().manual_seed(4))
    recorder = Recorder(wants_queries=True, model=lm.model)
    with torch.inference_mode():
        plain = lm.model(input_ids=ids, use_cache=False).logits
        logits = forward(lm.model, ids, CaptureCache(recorder, config=lm.model.config)).logits
        expected = [_rotary_oracle(lm.model, i, ids) for i in range(lm.info.num_layers)]
    assert torch.equal(logits, plain)  # capturing queries changes nothing attention computes
    assert lm.model.config._attn_implementation == implementation  # restored
    for i in range(lm.info.num_layers):
        (got,) = recorder.queries[i]
        assert got.query.shape == (2, 4, 9, 16)  # 4 attention heads, not the 2 KV heads
        assert torch.equal(got.query, expected[i])


def test_queries_cost_nothing_when_no_consumer_asks(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    original = lm.model.config._attn_implementation
    quiet, asking = Recorder(model=lm.model), Recorder(wants_queries=True, model=lm.model)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        forward(lm.model, ids, CaptureCache(quiet, config=lm.model.config))
        forward(lm.model, ids, CaptureCache(asking, config=lm.model.config))
    assert set(quiet.implementations) == {original} and quiet.queries == {}  # the model's own attention
    assert set(asking.implementations) == {f"kvq_capture+{original}"}
    assert sorted(asking.queries) == [0, 1, 2]


def test_queries_with_padding_keep_real_tokens_only(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    recorder = Recorder(wants_queries=True)
    with torch.inference_mode():
        capture_batches(lm.model, batches([[11, 12, 13, 14], [21, 22, 23]], 2, pad_id=0), recorder)
        alone = _rotary_oracle(lm.model, 0, torch.tensor([[21, 22, 23]]))
    (got,) = recorder.queries[0]
    assert got.real_query.shape == (1, 4, 7, 16)
    torch.testing.assert_close(got.real_query[:, :, 4:], alone, rtol=1e-5, atol=1e-5)
