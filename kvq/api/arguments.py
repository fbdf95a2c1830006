"""Checks and conversions of the Python API's arguments, shared by its functions (the CLI's typer flags
check the same things before they reach the API)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvq.errors import UsageError
from kvq.recipe.schema import KVRecipe, load_recipe


def recipe_arg(recipe: KVRecipe | str | Path) -> tuple[KVRecipe, list[Path]]:
    """(the recipe, [its YAML file] when it names one): an output never replaces the recipe file it reads."""
    if isinstance(recipe, KVRecipe):
        return recipe, []
    return load_recipe(recipe), [Path(recipe)] if Path(recipe).is_file() else []


def check_positive(**values: int | None) -> None:
    """Refuse a count below 1 (None: not given)."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{name}={value!r} must be a whole number of at least 1")


def check_choice(name: str, value: str | None, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        raise UsageError(f"{name}={value!r} is not one of {', '.join(choices)}")


def path_list(paths: Sequence[str | Path] | str | Path | None) -> list[str]:
    """One path or several, as the configs hold them."""
    if paths is None:
        return []
    return [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
