"""kvq: calibrate KV-cache quantization for LLM serving engines.

Data flows one way, and the packages read as that flow: ``cli`` -> ``data`` -> ``capture`` -> ``calibration``
-> ``solve`` (with ``quant``, ``recipe``) -> ``artifacts`` -> ``export`` / ``evaluation`` / ``inspection`` /
``report``; ``model`` loads the model, ``io`` writes every file, ``api`` is the Python API.

The Python API (docs/api.md) is :mod:`kvq.api`, reachable from here: ``kvq.calibrate``, ``kvq.solve``,
``kvq.export_scales``, ``kvq.validate``, ``kvq.evaluate``, ``kvq.inspect``, ``kvq.plan`` and ``kvq.report``.
They are imported on first use by the module-level ``__getattr__`` below (PEP 562), so ``import kvq``
(and ``kvq --help``) does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

API_FUNCTIONS = ("calibrate", "evaluate", "export_scales", "inspect", "plan", "report", "solve", "validate")
__all__ = ["__version__", *API_FUNCTIONS]


def __getattr__(name: str):
    """The API functions of :mod:`kvq.api`, imported when first asked for."""
    if name in API_FUNCTIONS:
        import kvq.api  # the first use pays for torch, not `import kvq`

        return getattr(kvq.api, name)
    raise AttributeError(f"module 'kvq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
