"""The attention observer: its objective against torch's scaled_dot_product_attention, never worse than min/max,
near a brute-force search; the reservoir it reads: prefix rows, seeded, resumable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvq.artifacts.reservoir import Reservoir
from kvq.artifacts.stats import KVStats
from kvq.calibration.consumer import StatsConsumer
from kvq.capture import CapturedKV, CapturedQuery
from kvq.errors import UsageError
from kvq.quant.qparams import choose_qparams
from kvq.recipe.schema import QuantSpec, parse_recipe
from kvq.solving.attention import attention_output, attention_ranges
from kvq.solving.solver import solve_scales


def sdpa_output(q, k, v, scale):
    """The oracle: torch's own causal attention with GQA."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          is_causal=True, scale=scale)


def qdq(x, lo, hi, spec):
    """Independent fake quantization per KV head (head granularity): x (chunks, kv_heads, n, d)."""
    scale, zp = choose_qparams(lo, hi, spec)
    out = torch.empty_like(x)
    qmin, qmax = {"int4": (-8, 7), "int8": (-128, 127)}[spec.format]
    for h in range(x.shape[1]):
        s = scale[h].item()
        z = 0 if zp is None else zp[h].item()
        out[:, h] = (torch.clamp(torch.round(x[:, h] / s) + z, qmin, qmax) - z) * s
    return out


def rows(seed=0, chunks=2, heads=4, kv_heads=2, n=24, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(chunks, heads, n, d, generator=g) * 2
    k = torch.randn(chunks, kv_heads, n, d, generator=g)
    k[..., 0] += 4  # an offset channel
    k[:, :, 5, :] *= 8  # a few outlier tokens: clipping them can pay
    v = torch.randn(chunks, kv_heads, n, d, generator=g)
    v[:, :, 3, :] *= 10
    return q, k, v


def test_attention_output_matches_sdpa():
    q, k, v = rows()
    assert torch.allclose(attention_output(q, k, v, 0.3), sdpa_output(q, k, v, 0.3), atol=1e-5)


def _stats_of(q, k, v):
    stats = KVStats(reservoir=Reservoir(chunks=q.shape[0], tokens=q.shape[2]))
    observer = StatsConsumer(stats)
    for c in range(q.shape[0]):  # each chunk one calibration sample
        observer.kv(CapturedKV(0, k[c:c + 1], v[c:c + 1], None, batch_index=c))
        observer.query(CapturedQuery(0, q[c:c + 1], None, batch_index=c, scaling=0.3))
    return stats


def test_never_worse_than_minmax_and_near_brute_force():
    q, k, v = rows()
    stats = _stats_of(q, k, v)
    assert torch.equal(stats.reservoir.layer(0)[1], k)  # every chunk kept, as given
    spec = QuantSpec(format="int4", symmetric=False, granularity="head", observer="attention")
    layer = stats.layers[0]
    mm_k = (layer.k.min.amin(-1), layer.k.max.amax(-1))
    mm_v = (layer.v.min.amin(-1), layer.v.max.amax(-1))
    (k_lo, k_hi), (v_lo, v_hi) = attention_ranges(layer, stats.reservoir.layer(0), 0.3, spec, spec, mm_k, mm_v)
    ref = sdpa_output(q, k, v, 0.3)

    def objective(klo, khi, vlo, vhi):
        out = sdpa_output(q, qdq(k, klo, khi, spec), qdq(v, vlo, vhi, spec), 0.3)
        return ((out - ref).double() ** 2).view(2, 2, 2, 24, 8).sum(dim=(0, 2, 3, 4))  # per KV head

    chosen, minmax = objective(k_lo, k_hi, v_lo, v_hi), objective(*mm_k, *mm_v)
    assert bool((chosen <= minmax * (1 + 1e-9)).all())
    assert bool((chosen < minmax * 0.9).any())  # the outliers make clipping pay on these rows
    # brute force over K's fraction (V at min/max), in steps of 0.005: the K search is close to its optimum
    fractions = torch.arange(1.0, 0.02, -0.005)
    k_only = torch.stack([objective(mm_k[0] * t, mm_k[1] * t, *mm_v) for t in fractions]).amin(0)
    (k_lo2, k_hi2), _ = attention_ranges(layer, stats.reservoir.layer(0), 0.3, spec,
                                         spec.model_copy(update={"observer": "minmax"}), mm_k, mm_v)
    assert bool((objective(k_lo2, k_hi2, *mm_v) <= k_only * 1.10).all())


def test_solve_uses_the_rows_and_needs_them():
    q, k, v = rows(1)
    stats = _stats_of(q, k, v)
    recipe = parse_recipe({"format": "int8", "symmetric": False, "granularity": "head", "observer": "attention"},
                          "test", "att")
    scales = solve_scales(stats, recipe)
    minmax = solve_scales(stats, recipe.model_copy(update={"key": recipe.key.model_copy(update={"observer": "minmax"}),
                                                    "value": recipe.value.model_copy(update={"observer": "minmax"})}))
    assert bool((scales.layers[0].k_scale <= minmax.layers[0].k_scale).all())
    stats.reservoir = None
    with pytest.raises(UsageError, match="hold no Q/K/V rows"):
        solve_scales(stats, recipe)


def test_the_reservoir_keeps_prefixes_and_resumes_exactly(tmp_path):
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(2, 2, 10, 4, generator=gen), torch.randn(2, 3, 10, 4, generator=gen)) for _ in range(12)]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False  # sample 1 left-padded: its real tokens start at position 3

    def feed(stats, which):
        observer = StatsConsumer(stats)
        for b in which:
            kv, qq = batches[b]
            observer.kv(CapturedKV(0, kv, kv * 2, mask, batch_index=b))
            observer.query(CapturedQuery(0, qq, mask, batch_index=b))

    whole = KVStats(reservoir=Reservoir(chunks=3, tokens=6, seed=7))
    feed(whole, range(12))
    assert whole.reservoir.seen == 24 and whole.reservoir.kept == 3
    half = KVStats(reservoir=Reservoir(chunks=3, tokens=6, seed=7))
    feed(half, range(5))
    path = tmp_path / "stats.safetensors"
    path.write_bytes(half.to_bytes())  # what a partial save writes and --resume reads
    resumed = KVStats.load(path)
    feed(resumed, range(5, 12))
    for w in ("q", "k", "v"):
        assert torch.equal(resumed.reservoir.rows[w][0], whole.reservoir.rows[w][0])
    # every kept K chunk is the 6-token prefix of the real tokens of some sample
    prefixes = [kv[b][:, (mask[b].nonzero().flatten())[:6]] for kv, _ in batches for b in range(2)]
    for chunk in whole.reservoir.rows["k"][0]:
        assert any(torch.equal(chunk, p) for p in prefixes)
