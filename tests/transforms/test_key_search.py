"""Searched key-smoothing factors (kvq.transforms.key_search).

Oracles: the attention logits themselves, computed in numpy with a hand-written int4 / int8 asymmetric
quantizer (the objective is the mean squared logit error over every query and key); a brute-force search
over the same lattice of factors; the model's own logits (the fold stays exact with searched factors).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvq.calibration import CalibrationConfig, run_calibration
from kvq.data.data_spec import DataSpec
from kvq.errors import UsageError
from kvq.model.model_spec import ModelSpec
from kvq.recipe.schema import parse_recipe
from kvq.transforms import (
    QKAbsMax,
    SmoothKeys,
    apply_transforms,
    describe_attention,
    measure_qk_absmax,
    plan_transforms,
)
from kvq.transforms.factors import smoothing_factors
from kvq.transforms.key_search import logit_error, search_factors
from kvq.transforms.layout import RopeLayout

INT = {"int4": (-8, 7), "int8": (-128, 127)}  # two's-complement code ranges, by hand


def spec(fmt="int4", granularity="head", symmetric=False):
    return parse_recipe({"format": fmt, "symmetric": symmetric, "granularity": granularity}, "t", "t").key


def planted(kv_heads=2, group=2, d=4, n=60, m=50, seed=0):
    """Keys with one offset pair and one wide pair per head, queries with uneven channel energy."""
    g = np.random.default_rng(seed)
    keys = g.normal(size=(kv_heads, n, d))
    keys[:, :, 0] += 6.0  # an offset channel (pairs with channel d/2)
    keys[:, :, 1] *= 8.0  # a wide channel
    queries = g.normal(size=(kv_heads * group, m, d)) * np.array([0.3, 2.0, 1.0, 0.5])[:d]
    return keys, queries


def stats_of(keys, queries) -> QKAbsMax:
    kv_heads, _, d = keys.shape
    grouped = queries.reshape(kv_heads, -1, d)  # consecutive query heads share a KV head
    moment = np.einsum("gni,gnj->gij", grouped, grouped) / grouped.shape[1]
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return QKAbsMax(t(np.abs(queries).max(1)), t(np.abs(keys).max(1)), t(keys.min(1)), t(keys.max(1)), t(moment),
                    torch.tensor(keys, dtype=torch.float32))


def numpy_logit_error(keys, queries, s, fmt="int4", granularity="head"):
    """Mean over (query, key) of (q.k - (q*s).dequant(k/s))**2 per KV head, summed: by hand in float64."""
    kv_heads, _, d = keys.shape
    group = queries.shape[0] // kv_heads
    qmin, qmax = INT[fmt]
    x = keys / s[:, None, :]
    lo_all, hi_all = np.minimum(x.min(), 0), np.maximum(x.max(), 0)
    total = 0.0
    for h in range(kv_heads):
        lo, hi = (np.minimum(x[h].min(), 0), np.maximum(x[h].max(), 0)) if granularity == "head" else (lo_all, hi_all)
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
        back = (np.clip(np.round(x[h] / scale) + zp, qmin, qmax) - zp) * scale
        for q in queries[h * group:(h + 1) * group]:
            exact = q @ keys[h].T  # (m, n)
            quant = (q * s[h]) @ back.T
            total += ((quant - exact) ** 2).mean() / group
    return total


@pytest.mark.parametrize(("fmt", "granularity"), [("int4", "head"), ("int8", "head"), ("int4", "tensor")])
def test_the_objective_is_the_mean_squared_logit_error(fmt, granularity):
    keys, queries = planted()
    s = np.array([[2.0, 0.5, 2.0, 0.5], [1.0, 3.0, 1.0, 3.0]])
    got = logit_error(stats_of(keys, queries), torch.tensor(s).unsqueeze(0), spec(fmt, granularity))
    assert got.shape == (1, 2)
    expected = numpy_logit_error(keys, queries, s, fmt, granularity)
    assert float(got.sum()) == pytest.approx(expected, rel=1e-4)


def layer_of(d=4):
    return SimpleNamespace(rope=RopeLayout("rotate_half", d), head_dim=d, layer_idx=0)


@pytest.mark.parametrize("granularity", ["head", "tensor"])
def test_search_is_never_worse_than_its_start_and_near_brute_force(granularity):
    keys, queries = planted()
    stats = stats_of(keys, queries)
    start = torch.ones(2, 4, dtype=torch.float64)
    found = search_factors(layer_of(), stats, start, spec("int4", granularity), shared=False)
    assert torch.equal(found[:, 0], found[:, 2]) and torch.equal(found[:, 1], found[:, 3])  # RoPE pairs
    err = numpy_logit_error(keys, queries, found.numpy(), "int4", granularity)
    start_err = numpy_logit_error(keys, queries, start.numpy(), "int4", granularity)
    assert err <= start_err * (1 + 1e-6)
    # brute force over the lattice 2**(j/4), |j| <= 6, of each pair: per head each head alone (its error depends
    # on its own factors only); per tensor both heads together (coarser for the second head)
    steps = 2.0 ** (np.arange(-6, 7) / 4)
    if granularity == "head":
        best = sum(min(numpy_logit_error(keys[h:h + 1], queries[2 * h:2 * h + 2], np.array([[a, b, a, b]]))
                       for a in steps for b in steps) for h in range(2))
    else:
        best = min(numpy_logit_error(keys, queries, np.array([[a, b, a, b], [c, e, c, e]]), "int4", "tensor")
                   for a in steps for b in steps for c in steps[::3] for e in steps[::3])
    assert err <= best * 1.10, (err, best, start_err)
    assert err < start_err * 0.9  # the planted offset and wide channels leave room to gain


def test_shared_norms_keep_one_factor_for_every_head_and_channel_granularity_keeps_the_start():
    keys, queries = planted()
    stats = stats_of(keys, queries)
    start = torch.ones(2, 4, dtype=torch.float64)
    shared = search_factors(layer_of(), stats, start, spec("int4", "head"), shared=True)
    assert torch.equal(shared[0], shared[1]) and not torch.equal(shared, start)
    assert torch.equal(search_factors(layer_of(), stats, start, spec("int4", "channel"), shared=False), start)


def test_searched_factors_fold_exactly_and_beat_the_formula(tiny, ids, calibration):
    model = tiny("llama")
    with torch.no_grad():
        logits = model(ids).logits
    key = spec("int4", "head")
    stats = measure_qk_absmax(model, calibration(), search_rows=64)
    plan = plan_transforms(model, [SmoothKeys(0.5, search=True)], stats, key)
    layers = describe_attention(model)
    for layer, st, s in zip(layers, stats, plan.key_factors, strict=True):
        alpha = smoothing_factors(layer, st, 0.5)
        assert float(logit_error(st, s.unsqueeze(0), key).sum()) <= float(logit_error(st, alpha.unsqueeze(0), key).sum())
        for i, j in layer.rope.pairs():
            assert torch.equal(s[:, i], s[:, j])
    assert any(not torch.equal(s, smoothing_factors(la, st, 0.5))
               for la, st, s in zip(layers, stats, plan.key_factors, strict=True))
    apply_transforms(model, plan)
    with torch.no_grad():
        new = model(ids).logits
    torch.testing.assert_close(new, logits, rtol=1e-4, atol=2e-5 * float(logits.abs().max()))


def test_search_needs_the_key_quantizer_and_refuses_nvfp4(tiny, calibration):
    model = tiny("llama")
    stats = measure_qk_absmax(model, calibration(), search_rows=16)
    with pytest.raises(UsageError, match="needs the recipe's key quantization"):
        plan_transforms(model, [SmoothKeys(search=True)], stats)
    with pytest.raises(UsageError, match="cannot model nvfp4"):
        plan_transforms(model, [SmoothKeys(search=True)], stats, spec("nvfp4", "tensor", symmetric=True))
    with pytest.raises(UsageError, match="search"):
        SmoothKeys(search="yes")


def test_calibrate_records_searched_factors(tiny_llama, tmp_path):
    recipe = parse_recipe({"format": "int4", "symmetric": False, "granularity": "head",
                           "transforms": [{"name": "smooth-keys", "search": True}]}, "t", "searched")
    cfg = CalibrationConfig(model=ModelSpec(model=str(tiny_llama), device="cpu"), data=DataSpec(dataset="pydoc"), samples=2, seqlen=32)
    result = run_calibration(cfg, recipe, tmp_path / "out")
    assert result.stats.metadata["transforms"] == '[{"alpha": 0.5, "name": "smooth-keys", "search": true}]'
    off = parse_recipe({"format": "int4", "symmetric": False, "granularity": "head",
                        "transforms": [{"name": "smooth-keys", "search": False}]}, "t", "off")
    assert off.transforms[0].search is None  # false records as before: no "search" key
