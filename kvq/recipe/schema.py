"""Recipes: which number format, symmetry, granularity and observer quantize the KV cache.

A recipe is a YAML file validated by a typed schema. Unknown keys and bad values are rejected with
the file, the field path and the allowed values; combinations that make no sense (fp8 asymmetric)
are rejected, never rewritten.

    format: int8            # fp8_e4m3 | fp8_e5m2 | fp8_e4m3fnuz | int8 | int4 | nvfp4
    symmetric: false        # fp8 must be symmetric
    granularity: head       # tensor | head | channel
    observer: minmax        # minmax | percentile | mse (read histograms) | attention (reads Q/K/V rows)
                            #   | loss (picks among those by the model's loss: needs the model)
    percentile: 99.99       # only with observer: percentile (clip at this percentile of |x|)
    keys:                   # optional: override any of the four for keys ...
      granularity: channel
    values: {}              # ... or for values
    query:                  # optional: the query scale of FP8 attention (vLLM FlashAttention 3 / FlashInfer)
      format: fp8_e4m3      #   fp8 formats only
      granularity: tensor   #   tensor | head (per attention head)
    transforms:             # optional: outlier transforms folded into the weights before calibration
      - smooth-keys         # a name, or a mapping with options: {name: smooth-keys, alpha: 0.5}
      - {name: rotate-values, seed: 0}

Built-in recipes live in ``recipes/`` and are usable by name (``--recipe int8-asym-per-head``).
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from kvq.errors import UsageError
from kvq.recipe.reading import RECIPE_HINT, SHOWN_CHARS, data_file_hint, read_recipe_yaml, shown

Format = Literal["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "int8", "int4", "nvfp4"]
Granularity = Literal["tensor", "head", "channel"]


NUMBER_FORMATS: tuple[str, ...] = typing.get_args(Format)
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)



def observer_names() -> tuple[str, ...]:
    """The observers a recipe may name: the keys of the one table, :data:`kvq.solving.observers.OBSERVERS`
    (imported when a recipe is validated: the solve stage imports torch, ``kvq --help`` does not)."""
    from kvq.solving.observers import OBSERVERS

    return tuple(OBSERVERS)


def _known_observer(value: object) -> object:
    names = observer_names()
    if value not in names:
        allowed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise ValueError(f"Input should be {allowed} (got {shown(value)})")
    return value


Observer = Annotated[str, BeforeValidator(_known_observer)]

DEFAULT_RECIPE = "fp8-e4m3-per-tensor"
DEFAULT_PERCENTILE = 99.99


class QuantSpec(BaseModel):
    """How one tensor (keys or values) is quantized: the resolved, complete setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Format
    symmetric: StrictBool
    granularity: Granularity
    observer: Observer = "minmax"
    percentile: float | None = Field(None, gt=50.0, lt=100.0)  # only for observer percentile (default 99.99)

    @model_validator(mode="after")
    def _percentile_with_its_observer(self) -> QuantSpec:
        if self.percentile is not None and self.observer != "percentile":
            raise ValueError(f"percentile is an option of observer percentile, not of observer {self.observer}: "
                             "remove it, or set observer: percentile")
        return self

    @model_validator(mode="after")
    def _nvfp4_is_one_global_scale(self) -> QuantSpec:
        if self.format == "nvfp4" and (not self.symmetric or self.granularity != "tensor"):
            raise ValueError("format nvfp4 takes one static global scale per layer for K and for V (its block scales "
                             "are computed at run time): set symmetric: true and granularity: tensor")
        return self

    @model_validator(mode="after")
    def _fp8_is_symmetric(self) -> QuantSpec:
        if self.format.startswith("fp8") and not self.symmetric:
            raise ValueError(
                f"format {self.format} is symmetric by construction (no zero-point): set symmetric: true, "
                "or pick int8 / int4 for an asymmetric recipe"
            )
        return self

    @property
    def is_fp8(self) -> bool:
        return self.format.startswith("fp8")

    @property
    def clip_quantile(self) -> float:
        """The fraction of |x| the percentile observer keeps inside the range."""
        return (self.percentile if self.percentile is not None else DEFAULT_PERCENTILE) / 100.0

    @property
    def needs_histograms(self) -> bool:
        return self.observer in ("percentile", "mse", "loss")  # loss: the clipping observers are its candidates


