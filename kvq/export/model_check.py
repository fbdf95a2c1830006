"""The model an export is written for: its KV-cache shape, its files, and the checks against the artifact.

Every export checks the artifact against the model (layers, KV heads, head_dim, model_type and the
config hash recorded at calibration) and refuses what the format cannot express.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvq.artifacts.files import StatedShape, first_missing, listed
from kvq.artifacts.scales import KVScales
from kvq.errors import UsageError
from kvq.io.parse import parse_json
from kvq.model.model_spec import KVShape, parse_layers
from kvq.recipe.schema import QuantSpec

Which = Literal["k", "v"]
WHICH: tuple[Which, Which] = ("k", "v")
KV_NAME: dict[Which, str] = {"k": "K", "v": "V"}


@dataclass(frozen=True)
class ModelShape:
    """The model an export is written for: its KV-cache shape (the one :class:`KVShape`), its type and config
    hash, and where they came from."""

    kv: KVShape
    model_type: str | None
    config_hash: str | None
    source: str  # "model <id>" or "the artifact's metadata"

    @property
    def num_layers(self) -> int:
        return self.kv.num_layers

    @property
    def num_kv_heads(self) -> int:
        """The one KV heads count of a uniform shape (per layer: ``kv.of(i)``)."""
        return self.kv.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.kv.head_dim

    @property
    def kv_layers(self) -> tuple[int, ...]:
        return self.kv.kv_layers


@dataclass(frozen=True)
class ModelFiles:
    """A local Hugging Face checkpoint folder and its parsed config.json."""

    folder: Path
    config: dict


def shape_from_metadata(scales: KVScales) -> ModelShape:
    """The shape the artifact records (what `kvq calibrate` measured)."""
    stated = StatedShape.parse(scales.metadata, "the artifact")
    values = {"num_layers": stated.num_layers, "num_kv_heads": stated.num_kv_heads, "head_dim": stated.head_dim}
    missing = [key for key, value in values.items() if value is None]
    kv = stated.kv_shape()
    if missing or kv is None:
        raise UsageError(
            f"the artifact records no {', '.join(missing)} in its metadata, so its KV-cache shape is unknown",
            hint="pass --model with the model the scales were calibrated on",
        )
    return ModelShape(
        kv=kv,
        model_type=scales.metadata.get("model_type") or None,
        config_hash=scales.metadata.get("config_hash") or None,
        source="the artifact's metadata",
    )


def model_shape_and_files(name: str | None, need_files: bool, export_format: str) -> tuple[ModelShape, ModelFiles | None]:
    """Shape (and files) of ``--model``: reads the config only, never the weights."""
    from transformers import AutoConfig

    from kvq.model.loading import config_hash, kv_shape, resolve_model

    model_id, source, folder = resolve_model(name)
    if need_files and folder is None:
        raise UsageError(
            f"--format {export_format} writes a complete checkpoint around the model's files, and {model_id!r} "
            "is a hub id, not a local folder",
            hint="download the checkpoint (e.g. `huggingface-cli download`) and pass its folder with --model",
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except RecursionError as exc:  # a config.json nested deeper than the JSON parser's limit
        raise UsageError(f"model {model_id}: its config does not parse: its JSON is nested too deeply") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"model {model_id}: cannot read its config: {str(exc).splitlines()[0]}") from exc
    shape = ModelShape(
        kv=kv_shape(config),
        model_type=str(config.model_type),
        config_hash=config_hash(config),
        source=f"model {model_id}",
    )
    files = None
    if folder is not None and need_files:
        config_path = folder / "config.json"
        try:
            text = config_path.read_bytes()
        except OSError as exc:
            raise UsageError(f"model {model_id}: cannot read {config_path}: {exc}") from exc
        config_json = parse_json(text, f"model {model_id}: {config_path}")
        if not isinstance(config_json, dict):
            raise UsageError(f"model {model_id}: {config_path} is not a JSON object")
        files = ModelFiles(folder=folder, config=config_json)
    return shape, files


def recorded_cached_layers(scales: KVScales) -> tuple[int, ...] | None:
    """The layers the artifact records as holding a KV cache (None: not recorded, so every layer)."""
    text = scales.metadata.get("cached_layers")
    num_layers = StatedShape.parse(scales.metadata, "the artifact").num_layers
    if text is None or num_layers is None:
        return None
    return parse_layers(text, num_layers, "the artifact's metadata")


def check_against_model(scales: KVScales, shape: ModelShape) -> list[str]:
    """Refuse an artifact calibrated on another model; return notes on what could not be checked."""
    stated = StatedShape.parse(scales.metadata, "the artifact")
    recorded: dict[str, object] = {
        "num_layers": stated.num_layers,
        "num_kv_heads": stated.num_kv_heads,
        "head_dim": stated.head_dim,
        "model_type": scales.metadata.get("model_type") or None,
        "config_hash": scales.metadata.get("config_hash") or None,
    }
    actual: dict[str, object] = {
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "model_type": shape.model_type,
        "config_hash": shape.config_hash,
    }
    if stated.layers is not None or not shape.kv.uniform:  # per layer: compared below, layer by layer
        recorded.pop("num_kv_heads"), recorded.pop("head_dim")
    mismatches = [
        f"{key} {recorded[key]} (artifact) vs {actual[key]} ({shape.source})"
        for key in recorded
        if recorded[key] is not None and actual[key] is not None and recorded[key] != actual[key]
    ]
    if stated.layers is not None or not shape.kv.uniform:
        mismatches += [f"layer {i} K/V {stated.of(i).text()} (artifact) vs {shape.kv.of(i).text()} ({shape.source})"
                       for i in shape.kv_layers if stated.of(i) is not None and stated.of(i) != shape.kv.of(i)][:4]
    if mismatches:
        raise UsageError(
            "the scales were calibrated on a different model: " + "; ".join(mismatches),
            hint="export with the model the scales were calibrated on (--model), or calibrate this one",
        )
    cached = recorded_cached_layers(scales)
    if cached is not None and recorded["num_layers"] == shape.num_layers and cached != shape.kv_layers:
        raise UsageError(
            f"the scales were calibrated on a model whose KV-cache layers are {listed(list(cached))}, but "
            f"{shape.source} caches layers {listed(list(shape.kv_layers))}",
            hint="export with the model the scales were calibrated on (--model), or calibrate this one",
        )
    unchecked = [key for key in recorded if recorded[key] is None]
    if unchecked:
        return [f"the artifact records no {', '.join(unchecked)}: not checked against {shape.source}"]
    return []


def expected_shape(spec: QuantSpec, shape: ModelShape, layer: int, which: Which) -> tuple[int, ...]:
    """The shape of layer ``layer``'s ``which`` scale of granularity ``spec.granularity``."""
    heads, dim = shape.kv.of(layer).of(which)
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "head":
        return (heads,)
    return (heads, dim)


