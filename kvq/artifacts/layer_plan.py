"""Per-layer plans (``plan.json`` in an artifact): which layers keep an unquantized KV cache.

``kvq plan`` measures each layer's sensitivity (:mod:`kvq.evaluation.sensitivity`) and, for a budget,
chooses the layers to keep in the model dtype; the rest use the artifact's scales. Two budgets:

* ``--skip N``: the N most sensitive layers (1 <= N < layers: a plan quantizes at least one layer).
* ``--bytes-per-token B``: layers in sensitivity order, most sensitive first, are kept unquantized
  while the KV bytes one token takes stay within B (every layer costs the same, so this is the
  largest N whose bytes fit). Refused when the recipe alone exceeds B, or when B holds the whole
  unquantized cache (nothing would be quantized).

Mixed formats per layer (a format per layer from a list of candidates) are not planned: no engine
kvq exports to loads a different quantized format per layer, only "quantized or not" (vLLM).

The plan is tied to its scales by the sha256 of ``scales.safetensors`` (and, in the artifact set, is
dropped when the scales are rewritten: ``kvq.artifacts.files.DERIVED_FROM``). What engines can do with it,
read in their source:

* vLLM >= 0.19.0: ``--kv-cache-dtype-skip-layers 0 17`` (argparse ``nargs="+"``, one layer index per
  word: ``0,17`` would be one pattern matching no layer, silently). Those layers get
  ``kv_cache_dtype = "auto"`` (the model dtype) after the compressed-tensors scheme set fp8
  (``model_executor/layers/attention/attention.py``, ``config/cache.py``, ``engine/arg_utils.py``
  ``collection_to_kwargs`` @ 0.19.0 and 0.33.0). Only fp8 e4m3 scales have a vLLM export.
* SGLang 0.5.23: no option to keep chosen layers unquantized (``server_args.py``: one
  ``--kv-cache-dtype`` for every layer).
* TensorRT-LLM, LMDeploy: one KV-cache quantization for the whole model (``kv_cache_quant_algo``,
  ``quant_policy``); kvq knows no per-layer option (not read in their source for this).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvq.artifacts.files import PLAN_JSON, SCALES_FILE, file_sha256, listed, require_file
from kvq.errors import UsageError
from kvq.io.parse import parse_json

PLAN_KIND = "skip-layers"
VLLM_SKIP_FLAG = "--kv-cache-dtype-skip-layers"
VLLM_SKIP_SINCE = "0.19.0"
_HINT = "run `kvq plan ARTIFACT --dataset ... --skip N` to write the artifact's plan.json"


def vllm_skip_flags(skip_layers: Sequence[int]) -> str:
    """``--kv-cache-dtype-skip-layers 0 17``: vLLM takes one layer index per word (nargs="+")."""
    return " ".join([VLLM_SKIP_FLAG, *(str(i) for i in sorted(skip_layers))])


def engine_support(key_format: str, value_format: str, skip_layers: Sequence[int]) -> dict[str, dict]:
    """Per engine: whether it can apply the plan with kvq's export of these formats, and how (or why not)."""
    if not skip_layers:
        vllm = {"applies": True, "flags": "", "note": "no layer skipped: no flag needed"}
    elif key_format == value_format == "fp8_e4m3":
        vllm = {"applies": True, "flags": vllm_skip_flags(skip_layers),
                "note": f"vLLM >= {VLLM_SKIP_SINCE}, with the --format vllm export of these scales"}
    else:
        formats = key_format if key_format == value_format else f"{key_format} / {value_format}"
        vllm = {"applies": False, "flags": "",
                "note": f"vLLM loads no static {formats} KV scales (kvq exports fp8_e4m3 only)"}
    one = "one KV-cache format for every layer: the plan cannot be applied"
    return {
        "vllm": vllm,
        "sglang": {"applies": False, "flags": "", "note": f"SGLang 0.5.23: {one}"},
        "trtllm": {"applies": False, "flags": "", "note": f"TensorRT-LLM (kv_cache_quant_algo): {one}"},
        "lmdeploy": {"applies": False, "flags": "", "note": f"LMDeploy (quant_policy): {one}"},
    }


# --- choosing -----------------------------------------------------------------------------------


def check_skip_count(skip: int, num_layers: int) -> None:
    """``--skip N``: at least 1, fewer than the layers (a plan quantizes at least one layer)."""
    if skip < 1 or skip >= num_layers:
        raise UsageError(f"--skip {skip}: the scales hold {num_layers} layers; a plan keeps 1 to "
                         f"{num_layers - 1} of them unquantized", hint=f"use --skip 1..{num_layers - 1}")


def skip_most_sensitive(order: Sequence[int], skip: int) -> tuple[int, ...]:
    """The ``skip`` first layers of ``order`` (most sensitive first), sorted by index."""
    return tuple(sorted(order[:skip]))


