"""Reading a recipe file: bounded size, UTF-8 text, strict YAML (no aliases, no key given twice).

Hand-written where PyYAML has no switch (see :class:`_RecipeLoader`); :mod:`kvq.recipe.schema` validates what this
returns.
"""

from __future__ import annotations

import typing
from pathlib import Path

import yaml

from kvq.errors import UsageError

MAX_RECIPE_BYTES = 64 * 1024  # a recipe is a dozen lines; anything bigger is not a recipe
SHOWN_CHARS = 60  # characters of a bad value quoted back in a message


def shown(value: object) -> str:
    """``repr(value)``, cut to a length a one-line message can hold."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + " ..."


RECIPE_HINT = "--recipe takes a built-in recipe name or a recipe YAML file (docs/recipes.md)"


def data_file_hint(path: Path) -> str:
    return f"is {path.name} a data file? pass data with --data-files; " + RECIPE_HINT


def read_recipe_yaml(path: Path) -> object:
    """The YAML document of a recipe file, read with bounded size and no aliases, duplicate keys refused."""
    hint = RECIPE_HINT if path.suffix.lower() in (".yaml", ".yml") else data_file_hint(path)
    try:
        with open(path, "rb") as fh:  # read at most the cap: a FIFO or /proc file has no size to check first
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"recipe {path} cannot be read: {exc.strerror or exc}", hint=hint) from exc
    if len(raw) > MAX_RECIPE_BYTES:
        raise UsageError(f"recipe {path} is over {MAX_RECIPE_BYTES // 1024} KiB: not a recipe", hint=hint)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"recipe {path} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})",
                         hint=hint) from exc
    if "\x00" in text:
        raise UsageError(f"recipe {path} holds binary data, not YAML text", hint=hint)
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"recipe {path}: not valid YAML{where}: {problem}", hint=hint) from exc
    except RecursionError as exc:
        raise UsageError(f"recipe {path}: nested too deeply to be a recipe", hint=hint) from exc
    if data is None:
        raise UsageError(f"recipe {path} is empty", hint=hint)
    return data


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter: a key given twice is an error (PyYAML keeps the last silently),
    and aliases are refused (a recipe needs none, and "billion laughs" expands them exponentially).

    Hand-written because PyYAML has no switch for either; both hook its documented composer/constructor.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a recipe",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                lines = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice ({lines})", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)
