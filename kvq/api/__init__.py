"""kvq's Python API: the functions the ``kvq`` commands are a thin layer over (docs/api.md).

    import kvq
    result = kvq.calibrate("path/to/model", dataset="pydoc", recipe="fp8-e4m3-per-tensor", samples=64)
    int8 = kvq.solve(result.stats, "int8-asym-per-head")

``kvq.calibrate``, ``kvq.solve``, ``kvq.export_scales``, ``kvq.validate``, ``kvq.evaluate``, ``kvq.plan``,
``kvq.inspect`` and ``kvq.report`` are these
functions (``kvq/__init__.py`` imports them on first use, so ``import kvq`` stays cheap). Every function
that runs a model takes a model path or id, or a transformers model already loaded, and one progress
callback convention: ``progress(done, total)`` (:mod:`kvq.progress`).
"""

from kvq.api.calibrate_api import calibrate
from kvq.api.evaluate_api import evaluate, validate
from kvq.api.inspect_api import inspect
from kvq.api.plan_api import plan
from kvq.api.report_api import report
from kvq.api.solve_api import export_scales, solve
from kvq.progress import Progress

__all__ = ["Progress", "calibrate", "evaluate", "export_scales", "inspect", "plan", "report", "solve", "validate"]
