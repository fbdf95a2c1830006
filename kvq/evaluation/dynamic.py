"""Eval-only recipes: what engines do without calibrated scales, to compare calibrated recipes with.

These need no calibration and produce no artifact; ``kvq eval --recipe NAME`` evaluates them.

* ``int8-dynamic-per-token`` / ``int4-dynamic-per-token``: LMDeploy's online KV quantization
  (``quant_policy=8`` / ``quant_policy=4``): every (token, KV head) gets its own scale and offset
  from its ``head_dim`` values, computed when the token is written. LMDeploy's scheme is
  **asymmetric** (a scale and a zero per token-head; see
  :func:`kvq.kernels.reference.qdq_dynamic_per_token_head` for the exact convention), so these are
  asymmetric. LMDeploy keeps the scale and zero in the 16-bit cache dtype, so each (layer, token,
  KV head) of K and of V carries 2 x 2 bytes of parameters: counted in the bytes per token.
* ``fp8-e4m3-scale-1.0`` / ``fp8-e5m2-scale-1.0``: an fp8 cache with ``k_scale = v_scale = 1.0``,
  what vLLM uses when a checkpoint ships no scales (``kv_cache_dtype="fp8"`` without calibration):
  K and V are saturated to +-448 (e4m3) / +-57344 (e5m2) and rounded to fp8 as they are.
  ``kvq eval`` adds the matching one next to every fp8 artifact it evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq.errors import UsageError
from kvq.evaluation.quant_cache import Which, describe_spec
from kvq.kernels import fake_quantize, qdq_dynamic_per_token_head
from kvq.model.model_spec import KVShape
from kvq.quant.formats import FORMATS
from kvq.recipe.schema import KVRecipe, QuantSpec, builtin_recipe_names

PARAM_BYTES = 2  # a 16-bit float per per-token quantization parameter (LMDeploy: the cache dtype)


@dataclass(frozen=True)
class DynamicRecipe:
    """A run-time quantization mode: a scale (and offset) per (token, KV head), no calibration."""

    name: str
    format: str  # int8 | int4
    symmetric: bool
    engine: str  # which engine does this, for the docs and the report


INT8_DYNAMIC = DynamicRecipe("int8-dynamic-per-token", "int8", False, "LMDeploy quant_policy=8")
INT4_DYNAMIC = DynamicRecipe("int4-dynamic-per-token", "int4", False, "LMDeploy quant_policy=4")
DYNAMIC_RECIPES: dict[str, DynamicRecipe] = {r.name: r for r in (INT8_DYNAMIC, INT4_DYNAMIC)}

UNIT_SCALE_RECIPES: dict[str, str] = {"fp8-e4m3-scale-1.0": "fp8_e4m3", "fp8-e5m2-scale-1.0": "fp8_e5m2",
                                      "nvfp4-scale-1.0": "nvfp4", "fp8-e4m3-attention-scale-1.0": "fp8_e4m3"}
FP8_ATTENTION_UNIT = "fp8-e4m3-attention-scale-1.0"  # K, V and the query at scale 1.0: FP8 attention uncalibrated
_UNIT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "nvfp4")  # formats an engine runs with a scale of 1.0 when none is given

EVAL_ONLY_RECIPE_NAMES: tuple[str, ...] = (*DYNAMIC_RECIPES, *UNIT_SCALE_RECIPES)


class DynamicQuantizer:
    """Fake-quantizes every (token, KV head) with its own range, as the engine does at run time."""

    kind = "dynamic"
    quantizes_queries = False

    def __init__(self, recipe: DynamicRecipe):
        self.recipe = recipe
        self.name = recipe.name
        self.source = f"run time ({recipe.engine})"

    def describe(self, which: Which) -> str:
        return f"{self.recipe.format} {'sym' if self.recipe.symmetric else 'asym'} per token-head"

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        return qdq_dynamic_per_token_head(x, self.recipe.format, self.recipe.symmetric)

    def kv_bytes_per_token(self, shape: KVShape, model_dtype: torch.dtype) -> float:
        codes = shape.elements_per_token * FORMATS[self.recipe.format].bits / 8
        params_per_token_head = 1 if self.recipe.symmetric else 2  # scale (and zero)
        token_heads = shape.heads_per_token  # K and V of every cached layer
        return codes + token_heads * params_per_token_head * PARAM_BYTES


class UnitScaleQuantizer:
    """fp8 with scale 1.0 (nvfp4: global scale 1.0) for K and V of every layer: the engines' uncalibrated fallback."""

    kind = "uncalibrated"

    def __init__(self, key_format: str, value_format: str, name: str | None = None, query: bool = False):
        if key_format not in _UNIT_FORMATS or value_format not in _UNIT_FORMATS:
            raise ValueError(f"scale 1.0 is an fp8 / nvfp4 fallback, not for {key_format} / {value_format}")
        self.recipe = KVRecipe(
            name=name or unit_scale_name(key_format, value_format, query),
            description="uncalibrated: k_scale = v_scale = 1.0" + (", q_scale = 1.0" if query else ""),
            key=QuantSpec(format=key_format, symmetric=True, granularity="tensor"),
            value=QuantSpec(format=value_format, symmetric=True, granularity="tensor"),
            query=QuantSpec(format=key_format, symmetric=True, granularity="tensor") if query else None,
        )
        self.name = self.recipe.name
        self.source = "scale = 1.0 (engine default without calibration)"
        self.quantizes_queries = query  # FP8 attention with q_scale 1.0 (vLLM's default without one)
        self._one = torch.ones((), dtype=torch.float32)  # shape (): one scale per tensor

    def describe(self, which: Which) -> str:
        return describe_spec(self.recipe.spec(which)).replace("per tensor", "scale 1.0")

    def quantize(self, x: torch.Tensor, layer_idx: int, which: Which) -> torch.Tensor:
        if self._one.device != x.device:
            self._one = self._one.to(x.device)
        return fake_quantize(x, self._one, None, self.recipe.spec(which).format)

    def quantize_query(self, q: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if self._one.device != q.device:
            self._one = self._one.to(q.device)
        return fake_quantize(q, self._one, None, self.recipe.key.format)

    def kv_bytes_per_token(self, shape: KVShape, model_dtype: torch.dtype) -> float:
        return (shape.elements_of("k") * FORMATS[self.recipe.key.format].bits
                + shape.elements_of("v") * FORMATS[self.recipe.value.format].bits) / 8


def unit_scale_name(key_format: str, value_format: str, query: bool = False) -> str:
    if key_format == value_format:
        return f"{key_format.replace('_', '-')}{'-attention' if query else ''}-scale-1.0"
    return f"k-{key_format.replace('_', '-')}-v-{value_format.replace('_', '-')}-scale-1.0"


def eval_only_quantizer(name: str) -> DynamicQuantizer | UnitScaleQuantizer:
    """The quantizer of an eval-only recipe name; a UsageError listing the valid names otherwise."""
    if name in DYNAMIC_RECIPES:
        return DynamicQuantizer(DYNAMIC_RECIPES[name])
    if name in UNIT_SCALE_RECIPES:
        number_format = UNIT_SCALE_RECIPES[name]
        return UnitScaleQuantizer(number_format, number_format, name=name, query=name == FP8_ATTENTION_UNIT)
    if name in builtin_recipe_names():
        raise UsageError(
            f"recipe {name!r} uses calibrated scales; --recipe takes eval-only recipes: "
            f"{', '.join(EVAL_ONLY_RECIPE_NAMES)}",
            hint=f"run `kvq calibrate --recipe {name} --out DIR` (or `kvq solve`) and pass --scales DIR",
        )
    raise UsageError(
        f"unknown eval-only recipe {name!r}; valid: {', '.join(EVAL_ONLY_RECIPE_NAMES)}",
        hint="calibrated recipes are evaluated from their scales: --scales DIR",
    )
