"""What `kvq inspect` found in a path: the declared KV-cache scheme, the scale tensors, the model's shape.

Every reader (:mod:`kvq.inspection.hf_checkpoint`, :mod:`kvq.inspection.engine_files`,
:mod:`kvq.inspection.kvq_artifact`) turns its input into one :class:`Found`; the checks
(:mod:`kvq.inspection.defects`), the clipping figures (:mod:`kvq.inspection.clipping`) and the report
read only that. No model weights are read: configs, and the scale tensors alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from kvq.errors import UsageError
from kvq.model.model_spec import LayerKV

# Kinds of input, also the "checkpoint kind" of kvq.engines.matrix' rows.
KVQ_ARTIFACT = "kvq-artifact"
COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
HF_CHECKPOINT = "hf-checkpoint"  # a Hugging Face checkpoint declaring no KV scheme kvq can read
TRTLLM = "trtllm"
SGLANG_JSON = "sglang-json"
LMDEPLOY = "lmdeploy"

# Roles of a scale tensor: keys, values, queries, or one factor K and V share.
ROLE_NAME = {"k": "K", "v": "V", "q": "Q", "kv": "KV"}


@dataclass(frozen=True)
class Scheme:
    """The KV-cache quantization a config declares (None where it does not say)."""

    declared_in: str  # the file and key, e.g. "config.json quantization_config.kv_cache_scheme"
    text: str  # as declared, for the report
    number: str | None  # kvq's name of the number format: fp8_e4m3, fp8_e5m2, int8, int4; None if unknown
    granularity: str | None  # tensor, head, channel, rank (one value per TP rank); None if unknown
    symmetric: bool | None = None
    dynamic: bool = False  # scales computed at run time: a checkpoint needs none


@dataclass(frozen=True)
class ScaleEntry:
    """One scale tensor (or JSON value, or part of a parameter file) of one layer.

    ``values`` is float32 in the stored shape; ``offset`` (same shape, or None) is the value a zero
    code stands for: ``x_hat = q * scale + offset`` (kvq's integer zero point z gives ``-z * scale``).
    """

    layer: int
    role: str  # k, v, q, kv
    name: str  # tensor name, JSON path or file name
    file: str  # the file holding it, relative to the inspected path
    values: torch.Tensor
    rank: int | None = None  # tensor-parallel rank, for formats with one file or entry per rank
    offset: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


@dataclass(frozen=True)
class DeclaredShape:
    """The KV-cache shape a checkpoint or artifact declares, and where it was read (any field None where unknown;
    the model's own shape is :class:`kvq.model.model_spec.KVShape`)."""

    num_layers: int | None
    num_kv_heads: int | None
    head_dim: int | None
    num_heads: int | None
    model_type: str | None
    source: str
    layers_key: str = ""  # the key of ``source`` stating num_layers (named when a count is wrong)
    cached_layers: tuple[int, ...] | None = None  # the layers with a KV cache (None: all, or not known)
    layers: dict[int, LayerKV] | None = None  # each cached layer's K / V (heads, dim) where the layers differ
    kv_sharing: dict[int, int] | None = None  # KV-sharing layer -> the layer whose cache it reads (Gemma 4)

    def kv_of(self, layer: int, role: str) -> tuple[int | None, int | None]:
        """(KV heads, head_dim) of layer ``layer``'s ``role`` ("k", "v", or "kv": one scale for both, K's shape):
        its own where the layers differ, else num_kv_heads x head_dim (None where unknown)."""
        if self.layers is not None and layer in self.layers:
            return self.layers[layer].of("v" if role == "v" else "k")
        return self.num_kv_heads, self.head_dim


@dataclass
class Found:
    """Everything read from one inspected path."""

    path: Path
    kind: str
    scheme: Scheme | None
    entries: list[ScaleEntry]
    shape: DeclaredShape
    ranks: int | None = None  # tensor-parallel ranks the files are written for (per-rank formats)
    config_hash: str | None = None  # recorded at calibration (kvq artifacts)
    notes: list[str] = field(default_factory=list)
    unread_method: str | None = None  # a quant_method kvq does not read (its KV scheme is unknown, not absent)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (tensor or file, what disagrees)
    specs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # role -> (number, granularity)
    weights: str | None = None  # ModelOpt: kvq.engines.matrix.UNQUANTIZED or FP8_WEIGHTS (hf_quant_config quant_algo)

    def spec(self, role: str) -> tuple[str | None, str | None]:
        """(number format, granularity) declared for ``role``: its own (kvq recipes), else the scheme's."""
        if role in self.specs:
            return self.specs[role]
        return (self.scheme.number, self.scheme.granularity) if self.scheme is not None else (None, None)


UNKNOWN_SHAPE = DeclaredShape(None, None, None, None, None, "not recorded: pass --model")


def text_config(config: dict) -> dict:
    """The decoder's part of a config.json (nested ``text_config`` / ``llm_config`` of multimodal models)."""
    for key in ("text_config", "llm_config", "language_config"):
        nested = config.get(key)
        if isinstance(nested, dict) and "num_hidden_layers" in nested:
            return nested
    return config


def shape_from_config(config: dict, source: str) -> DeclaredShape:
    """The KV-cache shape a config.json states (transformers or TensorRT-LLM keys); UNKNOWN fields as None."""
    from kvq.model.kv_config import check_config_counts, kv_shape, kv_sharing_targets

    text = dict(text_config(config))
    if "head_dim" not in text and "head_size" in text:  # TensorRT-LLM's name
        text["head_dim"] = text["head_size"]
    check_config_counts(text, source)  # num_hidden_layers -5, num_key_value_heads 0: a config error, exit 2
    heads = text.get("num_attention_heads")
    try:
        decoder = kv_shape(SimpleNamespace(**{k: text.get(k) for k in (
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
            "layer_types", "kv_sharing_modes", "num_kv_shared_layers",
            "per_layer_config")}))
        layers, kv_heads, head_dim = decoder.num_layers, decoder.num_kv_heads, decoder.head_dim
        cached = decoder.cached_layers
        per_layer = None if decoder.uniform else {i: decoder.of(i) for i in decoder.kv_layers}
    except (UsageError, TypeError, ValueError, ZeroDivisionError):
        # no layers / heads, or no head_dim and no hidden_size: keep what the config does state
        layers, kv_heads, head_dim = text.get("num_hidden_layers"), text.get("num_key_value_heads") or heads, None
        cached, per_layer = None, None
    model_type = text.get("model_type") or config.get("model_type")
    return DeclaredShape(_int(layers), _int(kv_heads), _int(head_dim), _int(heads), model_type and str(model_type), source,
                   "num_hidden_layers", cached, per_layer, kv_sharing_targets(config) or None)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
