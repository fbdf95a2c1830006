"""The attention-output error probe: exact zeros where math says so, isolation between layers."""

from __future__ import annotations

import pytest
import torch

from kvq.capture import CaptureCache
from kvq.data import load_documents
from kvq.evaluation import (
    DYNAMIC_RECIPES,
    AttentionErrorProbe,
    DynamicQuantizer,
    FakeQuantize,
    IdentityQuantizer,
    eval_windows,
    measure,
    window_nll,
)
from kvq.evaluation.quant_cache import Which
from kvq.model.loading import load_model


class OnlyLayer:
    """Quantizes the K/V of one layer with ``inner`` and leaves every other layer exact."""

    kind = "test"
    source = "test"

    def __init__(self, inner, layer: int):
        self.inner, self.layer = inner, layer
        self.name = f"{inner.name}@{layer}"

    def describe(self, which: Which) -> str:
        return self.inner.describe(which)

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        return self.inner.quantize(x, layer_idx, which) if layer_idx == self.layer else x

    def kv_bytes_per_token(self, shape, model_dtype) -> float:
        return self.inner.kv_bytes_per_token(shape, model_dtype)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


@pytest.fixture(scope="module")
def windows(tiny):
    return eval_windows(load_documents("pydoc", purpose="evaluation").documents, tiny.tokenizer, 48, 2)


def test_identity_gives_exactly_zero_and_every_layer_is_found(tiny, windows):
    int4 = DynamicQuantizer(DYNAMIC_RECIPES["int4-dynamic-per-token"])
    result = measure(tiny.model, windows, [IdentityQuantizer(), int4])
    layers = list(range(tiny.info.num_layers))
    assert result.unmatched_layers == []
    assert sorted(result.entries[0].attention_error) == layers
    assert all(e == 0.0 for e in result.entries[0].attention_error.values())
    assert all(e > 0.0 for e in result.entries[1].attention_error.values())


def test_each_layer_error_is_isolated_from_upstream_layers(tiny, windows):
    int4 = DynamicQuantizer(DYNAMIC_RECIPES["int4-dynamic-per-token"])
    only = [OnlyLayer(int4, i) for i in range(tiny.info.num_layers)]
    result = measure(tiny.model, windows, [int4, *only])
    full = result.entries[0].attention_error
    for n, entry in enumerate(result.entries[1:]):
        errors = entry.attention_error
        # Quantizing only layer n: layer n's error is what it is with every layer quantized (its inputs are
        # exact either way), and every other layer, downstream included, has none.
        assert errors[n] == full[n]
        assert all(errors[i] == 0.0 for i in errors if i != n)


def test_probe_matches_a_direct_rerun_of_the_attention_module(tiny, windows):
    """Layer 0's attention sees the embeddings only: re-running it by hand gives the same error."""
    model = tiny.model
    int4 = DynamicQuantizer(DYNAMIC_RECIPES["int4-dynamic-per-token"])
    ids = windows.input_ids[:1]  # (1, seqlen)
    probe = AttentionErrorProbe(model, [int4])
    captured = {}
    attn0 = next(m for m in model.modules() if getattr(m, "layer_idx", None) == 0
                 and not any(getattr(c, "layer_idx", None) == 0 for c in m.children()))

    def grab(module, args, kwargs, output):
        captured.setdefault("call", (args, dict(kwargs), output[0].clone()))

    handle = attn0.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode(), probe.attached():
            window_nll(model, ids, probe)
    finally:
        handle.remove()
    args, kwargs, ref = captured["call"]
    name = "cache" if "cache" in kwargs else "past_key_values"
    kwargs[name] = CaptureCache(FakeQuantize(int4), config=model.config)
    with torch.inference_mode():
        out = attn0(*args, **kwargs)[0]
    want = ((out.double() - ref.double()).square().sum() / ref.double().square().sum()).sqrt()
    assert probe.relative_errors(0)[0] == pytest.approx(float(want), rel=1e-12)
