"""Fixtures of the export tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvq.artifacts.scales import KVScales, LayerScales
from kvq.recipe.schema import KVRecipe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # export_helpers
from export_helpers import filled  # noqa: E402


@pytest.fixture
def make_artifact(tmp_path) -> Callable[..., Path]:
    """Save a KVScales artifact built by hand; returns its folder."""
    counter = [0]

    def make(rec: KVRecipe, metadata: dict[str, str], layers: dict[int, LayerScales] | None = None) -> Path:
        if layers is None:
            n_layers = int(metadata["num_layers"])
            heads, head_dim = int(metadata["num_kv_heads"]), int(metadata["head_dim"])
            layers = {}
            cached = metadata.get("cached_layers")
            for i in range(n_layers) if cached is None else map(int, cached.split(",")):
                k, kz = filled(rec.key, heads, head_dim, i, "k")
                v, vz = filled(rec.value, heads, head_dim, i, "v")
                layers[i] = LayerScales(k, v, kz, vz)
        counter[0] += 1
        folder = tmp_path / f"artifact-{counter[0]}"
        KVScales(recipe=rec, layers=layers, metadata=dict(metadata)).save(folder)
        return folder

    return make
