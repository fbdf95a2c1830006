"""What a run says about its model: which model and where (:class:`ModelSpec`), what kvq records about it
(:class:`ModelInfo`), and the one shape of its KV cache (:class:`KVShape`). Plain data: loading is
:mod:`kvq.model.loading`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from kvq.errors import UsageError


@dataclass(frozen=True)
class KVShape:
    """What the KV cache holds per token: KV heads x head_dim, for K and for V each, in every layer that has a
    KV cache. The one description of the cache's shape: the model's (:class:`ModelInfo`), an export's and an
    evaluation's.

    ``cached_layers`` names the layers that hold a KV cache (None: all ``num_layers``). Hybrid models leave
    the others out: linear-attention / Mamba / convolution layers keep a recurrent state, not one K/V row per
    token, so they are never calibrated, exported or counted in the cache's memory.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    cached_layers: tuple[int, ...] | None = None

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers that hold a KV cache, ascending."""
        return tuple(range(self.num_layers)) if self.cached_layers is None else self.cached_layers

    @property
    def all_layers_cached(self) -> bool:
        return self.kv_layers == tuple(range(self.num_layers))

    @property
    def elements_per_token(self) -> int:
        """K and V elements one token adds to the cache (cached layers only)."""
        return 2 * len(self.kv_layers) * self.num_kv_heads * self.head_dim

    def without_layers(self, layers: Iterable[int]) -> KVShape:
        """The same shape with ``layers`` no longer counted as cached (e.g. kept unquantized by a plan)."""
        dropped = set(layers)
        return replace(self, cached_layers=tuple(i for i in self.kv_layers if i not in dropped))

    def only_layers(self, layers: Iterable[int]) -> KVShape:
        """The same shape counting only those of ``layers`` that hold a KV cache."""
        kept = set(layers)
        return replace(self, cached_layers=tuple(i for i in self.kv_layers if i in kept))


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
