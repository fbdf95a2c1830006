"""Attention-output error of quantized K/V, layer by layer, each isolated from upstream error.

Method (generic: no model-specific code, no class names):

1. The probe is the capture's consumer (:mod:`kvq.capture`) during an unquantized forward, and
   every module that carries an integer ``layer_idx`` attribute is tracked on a stack while it runs
   (forward pre-hook pushes, forward hook pops).
2. When the capture hands the probe layer i's K/V, the innermost running module whose
   ``layer_idx == i`` is the module that wrote layer i's K/V: in transformers models, the attention
   module (``self_attn``). If only an outer module (the decoder layer) carries ``layer_idx``, that
   module is used, and the error is measured at its output instead.
3. When that module returns, its forward hook (registered ``with_kwargs=True``, so it gets the exact
   positional and keyword inputs) calls it again on the same inputs once per quantizer, with the
   probe handing attention that quantizer's K/V: the re-run attends over ``fake_quantize(K), fake_quantize(V)``
   of the very K/V the unquantized run used. The unquantized output is what flows on to the next
   layer, so every layer's inputs are exact and its error is its own, not accumulated upstream.
4. Per layer and quantizer: ``relative L2 = sqrt(sum |o_q - o|^2 / sum |o|^2)`` over every element
   of the module's first output (batch x tokens x hidden), accumulated in float64 over all windows.

The re-run does not touch what the forward computes: with the identity quantizer the re-run's
output equals the original bit for bit, and the error is exactly 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from kvq.capture import CapturedKV, CapturedQuery
from kvq.evaluation.quant_cache import FakeQuantize, KVQuantizer


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class AttentionErrorProbe:
    """Hooks on a model that measure, per layer, the attention-output error of each quantizer.

    Use it as the capture consumer of the unquantized forward, inside :meth:`attached`.
    """

    wants_queries = False

    def __init__(self, model: torch.nn.Module, quantizers: Sequence[KVQuantizer]):
        self.model = model
        self.quantizers = list(quantizers)
        self.err_sq: list[dict[int, float]] = [{} for _ in self.quantizers]  # per quantizer: layer -> sum sq err
        self.ref_sq: dict[int, float] = {}  # layer -> sum of squares of the unquantized output
        self.unmatched: set[int] = set()  # layers whose update ran outside any module with that layer_idx
        self._stack: list[torch.nn.Module] = []
        self._pending: dict[int, int] = {}  # id(module) -> layer index it wrote K/V for
        self._rerunning = False
        self._fake = FakeQuantize(None)  # hands attention the unquantized K/V, or a re-run's quantized ones

    # --- hooks ------------------------------------------------------------------------------------

    def _pre_hook(self, module: torch.nn.Module, args, kwargs) -> None:
        if not self._rerunning:
            self._stack.append(module)

    def kv(self, captured: CapturedKV) -> tuple[torch.Tensor, torch.Tensor]:
        """The capture's call: note which module wrote the layer, hand attention the K/V to read."""
        if not self._rerunning:
            self._note_writer(captured.layer_idx)
        return self._fake.kv(captured)

    def query(self, captured: CapturedQuery) -> None:  # wants_queries is False: never called
        return None

    def _note_writer(self, layer_idx: int) -> None:
        for module in reversed(self._stack):
            if getattr(module, "layer_idx", None) == layer_idx:
                self._pending[id(module)] = layer_idx
                return
        self.unmatched.add(layer_idx)

    def _post_hook(self, module: torch.nn.Module, args, kwargs, output) -> None:
        if self._rerunning:
            return
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        layer_idx = self._pending.pop(id(module), None)
        ref = _first_tensor(output)
        if layer_idx is None or ref is None:
            return
        self.ref_sq[layer_idx] = self.ref_sq.get(layer_idx, 0.0) + float(ref.double().square().sum())
        self._rerunning = True
        try:
            for n, quantizer in enumerate(self.quantizers):
                self._fake.quantizer = quantizer
                out = _first_tensor(module(*args, **kwargs))
                err = float((out.double() - ref.double()).square().sum())
                self.err_sq[n][layer_idx] = self.err_sq[n].get(layer_idx, 0.0) + err
        finally:
            self._rerunning = False
            self._fake.quantizer = None

    # --- use ----------------------------------------------------------------------------------------

    @contextmanager
    def attached(self) -> Iterator[AttentionErrorProbe]:
        """Hooks on every module with an integer ``layer_idx`` while the block runs."""
        handles = []
        self._stack.clear()
        self._pending.clear()
        try:
            for module in self.model.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                    handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def relative_errors(self, n: int) -> dict[int, float]:
        """Layer -> relative L2 error of quantizer ``n`` (layers whose output was all zeros are left out)."""
        return {
            i: (self.err_sq[n].get(i, 0.0) / ref) ** 0.5
            for i, ref in sorted(self.ref_sq.items())
            if ref > 0.0
        }