def check_tensors(scales: KVScales, shape: ModelShape) -> None:
    """Every layer with a KV cache present (and no other), every scale / zero point of the shape its
    granularity implies."""
    if shape.kv.all_layers_cached:
        missing, absent = first_missing(scales.layers, shape.num_layers)  # bounded by the layers held, not the count
        extra = sorted(i for i in scales.layers if not 0 <= i < shape.num_layers)
    else:  # a hybrid model: its KV-cache layers, as many as its config (or the artifact) names
        missing = sorted(set(shape.kv_layers) - set(scales.layers))
        absent = len(missing)
        extra = sorted(set(scales.layers) - set(shape.kv_layers))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing layers {listed(missing, absent)}")
        if extra:
            beyond = [i for i in extra if i >= shape.num_layers]
            if beyond:
                parts.append(f"layers {listed(beyond)} beyond the model's {shape.num_layers}")
            if len(beyond) < len(extra):
                parts.append(f"layers {listed([i for i in extra if i < shape.num_layers])}, which hold no KV cache")
        cached = "" if shape.kv.all_layers_cached else f", KV cache in layers {listed(list(shape.kv_layers))}"
        raise UsageError(
            f"the artifact's layers do not match {shape.source} ({shape.num_layers} layers{cached}): " + "; ".join(parts)
        )
    for i in sorted(scales.layers):
        layer = scales.layers[i]
        for which in WHICH:
            spec = scales.recipe.spec(which)
            want_shape = expected_shape(spec, shape, i, which)
            for what, tensor in (("scale", layer.scale(which)), ("zero point", layer.zero_point(which))):
                if tensor is None:
                    continue
                if tuple(tensor.shape) != want_shape:
                    raise UsageError(
                        f"layer {i} {KV_NAME[which]} {what} has shape {tuple(tensor.shape)}, but granularity "
                        f"{spec.granularity} on {shape.source} needs {want_shape}"
                    )


# --- what a format can hold ----------------------------------------------------------------------


def spec_label(spec: QuantSpec) -> str:
    sym = "symmetric" if spec.symmetric else "asymmetric"
    return f"{spec.format} {sym} per {spec.granularity}"


def require_same_format(scales: KVScales, export_format: str) -> str:
    """The one number format of K and V (every engine format holds one for both)."""
    k, v = scales.recipe.key, scales.recipe.value
    if k.format != v.format:
        raise UsageError(
            f"--format {export_format} stores K and V in one cache dtype, but the recipe quantizes K as {k.format} "
            f"and V as {v.format}",
            hint="solve a recipe with the same format for keys and values",
        )
    return k.format


def refuse_format(scales: KVScales, export_format: str, allowed: Sequence[str], why: str, hint: str) -> None:
    number = require_same_format(scales, export_format)
    if number not in allowed:
        raise UsageError(f"--format {export_format} cannot hold {number} scales: {why}", hint=hint)
