"""Scale artifacts: ``scales.safetensors`` + ``scales.json`` (the same numbers, human-readable).

Tensors, for every layer i: ``layers.{i}.k_scale``, ``layers.{i}.v_scale`` (float32) and, for
asymmetric specs, ``layers.{i}.k_zero_point``, ``layers.{i}.v_zero_point`` (int32). Shape ()
per tensor, (num_kv_heads,) per head, (num_kv_heads, head_dim) per channel. Convention:
``x ~= (q - zero_point) * scale`` (see :mod:`kvq.qparams`).

The safetensors metadata holds ``recipe`` (the resolved recipe as JSON) and the statistics'
metadata; ``scales.json`` holds ``{"kvq_version", "recipe", "metadata", "layers": {"i": {...}}}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from kvq import __version__
from kvq.artifact import json_bytes, read_safetensors, require_file, safetensors_bytes, write_files_atomically
from kvq.errors import UsageError
from kvq.recipe import KVRecipe

SCALES_FILE = "scales.safetensors"
SCALES_JSON = "scales.json"
_KEY = re.compile(r"^layers\.(\d+)\.([kv])_(scale|zero_point)$")


@dataclass
class LayerScales:
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_zero_point: torch.Tensor | None = None
    v_zero_point: torch.Tensor | None = None

    def scale(self, which: str) -> torch.Tensor:
        return self.k_scale if which == "k" else self.v_scale

    def zero_point(self, which: str) -> torch.Tensor | None:
        return self.k_zero_point if which == "k" else self.v_zero_point

    def to(self, device: torch.device | str) -> LayerScales:
        """The same scales (and zero-points) on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LayerScales(move(self.k_scale), move(self.v_scale), move(self.k_zero_point), move(self.v_zero_point))


@dataclass
class KVScales:
    """Scales (and zero-points) of every layer for one recipe, with the calibration metadata."""

    recipe: KVRecipe
    layers: dict[int, LayerScales]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in sorted(self.layers):
            layer = self.layers[i]
            for which in ("k", "v"):
                out[f"layers.{i}.{which}_scale"] = layer.scale(which)
                zp = layer.zero_point(which)
                if zp is not None:
                    out[f"layers.{i}.{which}_zero_point"] = zp
        return out

    def to_json(self) -> dict:
        layers = {}
        for i in sorted(self.layers):
            layer = self.layers[i]
            entry: dict[str, object] = {}
            for which in ("k", "v"):
                entry[f"{which}_scale"] = layer.scale(which).tolist()
                zp = layer.zero_point(which)
                if zp is not None:
                    entry[f"{which}_zero_point"] = zp.tolist()
            layers[str(i)] = entry
        return {
            "kvq_version": __version__,
            "recipe": self.recipe.to_json(),
            "metadata": dict(sorted(self.metadata.items())),
            "layers": layers,
        }

    def files(self, out_dir: str | Path) -> dict[Path, bytes]:
        """The contents of scales.safetensors and scales.json in ``out_dir``."""
        out_dir = Path(out_dir)
        meta = dict(self.metadata)
        meta["recipe"] = json.dumps(self.recipe.to_json(), sort_keys=True)
        meta["kvq_version"] = __version__
        return {
            out_dir / SCALES_FILE: safetensors_bytes(self.tensors(), meta),
            out_dir / SCALES_JSON: json_bytes(self.to_json()),
        }

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write scales.safetensors and scales.json into ``out_dir`` atomically; return their paths."""
        files = self.files(out_dir)
        write_files_atomically(files)
        return list(files)

    @classmethod
    def load(cls, path: str | Path) -> KVScales:
        """From ``scales.safetensors`` or a folder holding it (a calibration output folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / SCALES_FILE
        require_file(path, "scales file", hint="pass the scales.safetensors (or its folder) from `kvq calibrate`")
        raw, meta = read_safetensors(path, "scales file")
        if "recipe" not in meta:
            raise UsageError(f"scales file {path} has no recipe in its metadata; was it written by kvq?")
        try:
            recipe = KVRecipe.from_json(json.loads(meta.pop("recipe")))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise UsageError(f"scales file {path}: its recipe metadata is not a valid kvq recipe ({exc})") from None
        meta.pop("kvq_version", None)
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in raw.items():
            m = _KEY.match(key)
            if m is None:
                raise UsageError(f"scales file {path}: unexpected tensor {key!r}")
            parts.setdefault(int(m.group(1)), {})[f"{m.group(2)}_{m.group(3)}"] = tensor
        layers = {}
        for i, p in sorted(parts.items()):
            for which in ("k", "v"):
                if f"{which}_scale" not in p:
                    raise UsageError(f"scales file {path}: layer {i} lacks {which}_scale")
                if not recipe.spec(which).symmetric and f"{which}_zero_point" not in p:
                    raise UsageError(f"scales file {path}: layer {i} lacks {which}_zero_point (asymmetric recipe)")
            layers[i] = LayerScales(
                k_scale=p["k_scale"].to(torch.float32),
                v_scale=p["v_scale"].to(torch.float32),
                k_zero_point=p.get("k_zero_point"),
                v_zero_point=p.get("v_zero_point"),
            )
        return cls(recipe=recipe, layers=layers, metadata=meta)
