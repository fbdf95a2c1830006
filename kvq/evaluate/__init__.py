"""What a recipe costs before deploying it: round-trip error (``kvq validate``) and perplexity (``kvq eval``)."""

from kvq.callable_package import make_callable
from kvq.evaluate.attention_error import AttentionErrorProbe
from kvq.evaluate.dynamic import (
    DYNAMIC_RECIPES,
    EVAL_ONLY_RECIPE_NAMES,
    DynamicQuantizer,
    DynamicRecipe,
    UnitScaleQuantizer,
    eval_only_quantizer,
)
from kvq.evaluate.perplexity import (
    EvalConfig,
    EvalResult,
    EvalWindows,
    eval_windows,
    measure,
    run_eval,
    window_nll,
)
from kvq.evaluate.quant_cache import FakeQuantize, IdentityQuantizer, KVQuantizer, KVShape, StaticQuantizer
from kvq.evaluate.validate import ErrorAccumulator, HeadError, ValidateConfig, ValidationResult, validate

__all__ = [
    "DYNAMIC_RECIPES",
    "EVAL_ONLY_RECIPE_NAMES",
    "AttentionErrorProbe",
    "DynamicQuantizer",
    "DynamicRecipe",
    "ErrorAccumulator",
    "EvalConfig",
    "EvalResult",
    "EvalWindows",
    "FakeQuantize",
    "HeadError",
    "IdentityQuantizer",
    "KVQuantizer",
    "KVShape",
    "StaticQuantizer",
    "UnitScaleQuantizer",
    "ValidateConfig",
    "ValidationResult",
    "eval_only_quantizer",
    "eval_windows",
    "measure",
    "run_eval",
    "validate",
    "window_nll",
]

make_callable(__name__)  # kvq.evaluate(...) is kvq.api.evaluate(...)
