"""Generation agreement (``kvq eval --generate N``): does the model still say the same thing with its KV cache
quantized? No printing.

Prompts: the first ``prompts`` evaluation windows, each cut to its first ``seqlen - N`` tokens (so prompt and
generation together fill one window). From each prompt the model generates N tokens greedily (the argmax of
the last position, the first of equal maxima), feeding each token back with the cache of the tokens before:

* the reference: the plain model with transformers' own cache, no capture;
* every row (the baseline too): through the capture with a cache that stores what the quantizer returns
  (:class:`kvq.capture.DecodingCaptureCache`), so attention reads the quantized K/V of the prompt and of every
  generated token, as in an engine's quantized cache. The baseline's quantizer returns K/V as they are, so its
  tokens are the reference's by construction: :func:`generation_agreement` checks it.

Per row and prompt: the share of the N positions whose token equals the reference's (each run continues from
its own tokens), and the number of tokens before the first that differs (N when none does). Over prompts: the
mean share (= matching tokens / all generated tokens) and the mean first difference with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvq.capture import DecodingCaptureCache, forward, input_device, plain_forward
from kvq.errors import UsageError
from kvq.evaluation.quant_cache import FakeQuantize, IdentityQuantizer, KVQuantizer

DEFAULT_PROMPTS = 8


@dataclass
class Agreement:
    """One row's agreement with the reference, per prompt."""

    shares: list[float] = field(default_factory=list)  # share of the N tokens equal to the reference's
    first_difference: list[int] = field(default_factory=list)  # tokens before the first that differs (N: none)

    @property
    def share(self) -> float:
        return sum(self.shares) / len(self.shares) if self.shares else float("nan")

    @property
    def first_difference_mean(self) -> float:
        d = self.first_difference
        return sum(d) / len(d) if d else float("nan")

    @property
    def first_difference_stderr(self) -> float:
        """Standard error of the mean over prompts (NaN with fewer than 2)."""
        d = self.first_difference
        if len(d) < 2:
            return float("nan")
        mean = sum(d) / len(d)
        return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))

    def to_json(self) -> dict:
        return {"agreement": self.share, "first_difference_mean": self.first_difference_mean,
                "first_difference_stderr": None if math.isnan(self.first_difference_stderr)
                else self.first_difference_stderr, "prompts": len(self.shares)}

    def add(self, reference: Sequence[int], tokens: Sequence[int]) -> None:
        same = [a == b for a, b in zip(reference, tokens, strict=True)]
        self.shares.append(sum(same) / len(same))
        self.first_difference.append(same.index(False) if False in same else len(same))


@dataclass
class Generation:
    """``kvq eval --generate``: the reference tokens of every prompt, the baseline's and each row's agreement."""

    tokens: int  # N, generated per prompt
    prompt_tokens: int
    reference: list[list[int]]
    baseline: Agreement
    rows: list[Agreement]  # in the order of the quantizers


def check_generate(n: int, seqlen: int) -> None:
    """Refuse a generation that leaves no prompt in a window."""
    if n >= seqlen:
        raise UsageError(f"--generate {n} leaves no prompt in a window of --seqlen {seqlen} (prompt and generated "
                         "tokens share one window)", hint=f"use --generate below {seqlen}, or a larger --seqlen")


def greedy_tokens(model: torch.nn.Module, prompt: torch.Tensor, n: int, quantizer: KVQuantizer | None) -> list[int]:
    """``n`` tokens generated greedily after ``prompt`` (1, P): by the plain model (``quantizer`` None), or with
    attention reading ``quantizer``'s K/V from a cache that stores them."""
    cache = DecodingCaptureCache(FakeQuantize(quantizer), config=model.config) if quantizer is not None else None
    ids, out_tokens = prompt, []
    plain = None
    for _ in range(n):
        if cache is None:
            out, plain = plain_forward(model, ids, plain)
        else:
            out = forward(model, ids, cache)
        token = out.logits[:, -1, :].argmax(dim=-1)  # (1,): the first of equal maxima
        out_tokens.append(int(token))
        ids = token.view(1, 1)  # (1,) -> (1, 1)
    return out_tokens


def generation_agreement(model: torch.nn.Module, windows: torch.Tensor, n: int, prompts: int,
                         quantizers: Sequence[KVQuantizer]) -> Generation:
    """Agreement of every quantizer (and the baseline) with the plain model's greedy tokens (module docstring);
    ``windows`` (count, seqlen) are the evaluation windows."""
    seqlen = int(windows.shape[1])
    check_generate(n, seqlen)
    device = input_device(model)
    cut = windows[:prompts, : seqlen - n]  # (prompts, seqlen - n)
    result = Generation(n, seqlen - n, [], Agreement(), [Agreement() for _ in quantizers])
    with torch.inference_mode():
        for row in cut:
            prompt = row.unsqueeze(0).to(device)  # (P,) -> (1, P)
            reference = greedy_tokens(model, prompt, n, None)
            result.reference.append(reference)
            result.baseline.add(reference, greedy_tokens(model, prompt, n, IdentityQuantizer()))
            for agreement, q in zip(result.rows, quantizers, strict=True):
                agreement.add(reference, greedy_tokens(model, prompt, n, q))
    return result
