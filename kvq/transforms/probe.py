"""One short forward pass that records, per layer, what attention was given and what it produced.

For each attention module: its input hidden states and the (cos, sin) it was handed (a forward
pre-hook), and through :mod:`kvq.capture` the K/V it cached and the queries it attended with. The
description of a layer (:mod:`kvq.transforms.describe`) is read off and checked against these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvq.capture import CaptureCache, decoder_of, forward, input_device
from kvq.errors import UsageError

PROBE_TOKENS = 8


@dataclass
class LayerProbe:
    hidden: torch.Tensor | None = None  # (1, seq, hidden) the attention module's input
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # each (1, seq, rotary_dims)
    key: torch.Tensor | None = None  # (1, kv_heads, seq, head_dim), after RoPE
    value: torch.Tensor | None = None  # (1, kv_heads, seq, head_dim)
    query: torch.Tensor | None = None  # (1, heads, seq, head_dim), after RoPE


@dataclass
class _Recorder:
    layers: dict[int, LayerProbe] = field(default_factory=dict)
    wants_queries: bool = True

    def kv(self, captured):
        probe = self.layers.setdefault(captured.layer_idx, LayerProbe())
        probe.key, probe.value = captured.key.clone(), captured.value.clone()
        return captured.key, captured.value

    def query(self, captured):
        self.layers.setdefault(captured.layer_idx, LayerProbe()).query = captured.query.clone()


def probe_layers(model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]]) -> dict[int, LayerProbe]:
    """Run ``PROBE_TOKENS`` tokens through the decoder; per layer index, what its attention saw and made."""
    recorder = _Recorder()

    def pre_hook(module, args, kwargs):
        probe = recorder.layers.setdefault(module.layer_idx, LayerProbe())
        probe.hidden = (kwargs.get("hidden_states", args[0] if args else None))
        if probe.hidden is not None:
            probe.hidden = probe.hidden.clone()
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is None and len(args) > 1 and isinstance(args[1], tuple):
            cos_sin = args[1]
        probe.cos_sin = tuple(t.clone() for t in cos_sin) if isinstance(cos_sin, tuple) else None

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True) for _, module in modules]
    ids = torch.arange(1, PROBE_TOKENS + 1, device=input_device(model))[None, :]  # (1, seq)
    decoder = decoder_of(model)
    try:
        with torch.inference_mode():
            forward(decoder, ids, CaptureCache(recorder, config=model.config))
    finally:
        for handle in handles:
            handle.remove()
    for name, module in modules:
        probe = recorder.layers.get(module.layer_idx)
        if probe is None or probe.hidden is None or probe.key is None or probe.query is None:
            raise UsageError(f"attention {name} (layer {module.layer_idx}) was not seen in a forward pass "
                             "with its inputs, keys and queries; kvq cannot check how it computes them")
    return recorder.layers
