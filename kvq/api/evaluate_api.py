"""``kvq.validate`` and ``kvq.evaluate``: what scales cost, as round-trip error and as perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvq.api.arguments import check_positive, path_list
from kvq.api.model_arg import Loading, ModelArg, eval_mode, resolve
from kvq.data.data_spec import DataSpec
from kvq.evaluation.perplexity import EvalConfig, EvalResult, run_eval
from kvq.evaluation.round_trip import ValidateConfig, ValidationResult, run_validation
from kvq.model.model_spec import ModelSpec
from kvq.progress import Progress

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


def validate(
    scales: str | Path,
    model: ModelArg = None,
    tokenizer: object | None = None,
    *,
    dataset: str,
    data_files: Sequence[str | Path] | str | Path | None = None,
    samples: int = 32,
    seqlen: int = 2048,
    batch_size: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
    **loading: Unpack[Loading],
) -> ValidationResult:
    """The quantize -> dequantize error of ``scales`` on K/V captured from ``model`` (what ``kvq validate`` does).

    Args:
        scales: a ``scales.safetensors`` file or the artifact folder holding it (a path: the artifact's
            transforms record and plan are read beside it).
        model, tokenizer: as in :func:`kvq.calibrate`: a path or id (None: SmolLM2-135M-Instruct) loaded with
            ``**loading`` (``device``, ``dtype``, ...), or a loaded transformers model object and its tokenizer (not
            for scales calibrated with transforms, which would be folded into its weights).
        dataset: ideally held-out text (named sets load their evaluation split); ``data_files``, ``samples``
            (>= 1), ``seqlen``, ``batch_size`` and ``seed`` select samples exactly as calibration does.
        progress: ``progress(done, total)`` in samples (:mod:`kvq.progress`).

    Returns:
        :class:`kvq.evaluate.ValidationResult`: ``errors`` per layer (K and V
        :class:`kvq.kernels.RoundTripError`, per KV head: float64 tensors of shape (num_kv_heads,) of summed
        squared error and signal in squared K/V units, max |error| in K/V units, clipped and total value
        counts); ``heads()`` one :class:`~kvq.evaluate.HeadError` per (layer, KV head, K|V), worst (lowest
        SQNR in dB) first; ``overall("k")`` / ``layer_totals("v")`` pooled SQNR (dB), MSE, max |error| and
        clip rate (share of values, 0..1); ``warnings`` (e.g. validating on the calibration data).
        ``kvq.evaluation.results_json.validation_json(result)`` is the JSON report the CLI writes.
    """
    check_positive(samples=samples, seqlen=seqlen, batch_size=batch_size)
    name, loaded = resolve(model, tokenizer, loading)
    cfg = ValidateConfig(scales=str(scales), model=ModelSpec(name, **loading), data=DataSpec(dataset, path_list(data_files) or None),
                         samples=samples, seqlen=seqlen, batch_size=batch_size, seed=seed)
    with eval_mode(loaded):
        return run_validation(cfg, progress, loaded)


def evaluate(
    model: ModelArg = None,
    tokenizer: object | None = None,
    *,
    scales: Sequence[str | Path] | str | Path | None = None,
    recipes: Sequence[str] | str | None = None,
    plans: Sequence[str | Path] | str | Path | None = None,
    dataset: str = "wikitext2",
    data_files: Sequence[str | Path] | str | Path | None = None,
    samples: int | None = None,
    seqlen: int = 2048,
    batch_size: int = 1,
    attention_error: bool = True,
    fp8_fallback: bool = True,
    generate: int | None = None,
    generate_prompts: int = 8,
    progress: Progress | None = None,
    **loading: Unpack[Loading],
) -> EvalResult:
    """Perplexity with the KV cache fake-quantized at the cache write, next to the unquantized baseline (what
    ``kvq eval`` does; method in docs/evaluate.md).

    Args:
        model, tokenizer: as in :func:`kvq.calibrate` (a model object is not for scales with transforms).
        scales: artifact folders or ``scales.safetensors`` files (paths), compared side by side; each fp8 one
            is followed by the fp8 scale = 1.0 row unless ``fp8_fallback`` is False.
        recipes: eval-only recipe names (run-time dynamic modes, ``kvq.evaluate.EVAL_ONLY_RECIPE_NAMES``).
        plans: ``plan.json`` files of ``kvq plan`` (or the folders holding them): their layers stay unquantized.
        dataset, data_files: the evaluation text (named sets load their evaluation split).
        samples: number of windows (>= 1; None: every full window); ``seqlen`` tokens per window (>= 2);
            ``batch_size`` windows per forward pass.
        attention_error: also measure each layer's attention-output error (one attention re-run per layer).
        generate: also generate this many tokens greedily from the first ``generate_prompts`` windows (cut to
            ``seqlen - generate`` tokens) per row: ``result.generation`` (:mod:`kvq.evaluation.generation`) holds
            the share of tokens equal to the unquantized model's and where the first differs.
        progress: ``progress(done, total)`` in windows (:mod:`kvq.progress`).

    Returns:
        :class:`kvq.evaluate.EvalResult`: ``measurement.baseline`` and ``measurement.entries`` (one per
        quantizer: ``ppl``, ``mean_nll`` in nats per token, ``window_nll`` summed nats per window,
        ``attention_error`` per layer as relative L2 error of the attention output), ``measurement.
        delta_stderr(entry)`` (paired standard error of the per-token NLL change, nats), ``windows.input_ids``
        (long tensor of shape (windows, seqlen)), ``info``, ``warnings``.
        ``kvq.evaluation.results_json.eval_json(result)`` is the JSON table the CLI writes.
    """
    check_positive(samples=samples, seqlen=seqlen, batch_size=batch_size, generate=generate,
                   generate_prompts=generate_prompts)
    name, loaded = resolve(model, tokenizer, loading)
    names = [recipes] if isinstance(recipes, str) else list(recipes or [])
    cfg = EvalConfig(model=ModelSpec(name, **loading), data=DataSpec(dataset, path_list(data_files) or None), scales=path_list(scales),
                     recipes=names, plans=path_list(plans), samples=samples, seqlen=seqlen, batch_size=batch_size,
                     attention_error=attention_error, fp8_fallback=fp8_fallback, generate=generate,
                     generate_prompts=generate_prompts)
    with eval_mode(loaded):
        return run_eval(cfg, progress, loaded)
