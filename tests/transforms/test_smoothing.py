"""Key smoothing factors: SmoothAttention's formula by hand, the RoPE-pair and shared-norm constraints,
and what smoothing is for: it flattens planted outlier channels of K without changing the logits."""

import math

import pytest
import torch

from kvq.capture import CaptureCache, forward
from kvq.errors import UsageError
from kvq.transforms import (
    QKAbsMax,
    RotateValues,
    SmoothKeys,
    apply_transforms,
    describe_attention,
    measure_qk_absmax,
    plan_transforms,
)
from kvq.transforms.factors import MAX_FACTOR, smoothing_factors


def hand_stats() -> QKAbsMax:
    """4 query heads, 2 KV heads, head_dim 16 (rotate_half pairs (i, i + 8))."""
    q = torch.ones(4, 16, dtype=torch.float64)
    k = torch.ones(2, 16, dtype=torch.float64)
    q[1, 0] = 4.0  # query head 1 reads KV head 0
    k[0, 8] = 9.0  # channel 8 pairs with channel 0
    k[0, 3] = k[0, 11] = 0.0  # a dead key pair
    k[0, 2] = k[0, 10] = 1e12  # beyond any sane factor
    return QKAbsMax(q, k)


def test_factors_follow_smoothattention_with_pairs_made_equal(tiny):
    layer = describe_attention(tiny("llama"))[0]
    s = smoothing_factors(layer, hand_stats(), alpha=0.5)
    expected = torch.ones(2, 16, dtype=torch.float64)
    expected[0, 0] = expected[0, 8] = math.sqrt(9.0) / math.sqrt(4.0)  # pair maxima: k 9, q 4
    expected[0, 2] = expected[0, 10] = MAX_FACTOR  # sqrt(1e12) = 1e6, clamped
    torch.testing.assert_close(s, expected, rtol=1e-15, atol=0)


def test_a_shared_qk_norm_gets_one_factor_per_channel(tiny):
    layer = describe_attention(tiny("qwen3"))[0]
    assert layer.k_norm is not None and not layer.k_norm.per_head
    s = smoothing_factors(layer, hand_stats(), alpha=0.5)
    assert torch.equal(s[0], s[1]) and s[1, 0] == s[1, 8] == 1.5


def test_alpha_one_and_zero(tiny):
    layer = describe_attention(tiny("llama"))[0]
    stats = QKAbsMax(torch.full((4, 16), 2.0, dtype=torch.float64), torch.full((2, 16), 8.0, dtype=torch.float64))
    assert torch.all(smoothing_factors(layer, stats, 1.0) == 8.0)  # k^1 / q^0
    assert torch.all(smoothing_factors(layer, stats, 0.0) == 0.5)  # k^0 / q^1


def k_channel_ratio(model, ids) -> tuple[float, torch.Tensor]:
    """(max / mean over channels of per-channel max |K|, worst (layer, KV head); the logits)."""
    class Keys:
        wants_queries = False
        absmax = {}

        def kv(self, captured):
            self.absmax[captured.layer_idx] = captured.key.abs().amax(dim=(0, 2))  # (kv_heads, d)
            return captured.key, captured.value

    keys = Keys()
    with torch.inference_mode():
        logits = forward(model, ids, CaptureCache(keys, config=model.config)).logits
    ratio = max(float((a.amax(dim=1) / a.mean(dim=1)).max()) for a in keys.absmax.values())
    return ratio, logits


def test_smoothing_flattens_planted_outlier_channels(tiny, ids, calibration):
    model = tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[[3, 21]] *= 40.0  # KV head 0 channel 3, KV head 1 channel 5
    before, logits = k_channel_ratio(model, ids)
    plan = plan_transforms(model, [SmoothKeys(0.5)], measure_qk_absmax(model, calibration()))
    apply_transforms(model, plan)
    after, new_logits = k_channel_ratio(model, ids)
    assert before > 5 and after < before / 2, (before, after)
    torch.testing.assert_close(new_logits, logits, rtol=1e-4, atol=2e-5 * float(logits.abs().max()))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(UsageError, match="alpha"):
        SmoothKeys(alpha)


def test_bad_plans_are_refused(tiny, calibration):
    model = tiny("llama")
    with pytest.raises(UsageError, match="needs query/key ranges"):
        plan_transforms(model, [SmoothKeys()])
    with pytest.raises(UsageError, match="twice"):
        plan_transforms(model, [RotateValues(0), RotateValues(1)])
    with pytest.raises(UsageError, match="seed"):
        RotateValues(-1)
    stats = measure_qk_absmax(model, calibration())
    bad = [QKAbsMax(s.query, s.key * float("inf")) for s in stats]
    with pytest.raises(UsageError, match="not finite"):
        plan_transforms(model, [SmoothKeys()], bad)
    plan = plan_transforms(model, [SmoothKeys()], stats)
    other = tiny("qwen3")
    untouched = {name: p.clone() for name, p in other.state_dict().items()}
    with pytest.raises(UsageError, match="different attention layout"):
        apply_transforms(other, plan)
    assert all(torch.equal(p, untouched[name]) for name, p in other.state_dict().items())


def test_a_plan_applies_once(tiny, calibration):
    model = tiny("gemma3")
    plan = plan_transforms(model, [SmoothKeys(), RotateValues()], measure_qk_absmax(model, calibration()))
    apply_transforms(model, plan)
    once = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(UsageError, match="not the ones the transform plan was made for"):
        apply_transforms(model, plan)
    assert all(torch.equal(p, once[name]) for name, p in model.state_dict().items())
