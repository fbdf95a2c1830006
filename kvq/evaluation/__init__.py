"""What a recipe costs before deploying it: round-trip error (``kvq validate``) and perplexity (``kvq eval``)."""

from kvq.evaluation.attention_error import AttentionErrorProbe
from kvq.evaluation.dynamic import (
    DYNAMIC_RECIPES,
    EVAL_ONLY_RECIPE_NAMES,
    DynamicQuantizer,
    DynamicRecipe,
    UnitScaleQuantizer,
    eval_only_quantizer,
)
from kvq.evaluation.perplexity import (
    EvalConfig,
    EvalResult,
    EvalWindows,
    eval_windows,
    measure,
    run_eval,
    window_nll,
)
from kvq.evaluation.quant_cache import FakeQuantize, IdentityQuantizer, KVQuantizer, StaticQuantizer
from kvq.evaluation.round_trip import (
    ErrorAccumulator,
    HeadError,
    ValidateConfig,
    ValidationResult,
    run_validation,
)
from kvq.model.model_spec import KVShape

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
    "run_validation",
    "window_nll",
]
