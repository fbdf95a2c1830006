"""The fake-quantized cache (the capture's FakeQuantize consumer) and perplexity: exact properties on a tiny random Llama (GQA)."""

from __future__ import annotations

import math

import pytest
import torch

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.capture import CaptureCache
from kvq.data import Document, load_documents
from kvq.errors import KvqError, UsageError
from kvq.evaluation import (
    DYNAMIC_RECIPES,
    EVAL_ONLY_RECIPE_NAMES,
    DynamicQuantizer,
    FakeQuantize,
    IdentityQuantizer,
    KVShape,
    StaticQuantizer,
    UnitScaleQuantizer,
    eval_only_quantizer,
    eval_windows,
    measure,
    window_nll,
)
from kvq.kernels import qdq_static
from kvq.model.loading import load_model
from kvq.recipe.schema import load_recipe


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), device="cpu")


@pytest.fixture(scope="module")
def windows(tiny):
    docs = load_documents("pydoc", purpose="evaluation").documents
    return eval_windows(docs, tiny.tokenizer, seqlen=32, max_windows=3)


def test_identity_cache_loss_is_bit_equal_to_the_plain_forward(tiny, windows):
    model = tiny.model
    with torch.inference_mode():
        for row in range(windows.num_windows):
            ids = windows.input_ids[row : row + 1]  # (1, seqlen)
            plain = window_nll(model, ids, None)
            assert window_nll(model, ids, FakeQuantize(None)) == plain
            assert window_nll(model, ids, FakeQuantize(IdentityQuantizer())) == plain
    result = measure(model, windows, [IdentityQuantizer()])
    assert result.entries[0].nll == result.baseline.nll
    assert result.entries[0].ppl == result.baseline.ppl
    with torch.inference_mode():
        plain_total = sum(window_nll(model, windows.input_ids[r : r + 1], None) for r in range(windows.num_windows))
    assert result.baseline.nll == plain_total  # the probe riding on the baseline changes nothing
    assert result.baseline.tokens == windows.num_windows * (windows.seqlen - 1)
    assert result.baseline.ppl == math.exp(plain_total / result.baseline.tokens)


def test_quantized_cache_changes_the_loss(tiny, windows, tiny_artifacts):
    q = StaticQuantizer(KVScales.load(tiny_artifacts["int8"]))
    int4 = DynamicQuantizer(DYNAMIC_RECIPES["int4-dynamic-per-token"])
    result = measure(tiny.model, windows, [q, int4], attention_error=False)
    assert result.entries[0].nll != result.baseline.nll
    assert result.entries[1].nll != result.baseline.nll
    assert all(e.attention_error is None for e in result.entries)


def _grid_values(scale: torch.Tensor, zp: torch.Tensor | None, qmin: int, qmax: int, shape) -> torch.Tensor:
    """(q - zp) * scale for random integer codes q: values every scale puts exactly on its grid."""
    q = torch.randint(qmin, qmax + 1, shape).to(torch.float32)  # (b, h, t, d)
    zpf = 0.0 if zp is None else zp.reshape(1, -1, 1, 1).to(torch.float32)  # (h,) -> (1, h, 1, 1)
    return (q - zpf) * scale.reshape(1, -1, 1, 1)  # (h,) -> (1, h, 1, 1)


def test_scales_putting_every_value_on_the_grid_give_zero_error():
    scale = torch.tensor([0.5, 0.25], dtype=torch.float32)  # per head, powers of two: exact products
    zp = torch.tensor([3, -7], dtype=torch.int32)
    k = _grid_values(scale, zp, -128, 127, (2, 2, 5, 16))
    v = _grid_values(scale, None, -127, 127, (2, 2, 5, 16))
    recipe = load_recipe("int8-asym-per-head").model_copy(
        update={"value": load_recipe("int8-sym-per-head").value}
    )
    scales = KVScales(recipe, {0: LayerScales(scale, scale, zp, None)})
    cache = CaptureCache(FakeQuantize(StaticQuantizer(scales)))
    k_out, v_out = cache.update(k, v, 0)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)
    # The same values off the grid move.
    k_off, _ = cache.update(k + 0.1, v, 0)
    assert not torch.equal(k_off, k + 0.1)


def test_static_quantizer_is_the_reference_round_trip_per_layer(tiny_artifacts):
    scales = KVScales.load(tiny_artifacts["int8"])
    q = StaticQuantizer(scales)
    x = torch.randn(1, 2, 7, 16)
    for i in scales.layers:
        for which in ("k", "v"):
            layer = scales.layers[i]
            want = qdq_static(x, layer.scale(which), layer.zero_point(which), "int8")
            assert torch.equal(q.quantize(x, i, which), want)
    with pytest.raises(KvqError, match="no layer 9"):
        q.quantize(x, 9, "k")