class TensorOverride(BaseModel):
    """Optional per-tensor settings under ``keys:`` or ``values:``; unset fields inherit the top level."""

    model_config = ConfigDict(extra="forbid")

    format: Format | None = None
    symmetric: StrictBool | None = None
    granularity: Granularity | None = None
    observer: Observer | None = None
    percentile: float | None = None


class SmoothKeysSpec(BaseModel):
    """Key smoothing (SmoothAttention): K channels / s, the matching Q channels * s, s = |K|^alpha / |Q|^(1-alpha)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["smooth-keys"]
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    # true: then search the factors against the recipe's key quantizer (kvq.transforms.key_search); None = off,
    # so that recipes without it record the same JSON as before
    search: StrictBool | None = None

    @field_validator("search")
    @classmethod
    def _off_is_none(cls, value: bool | None) -> bool | None:
        return value or None


class RotateValuesSpec(BaseModel):
    """A seeded per-KV-head orthogonal (randomised Hadamard) rotation of V, undone in o_proj."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["rotate-values"]
    seed: int = 0


class QuerySpecFile(BaseModel):
    """``query:``: the scale of the query that FP8 attention quantizes (vLLM's FlashAttention 3 / FlashInfer
    with an fp8 KV cache); absent, the query is not quantized."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz"] = "fp8_e4m3"
    granularity: Literal["tensor", "head"] = "tensor"
    observer: Literal["minmax"] = "minmax"

    def resolved(self) -> QuantSpec:
        return QuantSpec(format=self.format, symmetric=True, granularity=self.granularity, observer=self.observer)


def _named(entries: object) -> object:
    """``- smooth-keys`` (a bare name in YAML) means ``- {name: smooth-keys}``."""
    if not isinstance(entries, list):
        return entries
    return [{"name": entry} if isinstance(entry, str) else entry for entry in entries]


TransformSpec = Annotated[SmoothKeysSpec | RotateValuesSpec, Field(discriminator="name")]
TRANSFORM_NAMES: tuple[str, ...] = ("smooth-keys", "rotate-values")


def _one_of_each(transforms: list) -> list:
    names = [t.name for t in transforms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"transform {twice[0]} is listed twice")
    return transforms


def transforms_json(specs: Sequence[SmoothKeysSpec | RotateValuesSpec]) -> str:
    """The canonical JSON of a recipe's transforms, as artifacts record and compare it ("[]" for none)."""
    return json.dumps([spec.model_dump(mode="json", exclude_none=True) for spec in specs], sort_keys=True)


class RecipeFile(BaseModel):
    """The YAML file as written."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    format: Format
    symmetric: StrictBool = True
    granularity: Granularity
    observer: Observer = "minmax"
    percentile: float | None = None
    keys: TensorOverride | None = None
    values: TensorOverride | None = None
    query: QuerySpecFile | None = None
    transforms: Annotated[list[TransformSpec], BeforeValidator(_named)] = []

    @model_validator(mode="after")
    def _transforms_once(self) -> RecipeFile:
        _one_of_each(self.transforms)
        return self

    def _spec(self, override: TensorOverride | None) -> dict:
        base = {
            "format": self.format,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "observer": self.observer,
            "percentile": self.percentile,
        }
        if override is not None:
            chosen = override.model_dump(exclude_none=True)
            if "observer" in chosen and "percentile" not in chosen and chosen["observer"] != "percentile":
                base["percentile"] = None  # another observer for this tensor: the top level's percentile is not its
            base.update(chosen)
        return base


class KVRecipe(BaseModel):
    """A resolved recipe: one complete :class:`QuantSpec` for keys and one for values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    key: QuantSpec
    value: QuantSpec
    query: QuantSpec | None = None  # FP8 attention's query scale (per tensor, or per attention head); None: not quantized
    transforms: tuple[TransformSpec, ...] = ()  # folded into the weights before calibration, in this order

    def spec(self, which: Literal["k", "v"]) -> QuantSpec:
        return self.key if which == "k" else self.value

    @property
    def needs_rows(self) -> bool:
        """Whether solving it reads the reservoir of Q/K/V rows (the attention observer, a candidate of loss)."""
        return bool({"attention", "loss"} & {self.key.observer, self.value.observer})

    def to_json(self) -> dict:
        """The recipe as JSON; ``transforms`` and ``percentile`` only when set (recipes without stay as they were)."""
        return self.model_dump(mode="json", exclude_none=True, exclude=None if self.transforms else {"transforms"})

    @classmethod
    def from_json(cls, data: dict) -> KVRecipe:
        return cls.model_validate(data)


