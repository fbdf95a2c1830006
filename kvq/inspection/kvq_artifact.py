"""kvq's own scale artifacts (``scales.safetensors``), read tolerantly.

:meth:`kvq.artifacts.scales.KVScales.load` refuses a file holding a zero, NaN or negative scale (exit 2); here
such a file is read as it is so that each defect is reported with its layer and tensor. The recipe
in the metadata declares the scheme; ``num_layers`` / ``num_kv_heads`` / ``head_dim`` / ``model_type``
/ ``config_hash`` record the model it was calibrated on.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from pydantic import ValidationError

from kvq.artifacts.files import StatedShape, metadata_int, read_safetensors
from kvq.errors import UsageError
from kvq.export.lmdeploy import lmdeploy_zero_point
from kvq.inspection.found import KVQ_ARTIFACT, DeclaredShape, Found, ScaleEntry, Scheme
from kvq.model.mla import is_mla
from kvq.model.model_spec import parse_layers
from kvq.recipe.schema import KVRecipe

_KEY = re.compile(r"^layers\.([0-9]{1,18})\.([kv])_(scale|zero_point)$")
_HINT = "pass the scales.safetensors (or its folder) from `kvq calibrate` or `kvq solve`"


def is_kvq_scales(path: Path) -> bool:
    """Whether a safetensors file carries kvq's recipe metadata (header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return "recipe" in (fh.metadata() or {})
    except (SafetensorError, OSError, RuntimeError):
        return False


def read_kvq_scales(path: Path) -> Found:
    tensors, meta = read_safetensors(path, "scales file", _HINT)
    try:
        recipe = KVRecipe.from_json(json.loads(meta["recipe"]))
    except RecursionError as exc:
        raise UsageError(f"scales file {path}: its recipe metadata does not parse: nested too deeply",
                         hint=_HINT) from exc
    except (KeyError, ValueError, ValidationError, TypeError) as exc:
        raise UsageError(f"scales file {path}: its recipe metadata is not a valid kvq recipe", hint=_HINT) from exc
    where = f"scales file {path}"
    shape = DeclaredShape(metadata_int(meta, "num_layers", where), metadata_int(meta, "num_kv_heads", where),
                    metadata_int(meta, "head_dim", where), None, meta.get("model_type") or None,
                    f"{path.name} metadata", "num_layers")
    for key, value in (("num_layers", shape.num_layers), ("num_kv_heads", shape.num_kv_heads),
                       ("head_dim", shape.head_dim)):
        if value is not None and value < 1:
            raise UsageError(f"{where}: metadata {key}={value} is not a count of at least 1", hint=_HINT)
    if shape.num_layers is not None and meta.get("cached_layers") is not None:  # a hybrid model's KV-cache layers
        shape = replace(shape, cached_layers=parse_layers(meta["cached_layers"], shape.num_layers, where))
    if shape.num_layers is not None and meta.get("kv_shapes") is not None:  # layers of different K/V shapes
        stated = StatedShape.parse(meta, where)
        shape = replace(shape, layers=stated.layers)
    k, v = recipe.key, recipe.value
    text = f"kvq recipe {recipe.name}: K {k.format} per {k.granularity}, V {v.format} per {v.granularity}"
    scheme = Scheme(f"{path.name} metadata recipe", text, k.format if k.format == v.format else None,
                    k.granularity if k.granularity == v.granularity else None, k.symmetric and v.symmetric)
    found = Found(path=path, kind=KVQ_ARTIFACT, scheme=scheme, entries=[], shape=shape,
                  config_hash=meta.get("config_hash") or None,
                  specs={"k": (k.format, k.granularity), "v": (v.format, v.granularity)})
    zero_points = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None:
            found.conflicts.append((name, "is not a kvq scale or zero point"))
        elif match.group(3) == "zero_point":
            zero_points[(int(match.group(1)), match.group(2))] = tensor
    for name, tensor in sorted(tensors.items()):
        match = _KEY.match(name)
        if match is None or match.group(3) != "scale":
            continue
        layer, role = int(match.group(1)), match.group(2)
        values = tensor.to(torch.float32)
        zp = zero_points.get((layer, role))
        offset = None
        if zp is not None and zp.shape == values.shape:
            offset = lmdeploy_zero_point(values, zp)  # -z * scale: the value of code 0
        elif zp is not None:
            found.conflicts.append((f"layers.{layer}.{role}_zero_point", f"has shape {tuple(zp.shape)}, the scale "
                                    f"{tuple(values.shape)}"))
        found.entries.append(ScaleEntry(layer=layer, role=role, name=name, file=path.name, values=values,
                                        offset=offset))
    found.notes.append("a kvq artifact is read by no engine directly: `kvq export-scales` writes what each loads")
    if is_mla(meta):
        found.notes.append("an MLA latent cache (kv_layout mla): K is the compressed latent, V the rotary key part; "
                           "vLLM writes the row with one scale per layer (docs/engines.md, MLA)")
    return found
