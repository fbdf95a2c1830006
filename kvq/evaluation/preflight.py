"""Checks before measuring: do the scales fit the model, and is the data held out from calibration?"""

from __future__ import annotations

from kvq.artifacts.files import StatedShape, file_sha256, listed
from kvq.artifacts.scales import KVScales
from kvq.data import LoadedDataset
from kvq.errors import UsageError
from kvq.io.parse import parse_json
from kvq.model.model_spec import ModelInfo


def check_scales_match(scales: KVScales, info: ModelInfo, source: str) -> list[str]:
    """Refuse scales made for another shape of model; return warnings (a different config hash).

    The shape (layers, KV heads, head_dim; each layer's K and V where they differ) must match: scales of another shape cannot be applied. A
    different config hash with the same shape is a warning, not an error: scales carried over to a
    fine-tune of the calibrated model are applied as an engine would apply them, and measuring how
    well they carry over is a legitimate question.
    """
    meta = scales.metadata
    calibrated_for = meta.get("model", "an unnamed model")
    stated = StatedShape.parse(meta, f"scales {source}")
    compared = {"layers": (stated.num_layers, info.num_layers)}
    if stated.layers is None:  # one (KV heads, head_dim) stated for all layers
        compared |= {"KV heads": (stated.num_kv_heads, info.num_kv_heads), "head_dim": (stated.head_dim, info.head_dim)}
    wrong = [f"{label} {ours} vs {theirs}" for label, (ours, theirs) in compared.items()
             if ours is not None and ours != theirs]
    if stated.layers is not None or not info.shape.uniform:  # per layer: each cached layer's K and V
        wrong += [f"layer {i} K/V {stated.of(i).text() if stated.of(i) else 'not stated'} vs {info.shape.of(i).text()}"
                  for i in info.kv_layers if stated.of(i) is not None and stated.of(i) != info.shape.of(i)][:4]
    if wrong:
        raise UsageError(
            f"scales {source} were calibrated for {calibrated_for}, which does not fit model {info.model_id}: "
            f"{'; '.join(wrong)} (scales vs model)",
            hint="calibrate this model (kvq calibrate --model ...) or pass the model the scales were made for",
        )
    layers = sorted(scales.layers)
    if layers != list(info.kv_layers):
        want = (f"layers 0..{info.num_layers - 1}" if info.shape.all_layers_cached
                else f"a KV cache in layers {listed(list(info.kv_layers))}")
        raise UsageError(
            f"scales {source} hold layers {listed(layers)} ({len(layers)} layers), model {info.model_id} has {want}",
            hint="calibrate this model to get scales for every layer with a KV cache",
        )
    for i in layers:
        for which in ("k", "v"):
            heads, dim = info.shape.of(i).of(which)
            shape = tuple(scales.layers[i].scale(which).shape)
            if shape not in {(), (heads,), (heads, dim)}:
                raise UsageError(
                    f"scales {source}: layer {i} {which}_scale has shape {shape}, which fits none of "
                    f"() / ({heads},) / ({heads}, {dim}) for model {info.model_id}",
                    hint="calibrate this model to get scales of its shape",
                )
    warnings = []
    calibrated_hash = meta.get("config_hash")
    if calibrated_hash and calibrated_hash != info.config_hash:
        warnings.append(
            f"scales {source} were calibrated on {calibrated_for} (config hash {calibrated_hash}); the model "
            f"is {info.model_id} (config hash {info.config_hash}): same shape, different config"
        )
    return warnings


def calibration_files(metadata: dict[str, str]) -> list[dict[str, str]]:
    """The calibration data files the metadata records ({path, sha256} each); [] when none."""
    try:
        files = parse_json(metadata.get("data_files", "[]"), "metadata data_files")
    except UsageError:  # a record of where the data came from, for a warning: unreadable, it records nothing
        return []
    return [f for f in files if isinstance(f, dict) and "sha256" in f] if isinstance(files, list) else []


def same_data_warning(metadata: dict[str, str], dataset: LoadedDataset, source: str) -> str | None:
    """A warning when ``dataset`` is (or includes) the data the scales were calibrated on.

    Files are compared by content (sha256), whatever their paths. Data read from elsewhere (the hub,
    pydoc) is the same when its origin string is: named hub datasets load a different split for
    evaluation than for calibration, so ``--dataset c4`` is held out from a ``c4`` calibration.
    """
    cal_files = calibration_files(metadata)
    if dataset.files and cal_files:
        by_hash = {f["sha256"]: f.get("path", "?") for f in cal_files}
        shared = [path for path in dataset.files if file_sha256(path) in by_hash]
        if shared:
            return (
                f"the evaluation data {', '.join(shared)} is the data scales {source} were calibrated on "
                "(same file content): the errors shown are in-sample, not on held-out data"
            )
        return None
    origin = metadata.get("dataset_origin")
    if not dataset.files and not cal_files and origin and origin == dataset.origin:
        return (
            f"the evaluation data ({dataset.origin}) is the source scales {source} were calibrated on: "
            "the errors shown are in-sample, not on held-out data"
        )
    return None
