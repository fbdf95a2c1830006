"""The KV-cache shape a model config states: which layers hold a KV cache, each one's K/V heads and head_dim
(read per layer where the config holds them per layer), and the bounds on the config's counts."""

from __future__ import annotations

from types import SimpleNamespace

from kvq.errors import UsageError
from kvq.model.mla import latent_dims
from kvq.model.model_spec import KVShape, LayerKV

# Layer types (config ``layer_types``) whose layers hold no per-token K/V: transformers caches them as
# LinearAttentionLayer (a recurrent / convolution state) or DummyLayer (MoE / MLP-only), never through
# Cache.update (transformers/cache_utils.py DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs @5.23).
# Hybrid layers ("hybrid", "hybrid_sliding") hold both and are cached.
NO_KV_LAYER_TYPES = frozenset({"linear_attention", "conv", "moe", "mlp", "mamba", "mamba2", "recurrent", "dummy"})


def cached_layers(text) -> tuple[int, ...] | None:
    """The layers of decoder config ``text`` that hold a KV cache, or None when all do.

    Read from ``layer_types`` (granitemoehybrid's ``layers_block_type`` is the same field); layers
    that reuse another layer's cache (``kv_sharing_modes`` "reuse"; in a config.json the last
    ``num_kv_shared_layers``) write none of their own.
    """
    layers = int(text.num_hidden_layers)
    types = getattr(text, "layer_types", None)
    kinds = list(types) if isinstance(types, (list, tuple)) and len(types) == layers else ["attention"] * layers
    sharing = _attr(text, "kv_sharing_modes")
    shared = _attr(text, "num_kv_shared_layers")
    if sharing is None and isinstance(shared, int) and 0 < shared < layers:  # config.json: the count only
        sharing = [None] * (layers - shared) + ["reuse"] * shared  # the last ones reuse (Gemma4TextConfig @5.23)
    if isinstance(sharing, (list, tuple)) and len(sharing) == layers:
        kinds = ["dummy" if mode == "reuse" else kind for kind, mode in zip(kinds, sharing, strict=True)]
    cached = tuple(i for i, kind in enumerate(kinds) if kind not in NO_KV_LAYER_TYPES)
    return None if len(cached) == layers else cached


CONFIG_COUNTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
# no model comes near these; a config stating more would size kvq's work by a number, not by the model
CONFIG_COUNT_MAX = {"hidden_size": 1 << 20}
COUNT_MAX = 1 << 16


def check_config_counts(values: dict, source: str) -> None:
    """Refuse a config whose layer / head / size counts are not whole numbers in 1..their bound (absent or null
    is fine).

    ``num_hidden_layers: -5`` or ``num_key_value_heads: 0`` describe no model: a UsageError naming the key.
    """
    for key in CONFIG_COUNTS:
        value = values.get(key)
        if value is None:
            continue
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        top = CONFIG_COUNT_MAX.get(key, COUNT_MAX)
        if isinstance(value, bool) or not whole or not 1 <= value <= top:
            raise UsageError(f"{source}: {key} is {str(value)[:40]}, but a model's {key} is a whole number from "
                             f"1 to {top}", hint="the config is damaged or not a transformer's: fix the key or pass "
                             "another checkpoint")


def _attr(obj, key: str):
    """``obj.key`` (None when absent); None too when the config holds it per layer (transformers 5.23 raises
    AmbiguousGlobalPerLayerAttributeError, a RuntimeError, for a per-layer attribute read globally)."""
    try:
        return getattr(obj, key, None)
    except RuntimeError:
        return None


_PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")


