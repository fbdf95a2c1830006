"""What a recipe costs before deploying it: round-trip error (``kvq validate``) and perplexity (``kvq eval``)."""

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
from kvq.evaluate.quant_cache import IdentityQuantizer, KVQuantizer, KVShape, QuantCache, StaticQuantizer
from kvq.evaluate.validate import ErrorCache, HeadError, ValidateConfig, ValidationResult, validate

__all__ = [
    "DYNAMIC_RECIPES",
    "EVAL_ONLY_RECIPE_NAMES",
    "AttentionErrorProbe",
    "DynamicQuantizer",
    "DynamicRecipe",
    "ErrorCache",
    "EvalConfig",
    "EvalResult",
    "EvalWindows",
    "HeadError",
    "IdentityQuantizer",
    "KVQuantizer",
    "KVShape",
    "QuantCache",
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