def check_bytes_budget(limit: float, quantized: float | None = None, unquantized: float | None = None) -> None:
    """``--bytes-per-token``: a positive number between the all-quantized and the unquantized cache's bytes."""
    if not (math.isfinite(limit) and limit > 0):
        raise UsageError(f"--bytes-per-token {limit} must be a positive number")
    if quantized is not None and quantized > limit:
        raise UsageError(f"--bytes-per-token {limit:g}: the recipe alone takes {quantized:g} bytes per token",
                         hint="raise the budget, or plan a smaller format's scales (int4, int8)")
    if unquantized is not None and unquantized <= limit:
        raise UsageError(f"--bytes-per-token {limit:g} holds the whole unquantized cache ({unquantized:g} bytes "
                         "per token): nothing needs quantizing",
                         hint="lower the budget, or serve without KV-cache quantization")


def skip_within_bytes(order: Sequence[int], bytes_per_token: Callable[[Sequence[int]], float],
                      limit: float) -> tuple[int, ...]:
    """Layers of ``order`` kept unquantized, most sensitive first, while ``bytes_per_token(skipped)`` <= ``limit``."""
    check_bytes_budget(limit, bytes_per_token(()), bytes_per_token(tuple(order)))
    chosen: list[int] = []
    for layer in order:
        if bytes_per_token((*chosen, layer)) > limit:
            break
        chosen.append(layer)
    return tuple(sorted(chosen))


# --- the file -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadPlan:
    """What evaluating or exporting a plan needs from plan.json."""

    path: Path
    recipe: str
    num_layers: int
    skip_layers: tuple[int, ...]
    scales_sha256: str

    @property
    def scales_file(self) -> Path:
        return self.path.parent / SCALES_FILE


def plan_path(path: str | Path) -> Path:
    """The plan file ``path`` names: itself, or the plan.json in a folder."""
    path = Path(path)
    return path / PLAN_JSON if path.is_dir() else path


def _field(data: dict, key: str, kind: type, where: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UsageError(f"{where}: {key!r} is missing or not {'an integer' if kind is int else 'a ' + kind.__name__}",
                         hint=_HINT)
    return value


def read_plan(path: str | Path) -> ReadPlan:
    """Read and check a plan.json: its layers, and that the scales beside it are the ones it was made for."""
    file = require_file(plan_path(path), "plan file", hint=_HINT)
    where = f"plan file {file}"
    data = parse_json(file.read_bytes(), where, _HINT)
    if not isinstance(data, dict) or data.get("plan") != PLAN_KIND:
        raise UsageError(f"{where} is not a kvq plan (no \"plan\": \"{PLAN_KIND}\")", hint=_HINT)
    num_layers = _field(data, "num_layers", int, where)
    layers = _field(data, "skip_layers", list, where)
    scales = _field(data, "scales", dict, where)
    sha = _field(scales, "sha256", str, f"{where} scales")
    if num_layers < 1 or any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
        raise UsageError(f"{where}: num_layers must be at least 1 and skip_layers a list of layer indices",
                         hint=_HINT)
    check_plan_layers(layers, num_layers, str(file))
    plan = ReadPlan(file, str(data.get("recipe", "")), num_layers, tuple(sorted(layers)), sha)
    scales_file = require_file(plan.scales_file, f"{where}: the scales beside it,",
                               hint="a plan is read from the artifact folder holding its scales.safetensors")
    if file_sha256(scales_file) != sha:
        raise UsageError(f"{where} was made for other scales than {scales_file} (sha256 differs)",
                         hint="run `kvq plan` again for these scales")
    return plan


def check_plan_layers(layers: Sequence[int], num_layers: int, source: str) -> None:
    """Skipped layers: distinct indices in 0..num_layers-1 (``num_layers``: the plan's, or the model's)."""
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad:
        raise UsageError(f"plan {source} skips layer(s) {listed(bad)}, but the model has layers 0..{num_layers - 1}",
                         hint="a plan is made for one model: run `kvq plan` for this model")
    if len(set(layers)) != len(layers):
        raise UsageError(f"plan {source} lists a layer twice in skip_layers", hint=_HINT)


def check_plan_model(plan: ReadPlan, num_layers: int) -> None:
    """The plan was made for a model of ``num_layers`` layers."""
    if plan.num_layers != num_layers:
        raise UsageError(f"plan {plan.path} is for a model of {plan.num_layers} layers; the model has {num_layers}",
                         hint="run `kvq plan` for this model")


def plan_skip_layers(scales_file: str | Path) -> tuple[int, ...]:
    """The layers the plan.json beside ``scales_file`` skips; () when there is none (for exports)."""
    candidate = Path(scales_file).parent / PLAN_JSON
    return read_plan(candidate).skip_layers if candidate.is_file() else ()