def _layer_configs(text, layers: int, source: str) -> list | None:
    """Per layer, what its own config says (an object with the keys of ``_PER_LAYER_KEYS``), for a heterogeneous
    config (transformers' ``per_layer_config``: Gemma 4's wider full-attention layers); None for the others.

    Two forms: the loaded config's view (``config.per_layer_config[i]``,
    transformers/integrations/heterogeneity/configuration_utils.py @5.23), and config.json's overrides
    (``{"1": {"head_dim": 512}, ...}``, read by kvq inspect)."""
    raw = _attr(text, "per_layer_config")
    if isinstance(raw, dict):
        base = {key: _attr(text, key) for key in _PER_LAYER_KEYS}
        bad = [key for key in raw if not (isinstance(key, str) and key.isdigit() and len(key) <= 9
                                          and int(key) < layers and isinstance(raw[key], dict))]
        if bad:
            raise UsageError(f"{source}: per_layer_config key {str(bad[0])[:40]!r} is not a layer index below "
                             f"{layers} holding that layer's settings", hint="fix the config or pass another checkpoint")
        return [SimpleNamespace(**{**base, **{k: v for k, v in raw.get(str(i), {}).items() if k in base}})
                for i in range(layers)]
    if raw is not None and _attr(text, "is_heterogeneous"):
        return [raw[i] for i in range(layers)]
    return None


def kv_shape(config, source: str = "the model's config") -> KVShape:
    """The KV cache of a decoder config: layers, each cached layer's KV heads and head_dim (read per layer where
    the config holds them per layer), and which layers hold one."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    check_config_counts({key: _attr(text, key) for key in CONFIG_COUNTS}, source)
    layers = _attr(text, "num_hidden_layers")
    heads = _attr(text, "num_attention_heads")
    if layers is None or heads is None:
        raise UsageError(
            f"model type {getattr(text, 'model_type', '?')!r} has no attention layers "
            "(its config names no num_hidden_layers / num_attention_heads), so it has no KV cache to calibrate",
            hint="kvq calibrates decoder-only transformer language models with an attention KV cache",
        )
    cached = cached_layers(text)
    if cached == ():
        raise UsageError(
            f"model type {getattr(text, 'model_type', '?')!r} has no layer with a KV cache (layer_types "
            f"{sorted(set(text.layer_types))}), so it has nothing to calibrate",
            hint="kvq calibrates models whose attention layers keep a KV cache",
        )
    dims = latent_dims(text, source)
    if dims is not None:  # MLA: every cached layer holds its latent row, the latent (K) and the rotary key part (V)
        row = LayerKV(dims.k, dims.v)
        return KVShape.from_layers(int(layers), dict.fromkeys(range(int(layers)) if cached is None else cached, row),
                                   cached)
    per_layer = _layer_configs(text, int(layers), source)
    if per_layer is None:
        kv_heads = _attr(text, "num_key_value_heads") or heads
        head_dim = _attr(text, "head_dim") or text.hidden_size // heads
        return KVShape(int(layers), int(kv_heads), int(head_dim), cached)
    shapes: dict[int, LayerKV] = {}
    for i in range(int(layers)) if cached is None else cached:
        layer = per_layer[i]
        values = {key: _attr(layer, key) for key in _PER_LAYER_KEYS}
        check_config_counts(values, f"{source} (layer {i})")
        layer_heads = values["num_attention_heads"] or heads
        kv_heads = values["num_key_value_heads"] or layer_heads
        head_dim = values["head_dim"] or (values["hidden_size"] or text.hidden_size) // layer_heads
        shapes[i] = LayerKV((int(kv_heads), int(head_dim)), (int(kv_heads), int(head_dim)))
    return KVShape.from_layers(int(layers), shapes, cached)


def kv_sharing_targets(config: dict) -> dict[int, int]:
    """Layer -> the earlier layer whose KV cache it reads, for a config.json ``config`` (its decoder part: Gemma 4:
    the last ``num_kv_shared_layers`` layers each read the last earlier layer of their own ``layer_types``
    entry; transformers 5.23 Gemma4TextConfig.kv_sharing_modes, vLLM 0.34.0 gemma4.py:495-515). {} when none
    (or the config does not say which layer a shared one reads)."""
    nested = config.get("text_config")
    text = nested if isinstance(nested, dict) and "num_hidden_layers" in nested else config
    layers, shared, types = text.get("num_hidden_layers"), text.get("num_kv_shared_layers"), text.get("layer_types")
    if not (isinstance(layers, int) and isinstance(shared, int) and 0 < shared < layers <= COUNT_MAX
            and isinstance(types, list) and len(types) == layers):
        return {}
    first = layers - shared
    last = {str(kind): j for j, kind in enumerate(types[:first])}  # each type's last earlier layer (one pass)
    return {i: last[str(types[i])] for i in range(first, layers) if str(types[i]) in last}
