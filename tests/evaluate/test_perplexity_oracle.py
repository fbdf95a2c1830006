"""Perplexity against an oracle kvq did not write: the model's own ``labels=`` loss.

transformers computes, for ``model(input_ids=w, labels=w)``, the mean cross-entropy of the logits at
positions 0..n-2 against tokens 1..n-1 (``ForCausalLMLoss``: logits upcast to float32, labels
shifted inside). kvq's baseline from :func:`kvq.evaluation.perplexity.measure` with no quantizer must
give, per window, ``summed NLL / predicted tokens`` equal to that loss, and ``ppl`` equal to
``exp`` of the loss averaged over windows (every window predicts the same number of tokens).

Tolerance: the model's loss is a float32 mean over ``n - 1`` terms (its summation error is at most
about ``(n - 1) * 2**-24`` relative: 4e-6 for n = 64, 1.5e-5 for n = 256), kvq sums float32 terms in
float64, and kvq runs windows in batches while the oracle runs one window per call (float32 matmuls
may round differently with another batch size). Hence a relative tolerance of 2e-5 on each window's
mean NLL, and on perplexity (``d ppl / ppl = d nll``).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvq.data import load_documents
from kvq.evaluation.perplexity import eval_windows, measure
from kvq.model.loading import load_model

RTOL = 2e-5


def oracle_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """transformers' own causal-LM loss of each window, one forward per window."""
    with torch.inference_mode():
        return [float(model(input_ids=w[None], labels=w[None]).loss) for w in input_ids]  # (seqlen,) -> (1, seqlen)


def assert_baseline_matches_labels_loss(model_name: str | None, seqlen: int, windows: int, batch_size: int) -> None:
    loaded = load_model(model_name, device="cpu", dtype="float32")
    text = load_documents("pydoc").documents  # built-in text: Python's own documentation
    cut = eval_windows(text, loaded.tokenizer, seqlen, windows)
    assert cut.num_windows == windows and cut.seqlen == seqlen
    measured = measure(loaded.model, cut, [], batch_size=batch_size, attention_error=False)
    got = [nll / (seqlen - 1) for nll in measured.baseline.window_nll]
    want = oracle_losses(loaded.model, cut.input_ids)
    assert got == pytest.approx(want, rel=RTOL)
    assert measured.baseline.tokens == windows * (seqlen - 1)
    assert measured.baseline.ppl == pytest.approx(math.exp(sum(want) / len(want)), rel=RTOL)
    # the oracle is not trivially satisfied: windows of different text score differently
    assert max(want) - min(want) > 10 * RTOL * max(want)


def test_tiny_model_baseline_is_the_models_own_loss(tiny_llama):
    assert_baseline_matches_labels_loss(str(tiny_llama), seqlen=64, windows=5, batch_size=2)


@pytest.mark.slow
def test_smollm2_baseline_is_the_models_own_loss():
    assert_baseline_matches_labels_loss(None, seqlen=256, windows=3, batch_size=2)
