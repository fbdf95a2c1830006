"""Quantizers of the KV cache, and the capture consumer that makes attention read their output.

An engine with a quantized KV cache quantizes K and V when it writes them and dequantizes them
when attention reads them, so attention sees ``dequantize(quantize(K))`` — in the prefill too when
the engine reads the prompt's K/V back from its paged cache (vLLM's v1 backends). :class:`FakeQuantize`
reproduces that at the cache write: the capture (:mod:`kvq.capture`) hands it every layer's new K/V
(keys after RoPE, per KV head, before ``repeat_kv``) and attention reads what it returns,
``fake_quantize(K), fake_quantize(V)``.

A quantizer (:class:`KVQuantizer`) is any object with ``quantize(x, layer_idx, which) -> Tensor``
(same shape and dtype), ``kv_bytes_per_token(shape, model_dtype)`` and what a report shows of it
(``name``, ``kind``, ``source``, ``describe(which)``). This module has the static one (scales from
``kvq calibrate`` / ``kvq solve``), the identity, and :class:`PartialQuantizer`, which leaves some
layers unquantized (a per-layer plan, vLLM's ``--kv-cache-dtype-skip-layers``);
:mod:`kvq.evaluation.dynamic` has the eval-only ones (run-time per-token modes, fp8 with scale 1.0).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, Protocol

import torch

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.capture import CapturedKV, CapturedQuery
from kvq.errors import KvqError
from kvq.kernels import fake_quantize
from kvq.model.model_spec import KVShape, layers_text
from kvq.quant.formats import FORMATS
from kvq.recipe.schema import QuantSpec

Which = Literal["k", "v"]


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class KVQuantizer(Protocol):
    """What :class:`FakeQuantize` calls on every K and V it is handed, and what a report shows of it."""

    name: str
    kind: str  # "baseline" | "static" | "uncalibrated" | "dynamic"
    source: str  # where its scales come from (a path), or how they are made

    def describe(self, which: Which) -> str:
        """How K (``"k"``) or V (``"v"``) is stored, e.g. ``int8 asym per head``."""
        ...

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        """``x`` (batch, kv_heads, tokens, head_dim) as attention reads it back from the cache."""
        ...

    def kv_bytes_per_token(self, shape: KVShape, model_dtype: torch.dtype) -> float:
        """Bytes one token takes in the KV cache, per-token quantization parameters included."""
        ...

    # optional: FP8 attention, the query is quantized too (then quantize_query is called); absent means False
    quantizes_queries: bool

    def quantize_query(self, q: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """``q`` (batch, heads, tokens, head_dim) as FP8 attention reads it."""
        ...


def describe_spec(spec: QuantSpec) -> str:
    """``int8 asym per head`` style text for a table."""
    sym = "sym" if spec.symmetric else "asym"
    return f"{spec.format} {sym} per {spec.granularity}"


class IdentityQuantizer:
    """Returns K and V as they are: the unquantized cache, through the same code path."""

    name = "identity"
    kind = "baseline"
    source = "model dtype, unquantized"
    quantizes_queries = False

    def describe(self, which: Which) -> str:
        return "unquantized"

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        return x

    def kv_bytes_per_token(self, shape: KVShape, model_dtype: torch.dtype) -> float:
        return float(shape.elements_per_token * dtype_bytes(model_dtype))


class StaticQuantizer:
    """Fake-quantizes with fixed scales (and zero points) per layer: a calibrated artifact.

    ``kvq.kernels.fake_quantize`` runs the Triton kernel on CUDA tensors and the torch reference on
    the CPU; both follow :mod:`kvq.quant.qparams`. Static scales cost no bytes per token (a few floats per
    layer, whatever the context length), so the bytes per token are the codes alone.
    """

    def __init__(self, scales: KVScales, name: str | None = None, source: str = ""):
        self.scales = scales
        self.recipe = scales.recipe
        self.name = name or scales.recipe.name
        self.kind = "static"
        self.source = source
        self.quantizes_queries = scales.recipe.query is not None
        self._on_device: dict[tuple[torch.device, int], LayerScales] = {}

    def _layer(self, layer_idx: int, device: torch.device) -> LayerScales:
        key = (device, layer_idx)
        cached = self._on_device.get(key)
        if cached is None:
            layer = self.scales.layers.get(layer_idx)
            if layer is None:
                raise KvqError(
                    f"recipe {self.name}: the scales have no layer {layer_idx} "
                    f"(they hold layers {min(self.scales.layers)}..{max(self.scales.layers)})",
                    hint="calibrate this model to get scales for every layer",
                )
            cached = layer.to(device)
            self._on_device[key] = cached
        return cached

    def describe(self, which: Which) -> str:
        return describe_spec(self.recipe.spec(which))

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        layer = self._layer(layer_idx, x.device)
        spec = self.recipe.spec(which)
        return fake_quantize(x, layer.scale(which), layer.zero_point(which), spec.format)

    def quantize_query(self, q: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """The query through fp8 with the calibrated q_scale (per tensor, or per attention head). A layer without
        a KV cache of its own (Gemma 4's KV sharing: preflight checked the scales cover every layer that has one)
        has no calibrated query: vLLM quantizes it at q_scale 1.0, and so does this."""
        if layer_idx not in self.scales.layers:
            return fake_quantize(q, torch.ones((), dtype=torch.float32, device=q.device), None,
                                 self.recipe.query.format)
        layer = self._layer(layer_idx, q.device)
        return fake_quantize(q, layer.q_scale, None, self.recipe.query.format)

    def kv_bytes_per_token(self, shape: KVShape, model_dtype: torch.dtype) -> float:
        return (shape.elements_of("k") * FORMATS[self.recipe.key.format].bits
                + shape.elements_of("v") * FORMATS[self.recipe.value.format].bits) / 8


class PartialQuantizer:
    """``inner`` on every layer but those in ``skip``, which stay unquantized (in the model dtype).

    What an engine does with a per-layer plan: vLLM's ``--kv-cache-dtype-skip-layers`` gives those
    layers a cache in the model dtype (``kv_cache_dtype = "auto"``), the others the quantized one.
    Also "only layer i quantized" (``skip`` = every other layer), for per-layer sensitivity.
    """

    def __init__(self, inner: KVQuantizer, skip: Collection[int], name: str | None = None):
        self.inner = inner
        self.skip_layers: tuple[int, ...] = tuple(sorted(set(skip)))
        self._skip = frozenset(self.skip_layers)
        self.name = name or f"{inner.name} skip {layers_text(self.skip_layers) or 'none'}"
        self.kind = inner.kind
        self.source = inner.source
        self.quantizes_queries = getattr(inner, "quantizes_queries", False)

    def describe(self, which: Which) -> str:
        return self.inner.describe(which)

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        return x if layer_idx in self._skip else self.inner.quantize(x, layer_idx, which)

    def quantize_query(self, q: torch.Tensor, layer_idx: int) -> torch.Tensor:
        # a skipped layer's cache is in the model dtype: its attention is not FP8, the query stays as it is
        return q if layer_idx in self._skip else self.inner.quantize_query(q, layer_idx)

    def kv_bytes_per_token(self, shape: KVShape, model_dtype: torch.dtype) -> float:
        """The quantized layers at ``inner``'s cost, the skipped ones at the model dtype's."""
        quantized = shape.without_layers(self._skip)
        plain = shape.only_layers(self._skip)
        return (self.inner.kv_bytes_per_token(quantized, model_dtype)
                + IdentityQuantizer().kv_bytes_per_token(plain, model_dtype))


class FakeQuantize:
    """The capture consumer that hands attention ``quantizer``'s K/V, as an engine's quantized cache does.

    ``quantizer`` None (or :class:`IdentityQuantizer`) hands attention the K/V themselves. It may be
    changed between calls (the attention-error probe switches it for its re-runs).
    """

    def __init__(self, quantizer: KVQuantizer | None = None):
        self.quantizer = quantizer

    @property
    def wants_queries(self) -> bool:
        """Whether the quantizer also quantizes the query (FP8 attention with a calibrated q_scale)."""
        # optional in a quantizer: one without the attribute leaves the query alone
        return self.quantizer is not None and getattr(self.quantizer, "quantizes_queries", False)

    def kv(self, captured: CapturedKV) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quantizer is None:
            return captured.key, captured.value
        return (self.quantizer.quantize(captured.key, captured.layer_idx, "k"),
                self.quantizer.quantize(captured.value, captured.layer_idx, "v"))

    def query(self, captured: CapturedQuery) -> torch.Tensor | None:
        if not self.wants_queries:
            return None
        return self.quantizer.quantize_query(captured.query, captured.layer_idx)
