"""Folded transforms change nothing the model computes, and change K and V exactly as they claim.

Oracles: the original model's own logits, keys and values (captured before the fold), and the plan's
factors and matrices applied to those by hand: k' * s == k, v' == v @ R.

Tolerance. Weights are folded in float64 and rounded once to float32, so each folded weight carries
one float32 rounding (relative 6e-8) it did not have; through three layers of float32 matmuls,
softmax and norms this shows in the logits as at most 8e-7 x their largest magnitude (measured on
every model here). We allow 2e-5 x max |logit| (atol) and rtol 1e-4: 25x that rounding, and ~400x
below what a fold wrong in a single channel of one layer does (7e-3, the negative control below).
"""

import dataclasses

import pytest
import tiny_models
import torch
from transformers import Olmo2Config

from kvq.capture import CaptureCache, forward
from kvq.transforms import (
    RotateValues,
    SmoothKeys,
    apply_transforms,
    measure_qk_absmax,
    plan_transforms,
    weights_hash,
)

ARCHS = ["llama", "llama_bias", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt_neox", "qwen3", "gemma3",
         "cohere"]
TRANSFORMS = {"smooth": [SmoothKeys(0.5)], "rotate": [RotateValues(3)], "both": [SmoothKeys(0.5), RotateValues(3)]}




class Recorder:
    """Keeps every layer's K and V (a capture consumer that changes nothing)."""

    wants_queries = False

    def __init__(self):
        self.states = {}

    def kv(self, captured):
        self.states[captured.layer_idx] = (captured.key.clone(), captured.value.clone())
        return captured.key, captured.value


def run(model, ids):
    """(logits, {layer: (K, V)}) of one pass over ``ids``."""
    recorder = Recorder()
    with torch.inference_mode():
        out = forward(model, ids, CaptureCache(recorder, config=model.config))
    return out.logits.clone(), recorder.states


def assert_same_logits(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("which", sorted(TRANSFORMS))
@pytest.mark.parametrize("arch", ARCHS)
def test_fold_keeps_logits_and_transforms_kv(tiny, ids, calibration, arch, which):
    model = tiny(arch)
    logits, states = run(model, ids)
    stats = measure_qk_absmax(model, calibration())
    plan = plan_transforms(model, TRANSFORMS[which], stats)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tensors = apply_transforms(model, plan)
    new_logits, new_states = run(model, ids)

    assert_same_logits(new_logits, logits)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(tensors) and changed <= set(model.state_dict())
    for i, (k, v) in states.items():
        k_new, v_new = new_states[i]
        if plan.key_factors is not None:
            s = plan.key_factors[i].float()[None, :, None, :]  # (kv_heads, d) -> (1, kv_heads, 1, d)
            assert not torch.allclose(k_new, k)
            torch.testing.assert_close(k_new * s, k, rtol=1e-4, atol=1e-5 * float(k.abs().max()))
        else:
            torch.testing.assert_close(k_new, k, rtol=1e-5, atol=1e-6 * float(k.abs().max()))
        if plan.value_rotations is not None:
            r = plan.value_rotations[i].float()  # (kv_heads, d, d)
            assert not torch.allclose(v_new, v)
            torch.testing.assert_close(v_new, torch.einsum("bgsd,gde->bgse", v, r), rtol=1e-4,
                                       atol=1e-5 * float(v.abs().max()))
        else:
            torch.testing.assert_close(v_new, v, rtol=1e-5, atol=1e-6 * float(v.abs().max()))


def test_cohere_with_per_head_qk_layernorm(tiny, ids, calibration):
    """Cohere's use_qk_norm: a LayerNorm with a (heads, head_dim) weight, folded per head."""
    model = tiny("cohere", use_qk_norm=True)
    logits, _ = run(model, ids)
    plan = plan_transforms(model, TRANSFORMS["both"], measure_qk_absmax(model, calibration()))
    assert plan.layers[0].k_norm is not None and plan.layers[0].k_norm.per_head
    tensors = apply_transforms(model, plan)
    assert any(name.endswith("k_norm.weight") for name in tensors)
    assert_same_logits(run(model, ids)[0], logits)


def test_olmo2_norms_over_all_heads_at_once(tiny, ids, calibration):
    """OLMo2 normalises the whole q_proj / k_proj output: a (heads * head_dim) weight, folded per head."""
    model = tiny(Olmo2Config(**tiny_models.COMMON, num_key_value_heads=2, eos_token_id=2))
    logits, _ = run(model, ids)
    plan = plan_transforms(model, TRANSFORMS["both"], measure_qk_absmax(model, calibration()))
    assert plan.layers[0].k_norm.per_head and plan.layers[0].q_norm.per_head
    apply_transforms(model, plan)
    assert_same_logits(run(model, ids)[0], logits)


def test_rotation_of_a_head_dim_that_is_not_a_power_of_two(tiny, ids, calibration):
    model = tiny("llama", head_dim=12)
    logits, _ = run(model, ids)
    apply_transforms(model, plan_transforms(model, [RotateValues(0)]))
    assert_same_logits(run(model, ids)[0], logits)


def test_factors_unequal_within_a_rope_pair_break_the_model(tiny, ids, calibration):
    """The negative control: the tolerance above does catch a fold that ignores RoPE's pairs."""
    model = tiny("llama")
    logits, _ = run(model, ids)
    plan = plan_transforms(model, [SmoothKeys(0.5)], measure_qk_absmax(model, calibration()))
    broken = [s.clone() for s in plan.key_factors]
    broken[0][:, 0] *= 2.0  # channel 0 pairs with channel head_dim / 2, which keeps its factor
    apply_transforms(model, dataclasses.replace(plan, key_factors=tuple(broken)))
    with pytest.raises(AssertionError):
        assert_same_logits(run(model, ids)[0], logits)


@pytest.mark.parametrize(("arch", "which", "suffixes"), [
    ("llama_bias", "both", {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
                            "v_proj.bias", "o_proj.weight"}),  # o_proj's bias is added after the heads: untouched
    ("qwen3", "smooth", {"q_norm.weight", "k_norm.weight"}),  # the norm undoes any projection scaling
    ("phi3", "both", {"qkv_proj.weight", "o_proj.weight"}),
])
def test_only_the_folded_tensors_come_back_by_state_dict_name(tiny, calibration, arch, which, suffixes):
    model = tiny(arch)
    tensors = apply_transforms(model, plan_transforms(model, TRANSFORMS[which], measure_qk_absmax(model, calibration())))
    expected = {f"model.layers.{i}.self_attn.{suffix}" for i in range(3) for suffix in suffixes}
    assert set(tensors) == expected
    state = model.state_dict()
    assert all(torch.equal(tensors[name], state[name]) and tensors[name].dtype == torch.float32 for name in tensors)


def test_weights_hash_covers_names_dtypes_shapes_and_bytes():
    a = {"x.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y.bias": torch.ones(3)}
    digest = weights_hash(a)
    assert len(digest) == 64 and digest == weights_hash(dict(reversed(list(a.items()))))
    nudged = a["x.weight"].clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(100.0))  # one ulp
    variants = [{**a, "x.weight": nudged}, {**a, "x.weight": a["x.weight"].reshape(3, 2)},
                {**a, "x.weight": a["x.weight"].double()}, {"z.weight": a["x.weight"], "y.bias": a["y.bias"]},
                {**a, "y.bias": torch.ones(3, dtype=torch.bfloat16)}]
    assert len({digest, *(weights_hash(v) for v in variants)}) == 1 + len(variants)
