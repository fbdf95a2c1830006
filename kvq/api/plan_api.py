"""``kvq.plan``: the layers to keep unquantized for a budget, measured and written into the artifact (docs/plan.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvq.api.arguments import check_choice, check_positive, path_list
from kvq.api.model_arg import Loading, model_name
from kvq.data.data_spec import DataSpec
from kvq.evaluation.plan_run import PlanConfig, PlanResult, run_plan
from kvq.evaluation.sensitivity import SENSITIVITY_MEASURES
from kvq.model.model_spec import ModelSpec
from kvq.progress import Progress

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


def plan(
    scales: str | Path,
    model: str | Path | None = None,
    *,
    dataset: str = "wikitext2",
    data_files: Sequence[str | Path] | str | Path | None = None,
    skip: int | None = None,
    bytes_per_token: float | None = None,
    keep_sliding_window: bool = False,
    by: Literal["attention", "perplexity"] = "attention",
    samples: int = 8,
    seqlen: int = 512,
    batch_size: int = 1,
    force: bool = False,
    progress: Progress | None = None,
    **loading: Unpack[Loading],
) -> PlanResult:
    """Measure each layer's sensitivity to the artifact's scales and keep the most sensitive layers unquantized
    (what ``kvq plan`` does; the command calls this function).

    Args:
        scales: the artifact folder (or its ``scales.safetensors``); ``plan.json`` is written there (``force``:
            into a folder holding files other than a kvq artifact's).
        model: the model path or id the scales were calibrated on (None: the embedded SmolLM2-135M-Instruct).
        dataset, data_files: the evaluation text (named sets load their evaluation split).
        skip: keep this many of the most sensitive layers unquantized; or ``bytes_per_token``: as many as fit
            in this KV-cache budget; or ``keep_sliding_window``: every sliding-window layer of the model (its
            config's ``layer_types``). Exactly one of the three.
        by: ``attention`` (relative attention-output error, one forward) or ``perplexity`` (NLL change with only
            that layer quantized, one forward per layer).
        samples: windows (>= 1); ``seqlen`` tokens per window; ``batch_size`` windows per forward pass.
        **loading: how the model is loaded (:class:`kvq.api.model_arg.Loading`).
        progress: ``progress(done, total)`` in windows (:mod:`kvq.progress`).

    Returns:
        :class:`kvq.evaluation.plan_run.PlanResult`: ``path`` of the plan.json written, ``skip_layers``,
        ``sensitivity`` per layer, ``kv_bytes_per_token``, the ``engines``' flags that apply the plan.
    """
    check_positive(samples=samples, seqlen=seqlen, batch_size=batch_size)
    check_choice("by", by, SENSITIVITY_MEASURES)
    cfg = PlanConfig(model=ModelSpec(model_name(model, None), **loading), scales=str(scales),
                     data=DataSpec(dataset, path_list(data_files) or None), samples=samples, seqlen=seqlen, batch_size=batch_size,
                     by=by, skip=skip, bytes_per_token=bytes_per_token,
                     keep_sliding_window=keep_sliding_window, force=force)
    return run_plan(cfg, progress)