def _did_you_mean(loc: tuple) -> str:
    """' (did you mean 'symmetric'?)' for an unknown key close to a known one of the same mapping."""
    fields = TensorOverride.model_fields if len(loc) > 1 and loc[0] in ("keys", "values") else RecipeFile.model_fields
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(err: dict) -> str:
    """One pydantic error as 'field.path: message (got X)'."""
    loc = ".".join(shown(p) if len(str(p)) > SHOWN_CHARS else str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_did_you_mean(err['loc'])}"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    got = err.get("input")
    if err["type"] in ("literal_error", "bool_type") or "got" not in msg:
        return f"{loc}: {msg} (got {shown(got)})" if got is not None and err["type"] != "value_error" else f"{loc}: {msg}"
    return f"{loc}: {msg}"


def parse_recipe(data: object, source: str, default_name: str) -> KVRecipe:
    """Validate recipe data (already parsed from YAML) and resolve it. ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise UsageError(
            f"recipe {source}: expected a mapping of settings, got {type(data).__name__}",
            hint="see docs/recipes.md for the recipe format",
        )
    try:
        raw = RecipeFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise UsageError(
            f"recipe {source}: {problems}",
            hint=f"allowed: format {'|'.join(NUMBER_FORMATS)}, granularity {'|'.join(GRANULARITIES)}, "
            f"observer {'|'.join(observer_names())}, symmetric true|false, optional keys:/values: overrides, "
            f"transforms: {'|'.join(TRANSFORM_NAMES)}",
        ) from exc
    specs = {}
    for which, override in (("keys", raw.keys), ("values", raw.values)):
        try:
            specs[which] = QuantSpec.model_validate(raw._spec(override))
        except ValidationError as exc:
            problems = "; ".join(_describe(e) for e in exc.errors())
            where = which if override is not None else "(top level)"
            raise UsageError(f"recipe {source}: {where}: {problems.removeprefix('(top level): ')}") from exc
    if specs["keys"].format == "nvfp4" and any(isinstance(t, SmoothKeysSpec) and t.search for t in raw.transforms):
        raise UsageError(f"recipe {source}: transforms: smooth-keys search cannot model nvfp4 keys (their block "
                         "scales are chosen at run time)", hint="drop search: true, or quantize keys in another format")
    return KVRecipe(
        name=raw.name or default_name,
        description=raw.description or "",
        key=specs["keys"],
        value=specs["values"],
        query=raw.query.resolved() if raw.query is not None else None,
        transforms=tuple(raw.transforms),
    )


def builtin_recipe_dir() -> Path:
    """Where the built-in recipes are: packaged inside the wheel, or ``recipes/`` of a source checkout."""
    package = Path(__file__).resolve().parent.parent  # kvq/
    packaged = package / "_builtin_recipes"
    return packaged if packaged.is_dir() else package.parent / "recipes"


@cache
def builtin_recipe_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in builtin_recipe_dir().glob("*.yaml")))


def load_recipe(name_or_path: str | Path) -> KVRecipe:
    """A recipe by built-in name (``int8-asym-per-head``) or by YAML path."""
    text_name = str(name_or_path)
    path = Path(text_name)
    if not path.exists():
        if text_name in builtin_recipe_names():
            path = builtin_recipe_dir() / f"{text_name}.yaml"
        elif path.suffix in (".yaml", ".yml") or "/" in text_name:
            raise UsageError(f"recipe file {text_name} does not exist", hint="check the path")
        else:
            raise UsageError(
                f"unknown recipe {text_name!r}",
                hint=f"built-in recipes: {', '.join(builtin_recipe_names())}; or give a YAML file path",
            )
    if path.is_dir():
        raise UsageError(f"recipe {path} is a folder, not a YAML file", hint=RECIPE_HINT)
    data = read_recipe_yaml(path)
    try:
        return parse_recipe(data, str(path), default_name=path.stem)
    except UsageError as exc:
        if path.suffix.lower() in (".yaml", ".yml"):
            raise
        raise UsageError(exc.message, hint=data_file_hint(path)) from exc
