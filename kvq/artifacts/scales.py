"""Scale artifacts: ``scales.safetensors`` + ``scales.json`` (the same numbers, human-readable).

Tensors, for every layer i: ``layers.{i}.k_scale``, ``layers.{i}.v_scale`` (float32) and, for
asymmetric specs, ``layers.{i}.k_zero_point``, ``layers.{i}.v_zero_point`` (int32). Shape ()
per tensor, (num_kv_heads,) per head, (num_kv_heads, head_dim) per channel (each layer's own K or V
(heads, dim) where the layers differ: the metadata's ``kv_shapes``). With a recipe's ``query:``
section, ``layers.{i}.q_scale`` (float32, () or (num_heads,): per attention head). Convention:
``x ~= (q - zero_point) * scale`` (see :mod:`kvq.quant.qparams`).

The safetensors metadata holds ``recipe`` (the resolved recipe as JSON) and the statistics'
metadata; ``scales.json`` holds ``{"kvq_version", "recipe", "metadata", "layers": {"i": {...}}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from kvq import __version__
from kvq.artifacts.files import (
    SCALES_FILE,
    SCALES_JSON,
    StatedShape,
    json_bytes,
    read_layers,
    safetensors_bytes,
    write_artifact,
)
from kvq.errors import UsageError
from kvq.io.parse import parse_json
from kvq.quant.formats import number_format
from kvq.recipe.schema import KVRecipe, QuantSpec

_KEY = re.compile(r"^layers\.(0|[1-9][0-9]{0,8})\.([kv]_(?:scale|zero_point)|q_scale)$")
_HINT = "pass the scales.safetensors (or its folder) from `kvq calibrate` or `kvq solve`"
_RANK = {"tensor": 0, "head": 1, "channel": 2}  # the number of dimensions of a scale per granularity


@dataclass
class LayerScales:
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_zero_point: torch.Tensor | None = None
    v_zero_point: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None  # FP8 attention's query scale: () or (num_heads,), when the recipe has one

    def scale(self, which: str) -> torch.Tensor:
        return self.k_scale if which == "k" else self.v_scale

    def zero_point(self, which: str) -> torch.Tensor | None:
        return self.k_zero_point if which == "k" else self.v_zero_point

    def to(self, device: torch.device | str) -> LayerScales:
        """The same scales (and zero-points) on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LayerScales(move(self.k_scale), move(self.v_scale), move(self.k_zero_point), move(self.v_zero_point),
                           move(self.q_scale))


