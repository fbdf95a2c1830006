"""The transforms a calibration folded into the model, as the artifact records them (``transforms.safetensors``).

Calibration plans the recipe's transforms on the model (key factors from the model's own query and
key ranges, seeded value rotations), folds them into the weights and records, beside the statistics:

* tensors ``layers.{i}.k_factor`` (kv_heads, head_dim) and ``layers.{i}.v_rotation`` (kv_heads,
  head_dim, head_dim), float64, exactly what was folded (so a later torch with another random
  generator still rebuilds the same weights);
* metadata ``transforms`` (the recipe's list as JSON), ``source_hash`` (the touched weights before)
  and ``weights_hash`` (after: :func:`kvq.transforms.weights_hash`).

``validate``, ``eval`` and the checkpoint exports fold the same record into the model they load
(:func:`refold`) and refuse it unless the folded weights hash to ``weights_hash``: scales calibrated
on transformed K/V are never applied to an untransformed model, or to another one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvq.artifacts.files import TRANSFORMS_FILE, read_safetensors, safetensors_bytes
from kvq.errors import UsageError
from kvq.recipe.schema import QuantSpec, SmoothKeysSpec, TransformSpec, transforms_json
from kvq.transforms.describe import describe_attention
from kvq.transforms.digest import weights_hash
from kvq.transforms.factors import TransformPlan, plan_transforms
from kvq.transforms.fold import apply_transforms
from kvq.transforms.key_search import SEARCH_ROWS, check_searchable
from kvq.transforms.measure import measure_qk_absmax
from kvq.transforms.spec import RotateValues, SmoothKeys, Transform


def runtime_transforms(specs: Sequence[TransformSpec]) -> tuple[Transform, ...]:
    """The recipe's transform entries as the transforms the folding code takes."""
    return tuple(SmoothKeys(spec.alpha, bool(spec.search)) if isinstance(spec, SmoothKeysSpec) else RotateValues(spec.seed)
                 for spec in specs)


@dataclass(frozen=True)
class TransformRecord:
    transforms_json: str
    key_factors: tuple[torch.Tensor, ...] | None  # per layer (kv_heads, head_dim), float64
    value_rotations: tuple[torch.Tensor, ...] | None  # per layer (kv_heads, head_dim, head_dim), float64
    source_hash: str
    weights_hash: str

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name, per_layer in (("k_factor", self.key_factors), ("v_rotation", self.value_rotations)):
            for i, tensor in enumerate(per_layer or ()):
                tensors[f"layers.{i}.{name}"] = tensor.to(torch.float64)
        meta = {"transforms": self.transforms_json, "source_hash": self.source_hash,
                "weights_hash": self.weights_hash}
        return safetensors_bytes(tensors, meta)

    @classmethod
    def load(cls, path: Path) -> TransformRecord:
        tensors, meta = read_safetensors(path, "transforms file")
        missing = [key for key in ("transforms", "source_hash", "weights_hash") if not meta.get(key)]
        if missing:
            raise UsageError(f"transforms file {path} records no {', '.join(missing)}",
                             hint="calibrate again: the file is damaged or not written by kvq")

        def per_layer(name: str) -> tuple[torch.Tensor, ...] | None:
            found = sorted(int(k.split(".")[1]) for k in tensors if k.endswith(f".{name}"))
            if not found:
                return None
            if found != list(range(len(found))):
                raise UsageError(f"transforms file {path}: {name} of layers {found[:8]} is not layers 0..n-1")
            return tuple(tensors[f"layers.{i}.{name}"] for i in found)

        return cls(meta["transforms"], per_layer("k_factor"), per_layer("v_rotation"), meta["source_hash"],
                   meta["weights_hash"])


def transform_model(model: torch.nn.Module, specs: Sequence[TransformSpec],
                    batch_iter: Callable[[], Iterable], key: QuantSpec | None = None) -> TransformRecord:
    """Plan ``specs`` on ``model`` (query/key statistics from one pass over ``batch_iter()`` when smoothing
    keys; ``key``, the recipe's key quantization, for a factor search), fold them into its weights in place,
    and return the record of what was folded."""
    transforms = runtime_transforms(specs)
    smooth = next((t for t in transforms if isinstance(t, SmoothKeys)), None)
    if smooth is not None and smooth.search and key is not None:
        check_searchable(key)  # before the measuring pass
    rows = SEARCH_ROWS if smooth is not None and smooth.search else 0
    qk_absmax = measure_qk_absmax(model, batch_iter(), rows) if smooth is not None else None
    plan = plan_transforms(model, transforms, qk_absmax, key)
    folded = apply_transforms(model, plan)
    return TransformRecord(transforms_json(specs), plan.key_factors, plan.value_rotations, plan.source_hash,
                           weights_hash(folded))


def refold(model: torch.nn.Module, record: TransformRecord, specs: Sequence[TransformSpec],
           source: str) -> dict[str, torch.Tensor]:
    """Fold ``record`` into ``model`` again (the model the scales were calibrated on, freshly loaded); the
    folded weights by state-dict name. Refused unless the result is exactly what calibration folded."""
    if record.transforms_json != transforms_json(specs):
        raise UsageError(f"{source}: the transforms file records {record.transforms_json}, the scales' recipe "
                         f"{transforms_json(specs)}", hint="use the transforms file written with these scales")
    plan = TransformPlan(runtime_transforms(specs), tuple(describe_attention(model)), record.key_factors,
                         record.value_rotations, record.source_hash)
    try:
        folded = apply_transforms(model, plan)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc.message}", hint="pass the model the scales were calibrated on") from exc
    if weights_hash(folded) != record.weights_hash:
        raise UsageError(f"{source}: the transformed weights differ from those calibrated (weights hash)",
                         hint="pass the model the scales were calibrated on, in the same dtype")
    return folded


def record_beside(scales_file: Path) -> TransformRecord:
    """The transforms record written with a scales file (``transforms.safetensors`` in its folder)."""
    path = scales_file.parent / TRANSFORMS_FILE
    if not path.is_file():
        raise UsageError(f"the scales {scales_file} were calibrated with transforms, but {path} is missing",
                         hint="keep transforms.safetensors beside scales.safetensors (kvq solve copies it)")
    return TransformRecord.load(path)


def fold_recorded(model: torch.nn.Module, recipe_transforms: Sequence[TransformSpec], metadata: dict[str, str],
                  scales_file: Path) -> dict[str, torch.Tensor] | None:
    """Fold the transforms the scales at ``scales_file`` were calibrated with into ``model`` (None: there are
    none); the folded weights by state-dict name."""
    if not recipe_transforms:
        return None
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    calibrated = metadata.get("dtype")
    if calibrated and dtype != calibrated:
        raise UsageError(f"the scales {scales_file} were calibrated with transforms folded into the model in "
                         f"{calibrated}, but the model is loaded in {dtype}",
                         hint=f"load it in {calibrated} (--dtype {calibrated}, or omit --dtype)")
    record = record_beside(scales_file)
    if record.weights_hash != metadata.get("weights_hash"):
        raise UsageError(f"{scales_file.parent / TRANSFORMS_FILE} is not the transforms record of the scales "
                         f"{scales_file} (weights hash)", hint="use the transforms file written with these scales")
    return refold(model, record, recipe_transforms, str(scales_file))
