"""Per-layer sensitivity of a quantized KV cache: what quantizing each layer, and only it, costs.

Two measures, on the same evaluation windows as ``kvq eval`` (:func:`~kvq.evaluation.perplexity.eval_windows`):

* ``attention`` (the default, cheap): the relative L2 error of each layer's attention output, from
  :class:`~kvq.evaluation.attention_error.AttentionErrorProbe`. The probe re-runs each attention
  module on its exact unquantized inputs, so a layer's error is the same whether the other layers
  are quantized or not: one quantizer of every layer gives every layer's "only this layer
  quantized" error, for one unquantized forward plus one re-run of each attention module per batch.
* ``perplexity``: the change of the mean NLL per predicted token (nats) with only that layer
  quantized (:class:`~kvq.evaluation.quant_cache.PartialQuantizer` skipping every other layer): one
  forward per layer per batch of windows, on top of the baseline's and the all-layers one.

Both also give the mean NLL change with every layer quantized, for scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvq.artifacts.files import listed
from kvq.artifacts.layer_plan import check_skip_count, skip_most_sensitive
from kvq.errors import KvqError
from kvq.evaluation.perplexity import EvalWindows, measure
from kvq.evaluation.quant_cache import KVQuantizer, PartialQuantizer

SENSITIVITY_MEASURES = ("attention", "perplexity")
MEASURE_TEXT = {
    "attention": "relative L2 error of the layer's attention output with its K/V quantized (inputs exact)",
    "perplexity": "change of the mean NLL per predicted token (nats) with only this layer's K/V quantized",
}


@dataclass
class LayerSensitivity:
    by: str  # one of SENSITIVITY_MEASURES
    per_layer: dict[int, float]  # layer -> sensitivity (larger: more sensitive)
    all_layers_delta_nll: float  # mean NLL change per token with every layer quantized
    stderr: dict[int, float] = field(default_factory=dict)  # perplexity: paired standard error of each value

    @property
    def description(self) -> str:
        return MEASURE_TEXT[self.by]

    def order(self) -> list[int]:
        """Layers, most sensitive first; ties by layer index."""
        return sorted(self.per_layer, key=lambda i: (-self.per_layer[i], i))


def measure_sensitivity(model: torch.nn.Module, windows: EvalWindows, quantizer: KVQuantizer,
                        layers: int | Sequence[int], by: str = "attention", batch_size: int = 1,
                        on_batch: Callable[[int], None] | None = None) -> LayerSensitivity:
    """Each layer's sensitivity to ``quantizer`` (see the module docstring); ``layers``: those with a KV cache
    (a count: 0..layers-1); ``on_batch`` as in :func:`measure`."""
    if by not in SENSITIVITY_MEASURES:
        raise ValueError(f"unknown sensitivity measure {by!r}; one of {SENSITIVITY_MEASURES}")
    everything = set(range(layers) if isinstance(layers, int) else layers)
    if by == "attention":
        m = measure(model, windows, [quantizer], batch_size, attention_error=True, on_batch=on_batch)
        if m.unmatched_layers:
            raise KvqError(f"the attention-output error of layer(s) {listed(m.unmatched_layers)} cannot be measured "
                           "in this model (no module with that layer_idx ran when the layer wrote its K/V)",
                           hint="use --by perplexity")
        errors = m.entries[0].attention_error or {}
        # A layer the probe left out had an all-zero attention output: its K/V change nothing downstream.
        per_layer = {i: errors.get(i, 0.0) for i in sorted(everything)}
        return LayerSensitivity(by, per_layer, m.entries[0].mean_nll - m.baseline.mean_nll)
    order = sorted(everything)
    only = [PartialQuantizer(quantizer, everything - {i}, name=f"only layer {i}") for i in order]
    m = measure(model, windows, [quantizer, *only], batch_size, attention_error=False, on_batch=on_batch)
    base = m.baseline.mean_nll
    per_layer = {i: entry.mean_nll - base for i, entry in zip(order, m.entries[1:], strict=True)}
    stderr = {i: m.delta_stderr(entry) for i, entry in zip(order, m.entries[1:], strict=True)}
    return LayerSensitivity(by, per_layer, m.entries[0].mean_nll - base, stderr)


def skip_plan_quantizer(model: torch.nn.Module, windows: EvalWindows, quantizer: KVQuantizer, num_layers: int,
                        skip: int, by: str = "attention", batch_size: int = 1) -> PartialQuantizer:
    """``quantizer`` with its ``skip`` most sensitive layers (measured on ``windows``) left unquantized: a
    ``kvq plan --skip`` plan as a quantizer, for :func:`~kvq.evaluation.perplexity.measure` on other windows."""
    check_skip_count(skip, num_layers)
    sens = measure_sensitivity(model, windows, quantizer, num_layers, by, batch_size)
    return PartialQuantizer(quantizer, skip_most_sensitive(sens.order(), skip))
