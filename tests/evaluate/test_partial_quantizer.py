"""PartialQuantizer: skipped layers are exactly the unquantized model, the others exactly the artifact's."""

from __future__ import annotations

import pytest
import torch

from kvq.artifacts.scales import KVScales
from kvq.data import load_documents
from kvq.evaluation import (
    DYNAMIC_RECIPES,
    DynamicQuantizer,
    IdentityQuantizer,
    KVShape,
    StaticQuantizer,
    eval_windows,
    measure,
)
from kvq.evaluation.quant_cache import PartialQuantizer
from kvq.model.loading import load_model

RTOL = 2e-5  # the labels= loss is a float32 mean (see test_perplexity_oracle.py)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def windows(tiny):
    return eval_windows(load_documents("pydoc", purpose="evaluation").documents, tiny.tokenizer, 32, 3)


@pytest.fixture(scope="module")
def int8(tiny_artifacts):
    return StaticQuantizer(KVScales.load(tiny_artifacts["int8"]))


def test_skipping_every_layer_is_the_models_own_loss(tiny, windows, int8):
    everything = PartialQuantizer(int8, range(3))
    measured = measure(tiny.model, windows, [everything, int8], attention_error=False)
    plan, full = measured.entries
    assert plan.window_nll == measured.baseline.window_nll  # bit for bit: no layer is touched
    with torch.inference_mode():  # oracle: transformers' own causal-LM loss, one window per call
        oracle = [float(tiny.model(input_ids=w[None], labels=w[None]).loss) for w in windows.input_ids]
    assert [nll / (windows.seqlen - 1) for nll in plan.window_nll] == pytest.approx(oracle, rel=RTOL)
    assert full.window_nll != plan.window_nll  # int8 does change the loss: the check above can fail


def test_skipping_no_layer_is_the_artifact_and_skipped_layers_pass_through(tiny, windows, int8):
    none = PartialQuantizer(int8, ())
    measured = measure(tiny.model, windows, [none, int8], attention_error=False)
    assert measured.entries[0].window_nll == measured.entries[1].window_nll
    x = torch.randn(1, 2, 5, 16)  # (batch, kv_heads, tokens, head_dim)
    skip1 = PartialQuantizer(int8, [1])
    assert torch.equal(skip1.quantize(x, 1, "k"), x)
    for layer in (0, 2):
        assert torch.equal(skip1.quantize(x, layer, "v"), int8.quantize(x, layer, "v"))
        assert not torch.equal(skip1.quantize(x, layer, "v"), x)
    assert skip1.name == "int8-asym-per-head skip 1" and skip1.describe("k") == int8.describe("k")


def test_bytes_per_token_count_skipped_layers_at_the_model_dtype(int8):
    shape = KVShape(num_layers=30, num_kv_heads=3, head_dim=64)
    per_layer = 2 * 3 * 64  # K and V elements of one layer for one token
    # static int8 codes: 1 byte per element in 28 layers (no per-token bytes); bfloat16: 2 bytes in the 2 skipped
    plan = PartialQuantizer(int8, [0, 17])
    assert plan.kv_bytes_per_token(shape, torch.bfloat16) == 28 * per_layer * 1 + 2 * per_layer * 2
    assert PartialQuantizer(int8, range(30)).kv_bytes_per_token(shape, torch.bfloat16) == \
        IdentityQuantizer().kv_bytes_per_token(shape, torch.bfloat16) == 30 * per_layer * 2
    # run-time int4: codes (half a byte) plus a 16-bit scale and zero per (token, KV head) of K and of V
    int4 = DynamicQuantizer(DYNAMIC_RECIPES["int4-dynamic-per-token"])
    want = 29 * (per_layer / 2 + 2 * 3 * 2 * 2) + 1 * per_layer * 4
    assert PartialQuantizer(int4, [5]).kv_bytes_per_token(shape, torch.float32) == want