def test_unit_scale_fp8_is_a_plain_cast_with_saturation():
    q = UnitScaleQuantizer("fp8_e4m3", "fp8_e4m3")
    x = torch.tensor([0.3, -1.7, 500.0, -1000.0]).reshape(1, 1, 4, 1)  # (b, h, t, d)
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(q.quantize(x, 0, "k"), want)
    assert q.name == "fp8-e4m3-scale-1.0"


def test_kv_bytes_per_token():
    shape = KVShape(num_layers=30, num_kv_heads=3, head_dim=64)
    elements = 2 * 30 * 3 * 64
    assert IdentityQuantizer().kv_bytes_per_token(shape, torch.float32) == elements * 4
    assert IdentityQuantizer().kv_bytes_per_token(shape, torch.bfloat16) == elements * 2
    scales = KVScales(load_recipe("int4-asym-per-head"), {})
    assert StaticQuantizer(scales).kv_bytes_per_token(shape, torch.bfloat16) == elements / 2
    int8 = DynamicQuantizer(DYNAMIC_RECIPES["int8-dynamic-per-token"])
    # codes + (scale, zero) x 2 bytes per (layer, KV head) of K and of V
    assert int8.kv_bytes_per_token(shape, torch.bfloat16) == elements + 2 * 30 * 3 * 2 * 2
    assert UnitScaleQuantizer("fp8_e5m2", "fp8_e5m2").kv_bytes_per_token(shape, torch.bfloat16) == elements


def test_eval_only_recipe_names():
    assert isinstance(eval_only_quantizer("int8-dynamic-per-token"), DynamicQuantizer)
    assert isinstance(eval_only_quantizer("fp8-e5m2-scale-1.0"), UnitScaleQuantizer)
    with pytest.raises(UsageError) as bad:
        eval_only_quantizer("int3-dynamic")
    for name in EVAL_ONLY_RECIPE_NAMES:
        assert name in bad.value.message
    with pytest.raises(UsageError, match="uses calibrated scales") as static:
        eval_only_quantizer("int8-asym-per-head")
    assert "--scales" in static.value.hint


def test_windows_are_consecutive_and_non_overlapping(tiny):
    tok = tiny.tokenizer
    docs = [Document(text="alpha beta gamma " * 30), Document(text="  "), Document(text="delta epsilon " * 30)]
    w = eval_windows(docs, tok, seqlen=16, max_windows=None)
    stream = tok(docs[0].text)["input_ids"] + [tok.eos_token_id] + tok(docs[2].text)["input_ids"]
    count = len(stream) // 16
    assert w.num_windows == count and w.documents_used == 2
    assert w.input_ids.reshape(-1).tolist() == stream[: count * 16]
    assert eval_windows(docs, tok, seqlen=16, max_windows=2).input_ids.tolist() == w.input_ids[:2].tolist()
    with pytest.raises(KvqError, match="fewer than one window"):
        eval_windows([Document(text="too short")], tok, seqlen=64, max_windows=None)


def test_paired_stderr_of_the_nll_difference():
    from kvq.evaluation.perplexity import paired_stderr

    # Per-token differences 0, 1, 2: mean 1, sample variance 1, standard error sqrt(1 / 3).
    assert paired_stderr([10.0, 12.0, 14.0], [10.0, 10.0, 10.0], 2) == pytest.approx(math.sqrt(1 / 3), rel=1e-15)
    assert paired_stderr([5.0, 7.0], [4.0, 6.0], 1) == 0.0  # the same difference in every window
    assert math.isnan(paired_stderr([1.0], [0.0], 1))
    with pytest.raises(ValueError):
        paired_stderr([1.0, 2.0], [1.0], 1)


@pytest.mark.gpu
def test_quantizers_on_cuda_match_the_cpu(tiny_artifacts):
    scales = KVScales.load(tiny_artifacts["int8"])
    x = torch.randn(2, 2, 33, 16) * 3
    for q in (StaticQuantizer(scales), UnitScaleQuantizer("fp8_e4m3", "fp8_e4m3"),
              DynamicQuantizer(DYNAMIC_RECIPES["int8-dynamic-per-token"])):
        for which in ("k", "v"):
            assert torch.equal(q.quantize(x.cuda(), 1, which).cpu(), q.quantize(x, 1, which))
