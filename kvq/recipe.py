"""Recipes: which number format, symmetry, granularity and observer quantize the KV cache.

A recipe is a YAML file validated by a typed schema. Unknown keys and bad values are rejected with
the file, the field path and the allowed values; combinations that make no sense (fp8 asymmetric)
are rejected, never rewritten.

    format: int8            # fp8_e4m3 | fp8_e5m2 | int8 | int4
    symmetric: false        # fp8 must be symmetric
    granularity: head       # tensor | head | channel
    observer: minmax        # minmax (the only observer today)
    keys:                   # optional: override any of the four for keys ...
      granularity: channel
    values: {}              # ... or for values

Built-in recipes live in ``recipes/`` and are usable by name (``--recipe int8-asym-per-head``).
"""

from __future__ import annotations

import typing
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, model_validator

from kvq.errors import UsageError

Format = Literal["fp8_e4m3", "fp8_e5m2", "int8", "int4"]
Granularity = Literal["tensor", "head", "channel"]
Observer = Literal["minmax"]

FORMATS: tuple[str, ...] = typing.get_args(Format)
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)
OBSERVERS: tuple[str, ...] = typing.get_args(Observer)

DEFAULT_RECIPE = "fp8-e4m3-per-tensor"


class QuantSpec(BaseModel):
    """How one tensor (keys or values) is quantized: the resolved, complete setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Format
    symmetric: StrictBool
    granularity: Granularity
    observer: Observer = "minmax"

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


class TensorOverride(BaseModel):
    """Optional per-tensor settings under ``keys:`` or ``values:``; unset fields inherit the top level."""

    model_config = ConfigDict(extra="forbid")

    format: Format | None = None
    symmetric: StrictBool | None = None
    granularity: Granularity | None = None
    observer: Observer | None = None


class RecipeFile(BaseModel):
    """The YAML file as written."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    format: Format
    symmetric: StrictBool = True
    granularity: Granularity
    observer: Observer = "minmax"
    keys: TensorOverride | None = None
    values: TensorOverride | None = None

    def _spec(self, override: TensorOverride | None) -> dict:
        base = {
            "format": self.format,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "observer": self.observer,
        }
        if override is not None:
            base.update(override.model_dump(exclude_none=True))
        return base


class KVRecipe(BaseModel):
    """A resolved recipe: one complete :class:`QuantSpec` for keys and one for values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    key: QuantSpec
    value: QuantSpec

    def spec(self, which: Literal["k", "v"]) -> QuantSpec:
        return self.key if which == "k" else self.value

    @property
    def asymmetric(self) -> bool:
        return not (self.key.symmetric and self.value.symmetric)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict) -> KVRecipe:
        return cls.model_validate(data)


def _describe(err: dict) -> str:
    """One pydantic error as 'field.path: message (got X)'."""
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    got = err.get("input")
    if err["type"] in ("literal_error", "bool_type") or "got" not in msg:
        return f"{loc}: {msg} (got {got!r})" if got is not None and err["type"] != "value_error" else f"{loc}: {msg}"
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
            hint=f"allowed: format {'|'.join(FORMATS)}, granularity {'|'.join(GRANULARITIES)}, "
            f"observer {'|'.join(OBSERVERS)}, symmetric true|false, optional keys:/values: overrides",
        ) from None
    specs = {}
    for which, override in (("keys", raw.keys), ("values", raw.values)):
        try:
            specs[which] = QuantSpec.model_validate(raw._spec(override))
        except ValidationError as exc:
            problems = "; ".join(_describe(e) for e in exc.errors())
            where = which if override is not None else "(top level)"
            raise UsageError(f"recipe {source}: {where}: {problems.removeprefix('(top level): ')}") from None
    return KVRecipe(
        name=raw.name or default_name,
        description=raw.description or "",
        key=specs["keys"],
        value=specs["values"],
    )


def builtin_recipe_dir() -> Path:
    """Where the built-in recipes are: packaged inside the wheel, or ``recipes/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "_builtin_recipes"
    return packaged if packaged.is_dir() else here.parent / "recipes"


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
        raise UsageError(f"recipe {path} is a directory, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"recipe {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, str(path), default_name=path.stem)
