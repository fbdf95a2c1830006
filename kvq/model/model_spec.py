"""What a run says about its model: which model and where (:class:`ModelSpec`), what kvq records about it
(:class:`ModelInfo`), and the shape of its KV cache (:class:`KVShape`, per layer :class:`LayerKV`). Plain data:
loading is :mod:`kvq.model.loading`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from kvq.errors import UsageError


@dataclass(frozen=True)
class LayerKV:
    """What one cached layer holds per token: ``k`` = (K heads, K dim) and ``v`` = (V heads, V dim).

    Most models cache K and V of one shape; MLA caches its latent as "keys" and the rotary key part as
    "values" (1 head each, different dims), Gemma 4's full-attention layers are wider than its sliding ones."""

    k: tuple[int, int]
    v: tuple[int, int]

    def of(self, which: str) -> tuple[int, int]:
        """(heads, dim) of ``which`` ("k" or "v")."""
        return self.k if which == "k" else self.v

    @property
    def elements(self) -> int:
        """K and V elements one token adds to this layer's cache."""
        return self.k[0] * self.k[1] + self.v[0] * self.v[1]

    def text(self) -> str:
        """The metadata form: "4x64/4x64" (K heads x dim / V heads x dim)."""
        return f"{self.k[0]}x{self.k[1]}/{self.v[0]}x{self.v[1]}"


@dataclass(frozen=True)
class KVShape:
    """What the KV cache holds per token, in every layer that has a KV cache: the one description of the
    cache's shape (the model's (:class:`ModelInfo`), an export's and an evaluation's).

    Per layer: ``shape.of(i)`` is layer i's :class:`LayerKV` (K and V (heads, dim) each). Most models are
    *uniform* (``per_layer`` None): every layer caches ``num_kv_heads`` x ``head_dim`` for K and for V alike.
    Otherwise ``per_layer`` holds one :class:`LayerKV` per layer 0..num_layers-1 (the entries of uncached
    layers are the default and mean nothing), and ``num_kv_heads`` / ``head_dim`` are the K shape of the first
    cached layer (what older readers of an artifact's metadata check). Build it with :meth:`from_layers`,
    which keeps the uniform case uniform; code that handles one shape for all layers checks :attr:`uniform`.

    ``cached_layers`` names the layers that hold a KV cache (None: all ``num_layers``). Hybrid models leave
    the others out: linear-attention / Mamba / convolution layers keep a recurrent state, not one K/V row per
    token, and KV-sharing layers read another layer's cache: they are never calibrated or counted in the cache's
    memory (the vllm export gives a KV-sharing layer the scales of the layer it reads, as vLLM dequantizes with
    the reading layer's own scale: kvq.export.vllm).

    For code building on it (MLA, say): construct with :meth:`from_layers` ({layer: LayerKV}), read with
    :meth:`of`, record with :meth:`to_metadata` (read back by ``kvq.artifacts.files.StatedShape``).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    cached_layers: tuple[int, ...] | None = None
    per_layer: tuple[LayerKV, ...] | None = None

    @classmethod
    def from_layers(cls, num_layers: int, layers: dict[int, LayerKV], cached_layers: tuple[int, ...] | None
                    ) -> KVShape:
        """The shape whose cached layer i holds ``layers[i]`` (every cached layer must be there; others ignored)."""
        kv = tuple(range(num_layers)) if cached_layers is None else cached_layers
        first = layers[kv[0]]
        heads, dim = first.k
        default = LayerKV((heads, dim), (heads, dim))
        if all(layers[i] == default for i in kv):
            return cls(num_layers, heads, dim, cached_layers)
        kept = set(kv)
        return cls(num_layers, heads, dim, cached_layers,
                   tuple(layers[i] if i in kept else default for i in range(num_layers)))

    @property
    def uniform(self) -> bool:
        """Whether every layer caches K and V of one (num_kv_heads, head_dim)."""
        return self.per_layer is None

    def of(self, layer: int) -> LayerKV:
        """Layer ``layer``'s K and V (heads, dim)."""
        if self.per_layer is None:
            return LayerKV((self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim))
        return self.per_layer[layer]

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers that hold a KV cache, ascending."""
        return tuple(range(self.num_layers)) if self.cached_layers is None else self.cached_layers

    @property
    def all_layers_cached(self) -> bool:
        return self.kv_layers == tuple(range(self.num_layers))

    @property
    def elements_per_token(self) -> int:
        """K and V elements one token adds to the cache (cached layers only, each at its own shape)."""
        return self.elements_of("k") + self.elements_of("v")

    def elements_of(self, which: str) -> int:
        """K (``which`` "k") or V ("v") elements one token adds to the cache, over the cached layers."""
        if self.per_layer is None:
            return len(self.kv_layers) * self.num_kv_heads * self.head_dim
        return sum(heads * dim for heads, dim in (self.per_layer[i].of(which) for i in self.kv_layers))

    @property
    def heads_per_token(self) -> int:
        """K and V heads one token adds to the cache (cached layers only): what per-token-head parameters count."""
        if self.per_layer is None:
            return 2 * len(self.kv_layers) * self.num_kv_heads
        return sum(self.per_layer[i].k[0] + self.per_layer[i].v[0] for i in self.kv_layers)

    def text(self) -> str:
        """One line: "3 layers x 2 KV heads x head_dim 16", or per layer "4 layers, K/V heads x dim per layer
        0: 2x16/2x16, 1: 1x32/1x32, ..." (the first 8)."""
        if self.per_layer is None:
            return f"{self.num_layers} layers x {self.num_kv_heads} KV heads x head_dim {self.head_dim}"
        shown = ", ".join(f"{i}: {self.of(i).text()}" for i in self.kv_layers[:8])
        return (f"{self.num_layers} layers, K/V heads x dim per layer {shown}"
                + (" ..." if len(self.kv_layers) > 8 else ""))

    def layer_shapes_text(self) -> str | None:
        """The metadata ``kv_shapes``: each cached layer's :meth:`LayerKV.text`, in ``kv_layers`` order, joined by
        ","; None for a uniform shape (whose ``num_kv_heads`` / ``head_dim`` say it all)."""
        return None if self.per_layer is None else ",".join(self.of(i).text() for i in self.kv_layers)

    def to_metadata(self) -> dict[str, str]:
        """What an artifact's metadata records of the shape: ``num_layers``, ``num_kv_heads``, ``head_dim``,
        ``cached_layers`` and, for a shape that is not uniform, ``kv_shapes`` (:meth:`layer_shapes_text`)."""
        meta = {"num_layers": str(self.num_layers), "num_kv_heads": str(self.num_kv_heads),
                "head_dim": str(self.head_dim), "cached_layers": layers_text(self.kv_layers)}
        shapes = self.layer_shapes_text()
        if shapes is not None:
            meta["kv_shapes"] = shapes
        return meta

    def without_layers(self, layers: Iterable[int]) -> KVShape:
        """The same shape with ``layers`` no longer counted as cached (e.g. kept unquantized by a plan)."""
        dropped = set(layers)
        return replace(self, cached_layers=tuple(i for i in self.kv_layers if i not in dropped))

    def only_layers(self, layers: Iterable[int]) -> KVShape:
        """The same shape counting only those of ``layers`` that hold a KV cache."""
        kept = set(layers)
        return replace(self, cached_layers=tuple(i for i in self.kv_layers if i in kept))


