"""FP8 attention's query scale: calibrated from the model's own post-RoPE queries, solved by hand arithmetic,
and simulated in eval exactly as an attention function that quantizes Q, K and V itself (the model's own
``labels=`` loss as the oracle)."""

from __future__ import annotations

import pytest
import torch
from capture.test_capture import _rotary_oracle
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats
from kvq.calibration import collect_stats
from kvq.data import batches
from kvq.errors import UsageError
from kvq.evaluation import StaticQuantizer
from kvq.evaluation.dynamic import UnitScaleQuantizer, eval_only_quantizer
from kvq.evaluation.perplexity import window_nlls
from kvq.evaluation.quant_cache import FakeQuantize
from kvq.model.loading import load_model
from kvq.recipe.schema import parse_recipe
from kvq.solving.solver import solve_scales

RECIPE = {"format": "fp8_e4m3", "granularity": "tensor", "query": {"granularity": "head"}}


@pytest.fixture(scope="module")
def calibrated(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    ids = torch.randint(0, 5000, (3, 24), generator=torch.Generator().manual_seed(7))
    stats = collect_stats(lm.model, batches([row.tolist() for row in ids], 1, 0), queries=True)
    return lm, ids, stats


def test_query_ranges_are_the_models_own_queries(calibrated):
    lm, ids, stats = calibrated
    for i in range(lm.info.num_layers):
        q = torch.cat([_rotary_oracle(lm.model, i, ids[b:b + 1]) for b in range(3)], dim=2)  # (1, heads, 72, d)
        assert torch.equal(stats.layers[i].q.min, q.amin(dim=(0, 2)))
        assert torch.equal(stats.layers[i].q.max, q.amax(dim=(0, 2)))


def test_q_scale_by_hand_and_through_the_files(calibrated, tmp_path):
    _, _, stats = calibrated
    scales = solve_scales(stats, parse_recipe(RECIPE, "t", "q"))
    for i, layer in scales.layers.items():
        per_head = torch.maximum(-stats.layers[i].q.min, stats.layers[i].q.max).amax(dim=-1) / 448  # (4,)
        # the tiny model has 4 query heads over 2 KV heads: vLLM applies the max of each pair (heads 0-1, 2-3)
        want = torch.stack([per_head[:2].max()] * 2 + [per_head[2:].max()] * 2)
        assert torch.equal(layer.q_scale, want)
    scales.save(tmp_path / "a")
    assert torch.equal(KVScales.load(tmp_path / "a").layers[0].q_scale, scales.layers[0].q_scale)
    assert "q_scale" in (tmp_path / "a" / "scales.json").read_text()


def test_solving_a_query_recipe_needs_query_ranges():
    stats = KVStats()
    stats.observe(0, -torch.ones(1, 2), torch.ones(1, 2), -torch.ones(1, 2), torch.ones(1, 2), tokens=3)
    with pytest.raises(UsageError, match="hold no query ranges"):
        solve_scales(stats, parse_recipe(RECIPE, "t", "q"))


def _qdq(x, scale):  # the oracle's quantizer: torch's own fp8 cast, scale broadcast per head
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _oracle_loss(lm, ids, layers, use_q: bool):
    """The model's own labels= loss with an attention function that quantizes Q (per head), K and V."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        s = layers[module.layer_idx]
        if use_q:
            query = _qdq(query, s.q_scale.view(1, -1, 1, 1)).to(query.dtype)
        key = _qdq(key, s.k_scale).to(key.dtype)
        value = _qdq(value, s.v_scale).to(value.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvq_test_fp8_attention", attention)
    original = lm.model.config._attn_implementation
    lm.model.config._attn_implementation = "kvq_test_fp8_attention"
    try:
        with torch.inference_mode():
            return float(lm.model(input_ids=ids, labels=ids).loss)
    finally:
        lm.model.config._attn_implementation = original


def test_eval_quantizes_the_query_as_fp8_attention_does(calibrated):
    lm, ids, stats = calibrated
    scales = solve_scales(stats, parse_recipe(RECIPE, "t", "q"))
    window = ids[:1]
    with torch.inference_mode():
        got = window_nlls(lm.model, window, FakeQuantize(StaticQuantizer(scales)))[0] / (window.shape[1] - 1)
    assert got == pytest.approx(_oracle_loss(lm, window, scales.layers, use_q=True), rel=1e-6)
    no_q = solve_scales(stats, parse_recipe({k: v for k, v in RECIPE.items() if k != "query"}, "t", "kv"))
    with torch.inference_mode():
        kv_only = window_nlls(lm.model, window, FakeQuantize(StaticQuantizer(no_q)))[0] / (window.shape[1] - 1)
    assert kv_only == pytest.approx(_oracle_loss(lm, window, scales.layers, use_q=False), rel=1e-6)
    assert kv_only != got  # quantizing the query changed what attention computed


def test_the_uncalibrated_fp8_attention_recipe_quantizes_q_at_scale_1():
    q = eval_only_quantizer("fp8-e4m3-attention-scale-1.0")
    assert isinstance(q, UnitScaleQuantizer) and q.quantizes_queries
    x = torch.tensor([[[[0.3, 500.0, -1e-3, 1e-4]]]])  # (1, 1, 1, 4)
    # by hand: 0.3 -> 0.3125 (1.25 * 2**-2); 500 saturates at 448; -0.001 is 0.51 of the smallest subnormal 2**-9;
    # 1e-4 is below half of it: 0
    assert q.quantize_query(x, 0).tolist() == [[[[0.3125, 448.0, -(2.0**-9), 0.0]]]]
    assert not eval_only_quantizer("fp8-e4m3-scale-1.0").quantizes_queries
