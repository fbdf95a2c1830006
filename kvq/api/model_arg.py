"""The ``model`` argument of the Python API: a path or id kvq loads, or a model the caller already loaded.

A loaded model is any transformers causal LM (``torch.nn.Module`` with a ``config``), placed as the
caller placed it: one device, or spread by an accelerate device map (the capture sends the token ids
where the input embedding runs, :func:`kvq.capture.input_device`). kvq does not move, cast or keep
it; for the run it is put in eval mode and its own mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import torch

from kvq.errors import UsageError, first_line
from kvq.model.loading import model_info
from kvq.model.model_spec import LoadedModel

ModelArg = str | Path | torch.nn.Module | LoadedModel | None  # None: the default model (SmolLM2-135M-Instruct)


class Loading(TypedDict, total=False):
    """How kvq loads a model path or id: the CLI's flags of the same names (``**loading`` of the API functions)."""

    device: str | None  # cpu, cuda, cuda:1, mps (default: cuda if available)
    dtype: str | None  # float32, bfloat16, float16 (default: the model's own)
    trust_remote_code: bool
    device_map: str | None  # auto / balanced / balanced_low_0 / sequential (accelerate)
    max_memory: str | None  # per device, e.g. "0=70GiB,cpu=200GiB"
    offload_folder: str | None  # disk offload for what does not fit


def is_model_object(model: ModelArg) -> bool:
    return isinstance(model, (torch.nn.Module, LoadedModel))


def model_name(model: ModelArg, tokenizer: object | None) -> str | None:
    """The ``--model`` a path or id stands for (None: the default model)."""
    if tokenizer is not None:
        raise UsageError("a tokenizer goes with a loaded model object; a model path or id brings its own",
                         hint="pass tokenizer=None, or load the model yourself and pass the model object")
    if model is not None and not isinstance(model, (str, Path)):
        raise UsageError(f"model must be a path, a hub id or a loaded transformers model, not {type(model).__name__}")
    return None if model is None else str(model)


def wrap_model(model: torch.nn.Module | LoadedModel, tokenizer: object | None, loading: Loading) -> LoadedModel:
    """``model`` (and its tokenizer) as kvq's :class:`LoadedModel`; ``loading`` holds the loading options
    (device, dtype, ...), which a loaded model cannot take."""
    given = sorted(name for name, value in loading.items() if value not in (None, False))
    if given:
        raise UsageError(f"{', '.join(given)} choose how kvq loads a model, but the model passed is loaded already",
                         hint="place and cast the model yourself, or pass its path or id")
    if isinstance(model, LoadedModel):
        return model if tokenizer is None else LoadedModel(model.model, tokenizer, model.info)
    config = getattr(model, "config", None)
    if config is None:
        raise UsageError(f"model {type(model).__name__} has no config: kvq takes transformers causal LMs",
                         hint="pass an AutoModelForCausalLM (or its path or id)")
    name = str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or config.model_type)
    if tokenizer is None:
        tokenizer = _tokenizer_of(name)
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(name, config))


def _tokenizer_of(name: str) -> object:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UsageError(f"the model passed names no tokenizer kvq can load ({name!r}: {first_line(exc)})",
                         hint="pass tokenizer= with the model") from exc


def resolve(model: ModelArg, tokenizer: object | None, loading: Loading) -> tuple[str | None, LoadedModel | None]:
    """(the --model name to load, None) for a path or id; (None, the model as a LoadedModel) for a model object."""
    unknown = sorted(set(loading) - set(Loading.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    if is_model_object(model):
        return None, wrap_model(model, tokenizer, loading)
    return model_name(model, tokenizer), None


def read_paths(loaded: LoadedModel | None) -> list[Path]:
    """The loaded model's checkpoint folder, when it names one here (an output never replaces it)."""
    folder = Path(loaded.info.model_id) if loaded is not None else None
    return [folder] if folder is not None and folder.exists() else []


@contextmanager
def eval_mode(loaded: LoadedModel | None) -> Iterator[None]:
    """Run with ``loaded.model`` in eval mode (no dropout), restoring its own mode after; nothing for None."""
    training = loaded.model.training if loaded is not None else False
    if loaded is not None:
        loaded.model.eval()
    try:
        yield
    finally:
        if loaded is not None:
            loaded.model.train(training)
