"""typer building blocks of the ``kvq`` commands: the shared model flags, choices known only
once a library module is imported, help texts naming them, and ``--data-files A B C``.

The names of datasets, export formats and eval-only recipes live in modules that import torch. They
are looked up when a command's help is shown or its flags are checked, never at ``kvq --help``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand


def option(*names: str, help: str, **kwargs: Any) -> Any:  # noqa: A002 - typer's own keyword
    """A typer option whose help text states its default itself (typer would append it a second time)."""
    return typer.Option(*names, help=help, show_default=False, **kwargs)


def dataset_names() -> str:
    from kvq.data import DATASET_NAMES

    return ", ".join(DATASET_NAMES)


def eval_only_recipe_names() -> str:
    from kvq.evaluation.dynamic import EVAL_ONLY_RECIPE_NAMES

    return ", ".join(EVAL_ONLY_RECIPE_NAMES)


def _one_of(text: str, choices: Sequence[str]) -> str:
    if text not in choices:
        raise ValueError(f"{text!r} is not one of {', '.join(map(repr, choices))}")
    return text


# typer takes choices as a Literal or an Enum, both spelled out where the command is defined; these
# names live in modules that import torch, so the check runs as a typer parser when the flag is used.
def parse_export_format(text: str) -> str:
    """A ``--format`` value: one of kvq.export.EXPORT_FORMATS."""
    from kvq.export import EXPORT_FORMATS

    return _one_of(text, EXPORT_FORMATS)


def parse_dtype(text: str) -> str:
    """A ``--dtype`` value: a key of kvq.model.loading.DTYPES."""
    from kvq.model.loading import DTYPES

    return _one_of(text, tuple(DTYPES))


def parse_reduction(text: str) -> str:
    """A ``--reduce`` value: one of kvq.export.REDUCTIONS."""
    from kvq.export import REDUCTIONS

    return _one_of(text, REDUCTIONS)


# Placeholders a help text may hold, filled in when that help is shown.
HELP_NAMES: dict[str, Callable[[], str]] = {"datasets": dataset_names, "eval_recipes": eval_only_recipe_names}

# Flags that take several values after one flag (``--data-files A B C``), as well as the flag repeated.
SPREAD_FLAGS = ("--data-files",)


def spread_values(args: list[str], flags: Sequence[str] = SPREAD_FLAGS) -> list[str]:
    """``--data-files A B --x`` -> ``--data-files A --data-files B --x``: what argparse's nargs="+"
    accepted, in the repeated-flag form typer parses (an option takes a fixed number of values)."""
    out: list[str] = []
    current: str | None = None  # the spread flag whose values are being read
    taken = 0
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if current is not None and not arg.startswith("-"):
            out += [arg] if taken == 0 else [current, arg]
            taken += 1
            continue
        current, taken = (arg, 0) if arg in flags else (None, 0)
        out.append(arg)
    return out


class KvqCommand(TyperCommand):
    """A typer command that spreads ``--data-files A B C`` and fills the help placeholders when shown."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_values(list(args)))

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        for param in self.params:
            text = getattr(param, "help", None)
            if text and "{" in text:
                param.help = text.format(**{k: v() for k, v in HELP_NAMES.items() if "{" + k + "}" in text})
        super().format_help(ctx, formatter)


# --- the flags of every command that runs the model ---------------------------------------------

Model = Annotated[str | None, option("--model", help="HF checkpoint folder, .gguf file or hub id "
                                     "(default: the embedded SmolLM2-135M-Instruct)")]
Seed = Annotated[int, option("--seed", help="seed of the sample selection (default 0)")]


@dataclass(frozen=True)
class ModelFlags:
    """--model, --device, --dtype, --trust-remote-code and --data-files, as one value."""

    model: str | None
    device: str | None
    dtype: str | None
    trust_remote_code: bool
    data_files: list[str] | None
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None

    def placement(self) -> dict:
        """The model's placement flags, as the run configs take them."""
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}

    def check_device(self) -> None:
        """Refuse a device that does not exist or is not available, before any data or model is loaded."""
        from kvq.model.loading import check_device

        check_device(self.device)


def _model_flags(
    model: Model = None,
    device: Annotated[str | None, option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
                      ] = None,
    dtype: Annotated[str | None, option("--dtype", parser=parse_dtype, metavar="DTYPE",
                                        help="float32, bfloat16, float16 (default: the model's own)")] = None,
    trust_remote_code: Annotated[bool, option("--trust-remote-code", help="allow the model's own code from the hub")
                                 ] = False,
    device_map: Annotated[str | None, option(
        "--device-map", metavar="MAP", help="auto, balanced or sequential: spread a model larger than one device "
        "over the GPUs and CPU (accelerate); --device is then not used")] = None,
    max_memory: Annotated[str | None, option(
        "--max-memory", metavar="LIMITS", help="memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    ] = None,
    offload_folder: Annotated[str | None, option(
        "--offload-folder", metavar="DIR", help="with --device-map: offload to this folder what --max-memory "
        "does not hold")] = None,
    data_files: Annotated[list[Path] | None, option(
        "--data-files", metavar="FILE", exists=True,
        help="local jsonl/json/txt/parquet files holding the dataset (offline)")] = None,
) -> ModelFlags:
    return ModelFlags(model, device, dtype, trust_remote_code, paths_arg(data_files), device_map, max_memory,
                      offload_folder)


def with_model_flags(command: Callable[..., int]) -> Callable[..., int]:
    """Give a command the flags of :func:`_model_flags`, passed to it as one ``flags: ModelFlags``.

    typer reads a command's flags from its signature and has no shared groups of flags; this writes
    the shared ones into the signature typer sees (``__signature__``), once for every command.
    """
    shared = list(inspect.signature(_model_flags, eval_str=True).parameters.values())
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
    required = [p for p in own if p.default is inspect.Parameter.empty]
    optional = [p for p in own if p.default is not inspect.Parameter.empty]

    @functools.wraps(command)
    def run(**kwargs):
        flags = _model_flags(**{p.name: kwargs.pop(p.name) for p in shared})
        return command(flags=flags, **kwargs)

    run.__signature__ = inspect.Signature([*required, *shared, *optional])  # type: ignore[attr-defined]
    return run


def input_path(metavar: str, help: str) -> Any:  # noqa: A002
    """A positional argument naming a file or folder that must exist."""
    return typer.Argument(metavar=metavar, help=help, exists=True, show_default=False)


def positive(*names: str, help: str) -> Any:  # noqa: A002
    """An integer option of at least 1."""
    return option(*names, help=help, min=1)


def paths_arg(values: list[Path] | None) -> list[str] | None:
    """The paths as the user wrote them (typer gives Path objects), None for none."""
    return [str(v) for v in values] if values else None