@dataclass
class KVScales:
    """Scales (and zero-points) of every layer for one recipe, with the calibration metadata."""

    recipe: KVRecipe
    layers: dict[int, LayerScales]
    metadata: dict[str, str] = field(default_factory=dict)
    # observer loss: its choices and cost (kvq.solving.loss.LossSearch), never written (the choices are in metadata)
    loss_search: object | None = field(default=None, compare=False, repr=False)

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
            if layer.q_scale is not None:
                out[f"layers.{i}.q_scale"] = layer.q_scale
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
            if layer.q_scale is not None:
                entry["q_scale"] = layer.q_scale.tolist()
            layers[str(i)] = entry
        return {
            "kvq_version": __version__,
            "recipe": self.recipe.to_json(),
            "metadata": dict(sorted(self.metadata.items())),
            "layers": layers,
        }

    def to_files(self) -> dict[str, bytes]:
        """The contents of scales.safetensors and scales.json, by file name."""
        meta = dict(self.metadata)
        meta["recipe"] = json.dumps(self.recipe.to_json(), sort_keys=True)
        meta["kvq_version"] = __version__
        return {SCALES_FILE: safetensors_bytes(self.tensors(), meta), SCALES_JSON: json_bytes(self.to_json())}

    def save(self, out_dir: str | Path, *, force: bool = False, inputs: Sequence[Path] = ()) -> list[Path]:
        """Write scales.safetensors and scales.json into the artifact folder ``out_dir``; return their paths.

        See :func:`kvq.artifacts.files.write_artifact` for what happens to an existing folder.
        """
        return write_artifact(Path(out_dir), self.to_files(), force=force, inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> KVScales:
        """From scales.safetensors or a folder holding it; refuses a file that is not sound scales."""
        path = scales_path(path)
        parts, meta = read_layers(path, "scales file", _KEY, ("k_scale", "v_scale"), _HINT)
        where = f"scales file {path}"
        if "recipe" not in meta:
            raise UsageError(f"{where} has no recipe in its metadata; was it written by kvq?", hint=_HINT)
        try:
            recipe = KVRecipe.from_json(parse_json(meta.pop("recipe"), "the recipe metadata"))
        except (UsageError, ValidationError, TypeError, RecursionError) as exc:
            raise UsageError(f"{where}: its recipe metadata is not a valid kvq recipe", hint=_HINT) from exc
        meta.pop("kvq_version", None)
        layers = {}
        for i, p in sorted(parts.items()):
            for which in ("k", "v"):
                _check_layer(p, which, recipe.spec(which), f"{where}: layer {i} {which.upper()}")
            if (recipe.query is None) != ("q_scale" not in p):
                raise UsageError(f"{where}: layer {i} " + ("has a q_scale but the recipe has no query: section"
                                 if recipe.query is None else "lacks the q_scale its recipe's query: section needs"),
                                 hint=_HINT)
            if recipe.query is not None:
                _check_layer(p, "q", recipe.query, f"{where}: layer {i} Q")
            layers[i] = LayerScales(
                k_scale=p["k_scale"].to(torch.float32),
                v_scale=p["v_scale"].to(torch.float32),
                k_zero_point=p.get("k_zero_point"),
                v_zero_point=p.get("v_zero_point"),
                q_scale=p["q_scale"].to(torch.float32) if "q_scale" in p else None,
            )
        stated = StatedShape.parse(meta, where)
        if stated.layers is None:  # one shape for all layers: their scales agree on the number of KV heads
            heads = {tuple(t.shape[:1]) for layer in layers.values() for t in (layer.k_scale, layer.v_scale) if t.dim()}
            if len(heads) > 1:
                raise UsageError(f"{where}: the layers' scales disagree on the number of KV heads ({sorted(heads)})",
                                 hint=_HINT)
        for i, layer in sorted(layers.items()):
            for which in ("k", "v"):
                if layer.scale(which).dim():
                    stated.check(i, which, tuple(layer.scale(which).shape), f"layers.{i}.{which}_scale", where)
        return cls(recipe=recipe, layers=layers, metadata=meta)


def scales_path(path: str | Path) -> Path:
    """The scales file ``path`` names: itself, or the scales.safetensors in a folder."""
    path = Path(path)
    return path / SCALES_FILE if path.is_dir() else path


def _check_layer(parts: dict[str, torch.Tensor], which: str, spec: QuantSpec, where: str) -> None:
    """Scale: float, of the spec's granularity, every value a positive finite number; zero point iff asymmetric."""
    scale = parts[f"{which}_scale"]
    if not scale.dtype.is_floating_point or scale.dim() != _RANK[spec.granularity]:
        raise UsageError(f"{where} scale is {str(scale.dtype).removeprefix('torch.')} {tuple(scale.shape)}, but the "
                         f"recipe's per-{spec.granularity} scale is a float tensor of {_RANK[spec.granularity]} "
                         "dimension(s)", hint=_HINT)
    values = scale.to(torch.float32)
    for bad, what in ((torch.isnan(values), "NaN"), (torch.isinf(values), "inf"), (values == 0, "zero"),
                      (values < 0, "negative")):
        if bad.any():
            raise UsageError(f"{where} scale holds {what} values; every scale must be a positive finite number",
                             hint="recompute the scales with `kvq solve` or `kvq calibrate`")
    zp = parts.get(f"{which}_zero_point")
    if spec.symmetric:
        if zp is not None:
            raise UsageError(f"{where} has a zero point, but the recipe's {which.upper()} spec is symmetric", hint=_HINT)
        return
    if zp is None:
        raise UsageError(f"{where} lacks its zero point (the recipe is asymmetric)", hint=_HINT)
    if zp.dtype.is_floating_point or zp.dtype.is_complex or zp.dtype == torch.bool or zp.shape != scale.shape:
        raise UsageError(f"{where} zero point is {str(zp.dtype).removeprefix('torch.')} {tuple(zp.shape)}; it must "
                         f"be an integer tensor of the scale's shape {tuple(scale.shape)}", hint=_HINT)
    fmt = number_format(spec.format)
    qmin, qmax = int(fmt.qmin), int(fmt.qmax)
    if ((zp < qmin) | (zp > qmax)).any():
        raise UsageError(f"{where} zero point holds values outside {spec.format}'s range [{qmin}, {qmax}]", hint=_HINT)
