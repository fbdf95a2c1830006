"""The ``kvq plan`` run: measure each layer's sensitivity to an artifact's scales, choose the layers to
keep unquantized for a budget, and write ``plan.json`` into the artifact (see :mod:`kvq.artifacts.layer_plan`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq import __version__
from kvq.artifacts.files import ARTIFACT_FILES, PLAN_JSON, carried_over, file_sha256, json_bytes
from kvq.artifacts.layer_plan import (
    PLAN_KIND,
    check_bytes_budget,
    check_skip_count,
    engine_support,
    skip_most_sensitive,
    skip_within_bytes,
)
from kvq.artifacts.scales import KVScales, scales_path
from kvq.data import LoadedDataset
from kvq.data.data_spec import DataSpec
from kvq.errors import UsageError
from kvq.evaluation.perplexity import EvalWindows, prepare
from kvq.evaluation.quant_cache import IdentityQuantizer, PartialQuantizer, StaticQuantizer
from kvq.evaluation.sensitivity import SENSITIVITY_MEASURES, LayerSensitivity, measure_sensitivity
from kvq.io.atomic import write_folder
from kvq.io.out_policy import check_folder_out
from kvq.model.layer_types import FULL, attention_types, sliding_window_layers
from kvq.model.loading import check_spec
from kvq.model.model_spec import ModelInfo, ModelSpec
from kvq.progress import Progress, counter

PLAN_WRITES = "ARTIFACT"  # what messages call the folder plan writes plan.json into (plan has no --out)


@dataclass
class PlanConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec("wikitext2"))
    scales: str = ""  # the artifact folder (or its scales.safetensors); plan.json goes beside the scales
    samples: int | None = 8  # windows
    seqlen: int = 512
    batch_size: int = 1
    by: str = "attention"  # one of SENSITIVITY_MEASURES
    skip: int | None = None  # keep this many of the most sensitive layers unquantized
    bytes_per_token: float | None = None  # ... or as many as fit in this KV bytes per token
    keep_sliding_window: bool = False  # ... or every sliding-window layer (the config's layer_types)
    force: bool = False  # write plan.json into a folder holding files other than a kvq artifact's


@dataclass
class PlanResult:
    path: Path  # the plan.json written
    scales_file: Path
    recipe: str
    key_format: str
    value_format: str
    info: ModelInfo
    model_dtype: torch.dtype
    dataset: LoadedDataset
    windows: EvalWindows
    sensitivity: LayerSensitivity
    budget: dict
    skip_layers: tuple[int, ...]
    kv_bytes_per_token: dict[str, float]  # plan, all_quantized, unquantized
    warnings: list[str]
    layer_types: tuple[str, ...] = ()  # each layer's attention type, recorded where not all full attention

    @property
    def engines(self) -> dict[str, dict]:
        return engine_support(self.key_format, self.value_format, self.skip_layers)

    def to_json(self) -> dict:
        """plan.json: what eval and export read (plan, num_layers, skip_layers, scales) and how it was chosen."""
        info, sens, w = self.info, self.sensitivity, self.windows
        files = [{"path": f, "sha256": file_sha256(f)} for f in self.dataset.files]
        return {
            "kvq_version": __version__,
            "plan": PLAN_KIND,
            "recipe": self.recipe,
            "scales": {"file": self.scales_file.name, "sha256": file_sha256(self.scales_file)},
            "model": {"id": info.model_id, "config_hash": info.config_hash, "num_kv_heads": info.num_kv_heads,
                      "head_dim": info.head_dim, "dtype": str(self.model_dtype).removeprefix("torch.")},
            "num_layers": info.num_layers,
            "skip_layers": list(self.skip_layers),
            **({"layer_types": list(self.layer_types)} if any(t != FULL for t in self.layer_types) else {}),
            "budget": self.budget,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "sensitivity": {
                "by": sens.by, "measure": sens.description, "order": sens.order(),
                "per_layer": {str(i): v for i, v in sorted(sens.per_layer.items())},
                "stderr": {str(i): v for i, v in sorted(sens.stderr.items())} or None,
                "all_layers_delta_nll": sens.all_layers_delta_nll,
                "data": {"dataset": self.dataset.name, "origin": self.dataset.origin, "files": files,
                         "windows": w.num_windows, "seqlen": w.seqlen},
            },
            "engines": self.engines,
            "warnings": list(self.warnings),
        }


def _check_budget(cfg: PlanConfig, num_layers: int) -> dict:
    """The budget, checked before any data or model is loaded, as plan.json records it."""
    if cfg.by not in SENSITIVITY_MEASURES:
        raise UsageError(f"--by {cfg.by!r}: use one of {', '.join(SENSITIVITY_MEASURES)}")
    if sum((cfg.skip is not None, cfg.bytes_per_token is not None, cfg.keep_sliding_window)) != 1:
        raise UsageError("give one budget: --skip N (layers kept unquantized), --bytes-per-token B or "
                         "--keep-sliding-window", hint="e.g. kvq plan ARTIFACT --dataset wikitext2 --skip 2")
    if cfg.keep_sliding_window:
        return {"keep_sliding_window": True}
    if cfg.skip is not None:
        check_skip_count(cfg.skip, num_layers)
        return {"skip": cfg.skip}
    check_bytes_budget(cfg.bytes_per_token)
    return {"bytes_per_token": cfg.bytes_per_token}


def _sliding_skip(config, model_id: str) -> tuple[int, ...]:
    """--keep-sliding-window: every sliding-window layer, leaving at least one layer quantized."""
    skip = sliding_window_layers(config)
    layers = config.get_text_config().num_hidden_layers
    if not skip:
        raise UsageError(f"--keep-sliding-window: model {model_id} has no sliding-window layer (its config's "
                         "layer_types / sliding_window)", hint="use --skip N or --bytes-per-token B")
    if len(skip) == layers:
        raise UsageError(f"--keep-sliding-window: every layer of model {model_id} is sliding-window; a plan "
                         "quantizes at least one layer", hint="use --skip N or --bytes-per-token B")
    return skip


def run_plan(cfg: PlanConfig, progress: Progress | None = None) -> PlanResult:
    """Plan ``cfg`` (see the module docstring); ``progress(done, total)`` in windows (:mod:`kvq.progress`)."""
    check_spec(cfg.model)  # before any data or model is loaded
    scales_file = scales_path(cfg.scales)
    quantizer = StaticQuantizer(KVScales.load(scales_file), source=str(cfg.scales))
    budget = _check_budget(cfg, quantizer.scales.num_layers)
    check_folder_out(scales_file.parent, ARTIFACT_FILES, force=cfg.force, inputs=[scales_file],  # before the work
                     carry=carried_over([PLAN_JSON]), option=PLAN_WRITES)
    ready = prepare(cfg.model, cfg.data, cfg.seqlen, cfg.samples, [quantizer])
    info = ready.loaded.info
    shape = info.shape
    dtype = next(ready.loaded.model.parameters()).dtype

    def bytes_of(skipped: Sequence[int]) -> float:
        return PartialQuantizer(quantizer, skipped).kv_bytes_per_token(shape, dtype)

    every = info.kv_layers
    if cfg.bytes_per_token is not None:  # before the measuring: the recipe and dtype are known now
        check_bytes_budget(cfg.bytes_per_token, bytes_of(()), bytes_of(every))
    callback = counter(progress, ready.windows.num_windows)
    sens = measure_sensitivity(ready.loaded.model, ready.windows, quantizer, info.kv_layers, cfg.by,
                               cfg.batch_size, callback)
    types = attention_types(ready.loaded.model.config)
    if cfg.keep_sliding_window:
        skip = _sliding_skip(ready.loaded.model.config, info.model_id)
    elif cfg.skip is not None:
        skip = skip_most_sensitive(sens.order(), cfg.skip)
    else:
        skip = skip_within_bytes(sens.order(), bytes_of, cfg.bytes_per_token)
    warnings = list(ready.warnings)
    if not skip:
        warnings.append(f"--bytes-per-token {cfg.bytes_per_token:g} leaves no room to keep a layer unquantized "
                        f"(one layer costs {bytes_of(every[:1]) - bytes_of(()):g} bytes per token more): "
                        "the plan quantizes every layer")
    kv_bytes = {"plan": bytes_of(skip), "all_quantized": bytes_of(()),
                "unquantized": IdentityQuantizer().kv_bytes_per_token(shape, dtype)}
    recipe = quantizer.recipe
    result = PlanResult(scales_file.parent / PLAN_JSON, scales_file, recipe.name, recipe.key.format,
                        recipe.value.format, info, dtype, ready.dataset, ready.windows, sens, budget, skip, kv_bytes,
                        warnings, types)
    write_folder(scales_file.parent, {PLAN_JSON: json_bytes(result.to_json())}, kind=ARTIFACT_FILES,
                 carry=carried_over([PLAN_JSON]), force=cfg.force, inputs=[scales_file], option=PLAN_WRITES)
    return result
