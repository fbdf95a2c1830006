"""What a run says about its model: which model and where (:class:`ModelSpec`), what kvq records about it
(:class:`ModelInfo`), and the one shape of its KV cache (:class:`KVShape`). Plain data: loading is
:mod:`kvq.model.loading`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    """What the KV cache holds per token: layers x KV heads x head_dim, for K and for V each. The one
    description of the cache's shape: the model's (:class:`ModelInfo`), an export's and an evaluation's."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def elements_per_token(self) -> int:
        """K and V elements one token adds to the cache."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


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
