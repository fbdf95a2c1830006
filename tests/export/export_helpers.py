"""Helpers for the export tests: hand-built recipes and scales, model metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from kvq.recipe.schema import KVRecipe, QuantSpec


def recipe(fmt: str, symmetric: bool, granularity: str, v_fmt: str | None = None) -> KVRecipe:
    key = QuantSpec(format=fmt, symmetric=symmetric, granularity=granularity)
    value = QuantSpec(format=v_fmt or fmt, symmetric=symmetric, granularity=granularity)
    return KVRecipe(name=f"test-{fmt}-{granularity}", key=key, value=value)


def model_metadata(folder: Path) -> dict[str, str]:
    """The metadata `kvq calibrate` records for the model in ``folder``."""
    from transformers import AutoConfig

    from kvq.model.loading import config_hash, kv_shape

    config = AutoConfig.from_pretrained(folder)
    shape = kv_shape(config)
    return {
        "model": str(folder),
        "num_layers": str(shape.num_layers),
        "num_kv_heads": str(shape.num_kv_heads),
        "head_dim": str(shape.head_dim),
        "cached_layers": ",".join(map(str, shape.kv_layers)),
        "model_type": str(config.model_type),
        "config_hash": config_hash(config),
    }


def synthetic_metadata(layers: int = 2, heads: int = 4, head_dim: int = 2, model_type: str = "llama") -> dict[str, str]:
    return {"num_layers": str(layers), "num_kv_heads": str(heads), "head_dim": str(head_dim),
            "model_type": model_type, "config_hash": "0123456789abcdef"}


def filled(spec: QuantSpec, heads: int, head_dim: int, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Distinct positive dyadic scales (exact in float32) and in-range zero points for one tensor."""
    base = 0.0625 if which == "k" else 0.03125
    shape = {"tensor": (), "head": (heads,), "channel": (heads, head_dim)}[spec.granularity]
    n = 1
    for s in shape:
        n *= s
    steps = torch.arange(1, n + 1, dtype=torch.float32).reshape(shape)  # 1..n in the scale's shape
    scale = base * (layer + 1) * steps
    zp = None
    if not spec.symmetric:
        lo, hi = (-128, 127) if spec.format == "int8" else (-8, 7)
        zp = (torch.arange(n, dtype=torch.int32).reshape(shape) * 3 + layer - 2).clamp(lo, hi)  # in the scale's shape
    return scale, zp