MAX_SHAPES_TEXT = 48  # characters per layer of a ``kv_shapes`` text: "65536x65536/65536x65536," is 24


def parse_layer_shapes(text: str, layers: tuple[int, ...], max_count: int, where: str) -> dict[int, LayerKV]:
    """The ``kv_shapes`` metadata of :meth:`KVShape.layer_shapes_text` for the cached ``layers``: one
    "KHxKD/VHxVD" per layer, each count in 1..``max_count``; refused (UsageError naming ``where``) otherwise.
    Bounded: a text longer than the layers it can describe is refused before it is split."""
    hint = "pass the artifact written by `kvq calibrate`"
    if len(text) > MAX_SHAPES_TEXT * max(len(layers), 1):
        raise UsageError(f"{where}: kv_shapes is longer than {len(layers)} layer shapes can be", hint=hint)
    parts = text.split(",")
    if len(parts) != len(layers):
        raise UsageError(f"{where}: kv_shapes lists {len(parts)} layer shapes, but {len(layers)} layers hold a KV "
                         "cache", hint=hint)
    out: dict[int, LayerKV] = {}
    for i, part in zip(layers, parts, strict=True):
        match = re.fullmatch(r"([0-9]{1,9})x([0-9]{1,9})/([0-9]{1,9})x([0-9]{1,9})", part.strip())
        counts = [int(x) for x in match.groups()] if match else []
        if not counts or not all(1 <= c <= max_count for c in counts):
            raise UsageError(f"{where}: kv_shapes entry {part[:40]!r} of layer {i} is not K heads x dim / V heads x "
                             f"dim (counts in 1..{max_count})", hint=hint)
        out[i] = LayerKV((counts[0], counts[1]), (counts[2], counts[3]))
    return out


def layers_text(layers: tuple[int, ...]) -> str:
    """The metadata form of a layer list: "3,7,11" (the empty list is "")."""
    return ",".join(map(str, layers))


def parse_layers(text: str, num_layers: int, where: str) -> tuple[int, ...]:
    """The layer list of :func:`layers_text`: indices below ``num_layers``, ascending, no repeats; refused
    (UsageError naming ``where``) otherwise."""
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    layers = tuple(int(part) for part in parts if part.isdigit() and len(part) <= 9)
    if len(layers) != len(parts) or list(layers) != sorted(set(layers)) or any(i >= num_layers for i in layers):
        raise UsageError(f"{where}: cached_layers {text!r} is not an ascending list of layer indices below {num_layers}",
                         hint="pass the artifact written by `kvq calibrate`")
    return layers


@dataclass(frozen=True)
class ModelInfo:
    """What the artifacts record about the model, and what exports check against."""

    model_id: str
    config_hash: str
    shape: KVShape
    model_type: str

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.shape.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

    @property
    def kv_layers(self) -> tuple[int, ...]:
        return self.shape.kv_layers


@dataclass(frozen=True)
class ModelSpec:
    """Which model a run loads and where: the model flags every command that runs the model shares
    (:func:`kvq.model.loading.check_spec` checks them, :func:`kvq.model.loading.load_spec` loads)."""

    model: str | None = None  # a checkpoint folder, .gguf file or hub id (None: the embedded SmolLM2)
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    device_map: str | None = None  # auto / balanced / sequential: spread over devices (accelerate)
    max_memory: str | dict | None = None  # per device, e.g. "0=70GiB,cpu=200GiB" (or parsed, per rank)
    offload_folder: str | None = None  # disk offload for what does not fit


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
