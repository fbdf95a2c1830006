"""kvq: calibrate KV-cache quantization for LLM serving engines.

Data flows one way: CLI -> data -> capture -> stats -> solver -> artifact -> export / validate.

The Python API (docs/api.md) is :mod:`kvq.api`, reachable from here: ``kvq.calibrate``, ``kvq.solve``,
``kvq.export_scales``, ``kvq.validate`` and ``kvq.evaluate``. They are imported on first use by the
module-level ``__getattr__`` below (PEP 562), so ``import kvq`` (and ``kvq --help``) does not import
torch. ``kvq.calibrate`` and ``kvq.evaluate`` are also the subpackages of those names, made callable
(:mod:`kvq.callable_package`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["__version__", "calibrate", "evaluate", "export_scales", "solve", "validate"]


def __getattr__(name: str):
    """The API functions, imported when first asked for (``kvq.calibrate`` is then set on this module)."""
    if name in ("calibrate", "evaluate"):  # the callable subpackage: kvq/calibrate, kvq/evaluate
        return importlib.import_module(f"kvq.{name}")
    if name in ("solve", "validate", "export_scales"):
        return getattr(importlib.import_module("kvq.api"), name)
    raise AttributeError(f"module 'kvq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
