"""Statistics, validation and eval reports built by hand for the report tests (no model run).

Every value is chosen so that what the checks must find is known by construction: a typical channel
has absmax 1.0 (min -1, max 1), and a test plants one deviation with a hand-picked size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from kvq.artifacts.stats import KVStats

LAYERS, HEADS, DIM = 5, 4, 8


def even_absmax(layers: int = LAYERS, heads: int = HEADS, dim: int = DIM) -> dict[str, torch.Tensor]:
    """absmax of K and V, (layers, heads, dim): every channel 1.0 except a gentle, even ripple (0.9 .. 1.2)."""
    ripple = torch.tensor([0.9, 1.0, 1.1, 1.2] * dim)[:dim]  # (dim,)
    return {w: ripple.expand(layers, heads, dim).clone() for w in ("k", "v")}


def stats_from(absmax: dict[str, torch.Tensor], tokens: int = 100, hists: dict | None = None) -> KVStats:
    """Symmetric statistics (min = -absmax, max = absmax) of those absmax grids."""
    stats = KVStats(metadata={"model": "hand-built", "dataset": "none", "samples": "1", "seqlen": "100",
                              "tokens": str(tokens), "dtype": "float32", "kvq_version": "test"})
    for i in range(absmax["k"].shape[0]):
        k, v = absmax["k"][i], absmax["v"][i]
        stats.observe(i, -k, k, -v, v, tokens, *(hists[i] if hists else (None, None)))
    return stats


def save(stats: KVStats, folder: Path) -> Path:
    stats.save(folder)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (PNG spec: 8-byte signature, length, b'IHDR', width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def validation_json(sqnr: dict[tuple[int, int, str], float], layers: int = LAYERS, heads: int = HEADS,
                    dim: int = DIM, layer_sqnr: dict[tuple[int, str], float] | None = None) -> dict:
    """A validate.json with the keys `kvq validate` writes (docs/evaluate.md); SQNR 40 dB unless given."""
    rows = [{"layer": i, "kv_head": h, "tensor": w, "sqnr_db": sqnr.get((i, h, w), 40.0), "mse": 0.0, "rmse": 0.0,
             "max_abs_err": 0.0, "clip_rate": 0.0, "clipped": 0, "count": 1}
            for i in range(layers) for h in range(heads) for w in ("k", "v")]
    per_layer = layer_sqnr or {}
    return {"kvq_version": "test", "report": "validate", "recipe": {"name": "int8-asym-per-head"},
            "model": {"id": "hand-built", "config_hash": None, "num_layers": layers, "num_kv_heads": heads,
                      "head_dim": dim},
            "data": {"dataset": "none", "samples": 1, "tokens": 100}, "warnings": [],
            "layers": [{"layer": i, "k": {"sqnr_db": per_layer.get((i, "k"), 40.0)},
                        "v": {"sqnr_db": per_layer.get((i, "v"), 40.0)}} for i in range(layers)],
            "heads": rows}


def eval_json(rows: list[dict], layers: int = LAYERS, heads: int = HEADS, dim: int = DIM) -> dict:
    """An eval.json with the keys `kvq eval --json` writes (docs/evaluate.md), a baseline row first."""
    base = {"name": "baseline (float32)", "kind": "baseline", "delta_pct": 0.0, "delta_pct_stderr": None,
            "memory_saved": 0.0, "attention_error": None}
    full = [base] + [{"kind": "static", "memory_saved": 0.75, **r} for r in rows]
    return {"kvq_version": "test", "report": "eval",
            "model": {"id": "hand-built", "num_layers": layers, "num_kv_heads": heads, "head_dim": dim},
            "data": {"dataset": "none", "windows": 4, "seqlen": 64}, "warnings": [], "rows": full}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
