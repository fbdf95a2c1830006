"""Perplexity with a fake-quantized KV cache, next to the unquantized baseline.

Method:

* Text: the evaluation documents in their file order, each encoded as the tokenizer encodes it
  (:func:`kvq.data.encode_document`), concatenated into one token stream with the tokenizer's EOS
  token between documents. WikiText-2 (one long document) is simply its own token stream.
* Windows: consecutive, non-overlapping windows of ``seqlen`` tokens from the start of the stream;
  the incomplete tail is dropped; ``max_windows`` (``--samples``) keeps only the first ones. Each
  window is one forward pass with no context from earlier windows (the GPTQ / AutoRound
  convention), so no padding is ever needed.
* Loss: the model's own forward with its LM head; the logits of positions 0..seqlen-2 predict
  tokens 1..seqlen-1 (cross entropy in float32). ``ppl = exp(total NLL / predicted tokens)``: each
  window contributes ``seqlen - 1`` predictions.
* The baseline goes through the same capture path (:mod:`kvq.capture`) with no quantizer, which
  computes bit for bit what the plain forward without a cache computes (a test checks this), and
  the attention-output error probe is its consumer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kvq.artifacts.layer_plan import check_plan_model, read_plan
from kvq.artifacts.scales import KVScales, scales_path
from kvq.capture import CaptureCache, Consumer, forward, input_device
from kvq.data import Document, LoadedDataset, encode_document, load_documents
from kvq.data.data_spec import DataSpec
from kvq.errors import KvqError, UsageError
from kvq.evaluation.attention_error import AttentionErrorProbe
from kvq.evaluation.dynamic import UnitScaleQuantizer, eval_only_quantizer
from kvq.evaluation.generation import DEFAULT_PROMPTS, Generation, check_generate, generation_agreement
from kvq.evaluation.preflight import check_scales_match, same_data_warning
from kvq.evaluation.quant_cache import (
    FakeQuantize,
    IdentityQuantizer,
    KVQuantizer,
    PartialQuantizer,
    StaticQuantizer,
)
from kvq.model.loading import check_seqlen, check_spec, load_spec
from kvq.model.model_spec import KVShape, LoadedModel, ModelInfo, ModelSpec
from kvq.progress import Progress, counter
from kvq.transforms.record import fold_recorded


@dataclass
class EvalWindows:
    input_ids: torch.Tensor  # (windows, seqlen) long
    documents_used: int

    @property
    def num_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def predicted_tokens(self) -> int:
        return self.num_windows * (self.seqlen - 1)


def eval_windows(documents: Sequence[Document], tokenizer, seqlen: int, max_windows: int | None) -> EvalWindows:
    """Cut the documents' token stream into windows (see the module docstring)."""
    if seqlen < 2:
        raise KvqError(f"--seqlen {seqlen} leaves no token to predict", hint="use --seqlen 2 or more")
    from transformers.utils import logging as hf_logging

    need = None if max_windows is None else max_windows * seqlen
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    used = 0
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model maximum": we cut it ourselves
    try:
        for doc in documents:
            if doc.is_empty:
                continue
            if stream and eos is not None:
                stream.append(int(eos))
            stream.extend(encode_document(doc, tokenizer))
            used += 1
            if need is not None and len(stream) >= need:
                break
    finally:
        hf_logging.set_verbosity(level)
    count = len(stream) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise KvqError(
            f"the evaluation text holds {len(stream)} tokens, fewer than one window of --seqlen {seqlen}",
            hint="lower --seqlen or give more evaluation text",
        )
    ids = torch.tensor(stream[: count * seqlen], dtype=torch.long).view(count, seqlen)  # (count*seqlen,) -> (windows, seqlen)
    return EvalWindows(ids, used)


def window_nlls(model: torch.nn.Module, input_ids: torch.Tensor, consumer: Consumer | None) -> list[float]:
    """Per row of ``input_ids`` (batch, seqlen): the summed NLL (nats) of tokens 1.. given the ones before.

    ``consumer`` gets every layer's K/V through the capture and says what attention reads (e.g.
    :class:`~kvq.evaluation.quant_cache.FakeQuantize`); None runs the plain forward (no cache at all).
    """
    if consumer is None:
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = forward(model, input_ids, CaptureCache(consumer, config=model.config))
    logits = out.logits  # (batch, seqlen, vocab)
    batch, seqlen, vocab = logits.shape
    pred = logits[:, :-1, :].float().reshape(-1, vocab)  # (batch, seqlen-1, vocab) -> (batch*(seqlen-1), vocab)
    target = input_ids[:, 1:].reshape(-1)  # (batch, seqlen-1) -> (batch*(seqlen-1),)
    nll = F.cross_entropy(pred, target, reduction="none").view(batch, seqlen - 1)  # (batch*(seqlen-1),) -> (batch, seqlen-1)
    return nll.double().sum(dim=1).tolist()


def window_nll(model: torch.nn.Module, input_ids: torch.Tensor, consumer: Consumer | None) -> float:
    """The summed NLL of every row of ``input_ids`` (see :func:`window_nlls`)."""
    return sum(window_nlls(model, input_ids, consumer))


@dataclass
class Measured:
    """What one entry (the baseline or a quantizer) scored over all windows."""

    quantizer: KVQuantizer
    window_nll: list[float] = field(default_factory=list)  # summed NLL of each window, in window order
    tokens_per_window: int = 0
    attention_error: dict[int, float] | None = None  # layer -> relative L2 (None for the baseline)

    @property
    def nll(self) -> float:
        """Summed over every predicted token."""
        return sum(self.window_nll)

    @property
    def tokens(self) -> int:
        return len(self.window_nll) * self.tokens_per_window

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")


def paired_stderr(a: Sequence[float], b: Sequence[float], tokens_per_window: int) -> float:
    """Standard error of the mean per-token NLL difference ``a - b`` across windows.

    ``a`` and ``b`` are the summed NLL of the same windows under two settings. Paired: every window
    is scored by both, so text difficulty cancels and what is left is how much the difference varies
    from window to window; ``exp(difference +- stderr)`` brackets the ppl ratio. NaN with fewer than
    2 windows.
    """
    d = [(x - y) / tokens_per_window for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return float("nan")
    mean = sum(d) / len(d)
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


@dataclass
class Measurement:
    baseline: Measured
    entries: list[Measured]
    unmatched_layers: list[int] = field(default_factory=list)  # layers the attention probe could not find
    seconds: float = 0.0

    def delta_stderr(self, entry: Measured) -> float:
        """Standard error of ``entry``'s mean per-token NLL difference to the baseline (see :func:`paired_stderr`)."""
        return paired_stderr(entry.window_nll, self.baseline.window_nll, entry.tokens_per_window)


def measure(
    model: torch.nn.Module,
    windows: EvalWindows,
    quantizers: Sequence[KVQuantizer],
    batch_size: int = 1,
    attention_error: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Measurement:
    """Perplexity of the baseline and of every quantizer on the same windows, plus attention error.

    Per batch of windows: one unquantized forward (the baseline, with the attention-error probe
    attached), then one forward per quantizer with the quantized cache. ``on_batch`` gets the number
    of windows done in each batch.
    """
    device = input_device(model)
    baseline = Measured(IdentityQuantizer(), tokens_per_window=windows.seqlen - 1)
    entries = [Measured(q, tokens_per_window=windows.seqlen - 1) for q in quantizers]
    probe = AttentionErrorProbe(model, quantizers) if attention_error and quantizers else None
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, windows.num_windows, batch_size):
            ids = windows.input_ids[first : first + batch_size].to(device)  # (batch, seqlen)
            with probe.attached() if probe is not None else nullcontext():
                baseline.window_nll += window_nlls(model, ids, probe if probe is not None else FakeQuantize(None))
            for entry in entries:
                entry.window_nll += window_nlls(model, ids, FakeQuantize(entry.quantizer))
            for name, m in (("baseline", baseline), *((e.quantizer.name, e) for e in entries)):
                if not math.isfinite(m.nll):
                    raise KvqError(f"{name}: the loss is NaN or inf on windows {first}..{first + ids.shape[0] - 1}",
                                   hint="the model overflows in this dtype: try --dtype float32")
            if on_batch is not None:
                on_batch(int(ids.shape[0]))
    if probe is not None:
        for n, entry in enumerate(entries):
            entry.attention_error = probe.relative_errors(n)
    return Measurement(
        baseline=baseline,
        entries=entries,
        unmatched_layers=sorted(probe.unmatched) if probe is not None else [],
        seconds=time.perf_counter() - start,
    )


# --- the `kvq eval` run -------------------------------------------------------------------------


@dataclass
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec("wikitext2"))
    scales: list[str] = field(default_factory=list)  # artifact folders or scales.safetensors files
    recipes: list[str] = field(default_factory=list)  # eval-only recipe names (kvq.evaluation.dynamic)
    samples: int | None = None  # windows; None = every full window of the text
    seqlen: int = 2048
    batch_size: int = 1
    attention_error: bool = True
    fp8_fallback: bool = True  # add scale = 1.0 next to every fp8 artifact
    plans: list[str] = field(default_factory=list)  # plan.json files (or folders holding one): kvq plan
    generate: int | None = None  # new tokens per prompt for generation agreement (kvq.evaluation.generation)
    generate_prompts: int = DEFAULT_PROMPTS


@dataclass
class EvalResult:
    info: ModelInfo
    model_dtype: torch.dtype
    dataset: LoadedDataset
    windows: EvalWindows
    measurement: Measurement
    warnings: list[str]
    generation: Generation | None = None  # --generate: agreement of each row's greedy tokens with the model's

    @property
    def kv_shape(self) -> KVShape:
        return self.info.shape


def static_quantizers(paths: Sequence[str], fp8_fallback: bool, plans: Sequence[str] = ()) -> list[KVQuantizer]:
    """A :class:`StaticQuantizer` per artifact, each fp8 one followed by its scale-1.0 fallback, then a
    :class:`PartialQuantizer` per plan (its artifact's row is added first when ``paths`` lack it)."""
    out: list[KVQuantizer] = []
    by_file: dict[Path, StaticQuantizer] = {}

    def artifact(path: str | Path) -> StaticQuantizer:
        key = scales_path(path).resolve()
        if key not in by_file:
            by_file[key] = StaticQuantizer(KVScales.load(path), source=str(path))
            out.append(by_file[key])
        return by_file[key]

    for path in paths:
        artifact(path)
    read = [read_plan(path) for path in plans]  # each plan after its artifact, so a bad plan fails early
    partial = []
    for plan in read:
        scales = artifact(plan.scales_file)
        check_plan_model(plan, scales.scales.num_layers)  # the scales are checked against the model later
        partial.append(PartialQuantizer(scales, plan.skip_layers))
    if fp8_fallback:
        seen: set[tuple[str, str, bool]] = set()
        for q in list(by_file.values()):
            fmts = (q.recipe.key.format, q.recipe.value.format, q.quantizes_queries)
            if q.recipe.key.is_fp8 and q.recipe.value.is_fp8 and fmts not in seen:
                seen.add(fmts)  # with a query scale: FP8 attention with every scale 1.0, the uncalibrated default
                out.append(UnitScaleQuantizer(*fmts[:2], query=fmts[2]))
    for plan, q in zip(read, partial, strict=True):
        q.source = str(plan.path)
        out.append(q)
    return out


def _one_transform_set(static: Sequence[StaticQuantizer]) -> StaticQuantizer | None:
    """The artifact whose transforms the model must carry (None: no artifact has any); all must agree."""
    keys = {(q.scales.metadata.get("transforms", "[]"), q.scales.metadata.get("weights_hash")) for q in static}
    if len(keys) > 1:
        raise UsageError(
            "the --scales were calibrated on differently transformed models ("
            + "; ".join(f"{q.source}: {q.scales.metadata.get('transforms', '[]')}" for q in static) + ")",
            hint="eval compares scales on one model: run kvq eval once per set of transforms",
        )
    return next((q for q in static if q.recipe.transforms), None)


@dataclass
class Prepared:
    """What a run over evaluation windows starts from: the model (transforms folded), data, windows."""

    loaded: LoadedModel
    dataset: LoadedDataset
    windows: EvalWindows
    warnings: list[str]


def prepare(spec: ModelSpec, data: DataSpec, seqlen: int, samples: int | None,
            static: Sequence[StaticQuantizer], loaded: LoadedModel | None = None) -> Prepared:
    """Load the data and the model (unless ``loaded``), check the artifacts fit it, fold their transforms, cut
    the windows."""
    transformed = _one_transform_set(static)
    if transformed is not None and loaded is not None:
        raise UsageError(f"the scales {transformed.source} were calibrated with transforms, which the evaluation "
                         "folds into the model's weights: that would change the model object passed in",
                         hint="pass the model by its path or id, which kvq loads itself")
    dataset = load_documents(data.dataset, data.data_files, purpose="evaluation")
    loaded = load_spec(spec) if loaded is None else loaded
    check_seqlen(loaded.model.config, seqlen)
    warnings: list[str] = []
    for q in static:
        warnings += check_scales_match(q.scales, loaded.info, q.source)
        same = same_data_warning(q.scales.metadata, dataset, q.source)
        if same:
            warnings.append(same)
    if transformed is not None:
        fold_recorded(loaded.model, transformed.recipe.transforms, transformed.scales.metadata,
                      scales_path(transformed.source))
        warnings.append(f"the model is evaluated with the transforms of {transformed.source} folded into its "
                        "weights (exact: the baseline is the model's own perplexity within float rounding)")
    windows = eval_windows(dataset.documents, loaded.tokenizer, seqlen, samples)
    return Prepared(loaded, dataset, windows, warnings)


def run_eval(cfg: EvalConfig, progress: Progress | None = None, loaded: LoadedModel | None = None) -> EvalResult:
    """Evaluate ``cfg`` on ``cfg.model`` (or the ``loaded`` model), see the module docstring;
    ``progress(done, total)`` counts windows (:mod:`kvq.progress`)."""
    check_spec(cfg.model)  # before any data or model is loaded
    if cfg.generate is not None:
        check_generate(cfg.generate, cfg.seqlen)
    extra = [eval_only_quantizer(name) for name in cfg.recipes]  # bad names fail before anything loads
    quantizers = static_quantizers(cfg.scales, cfg.fp8_fallback, cfg.plans)
    names = {q.name for q in quantizers}
    quantizers += [q for q in extra if q.name not in names]
    static = [q for q in quantizers if isinstance(q, StaticQuantizer)]
    ready = prepare(cfg.model, cfg.data, cfg.seqlen, cfg.samples, static, loaded)
    warnings = ready.warnings
    measurement = measure(ready.loaded.model, ready.windows, quantizers, cfg.batch_size, cfg.attention_error,
                          counter(progress, ready.windows.num_windows))
    if measurement.unmatched_layers:
        shown = ", ".join(map(str, measurement.unmatched_layers[:8]))
        warnings.append(f"attention-output error not measured for layers {shown}: no module with that "
                        "layer_idx was running when the layer wrote its K/V")
    generation = None
    if cfg.generate:
        generation = generation_agreement(ready.loaded.model, ready.windows.input_ids, cfg.generate,
                                          cfg.generate_prompts, quantizers)
        if generation.baseline.share != 1.0:
            warnings.append(f"the baseline's greedy tokens through the capture differ from the plain model's "
                            f"({100 * generation.baseline.share:.2f}% agree): the agreement figures are not exact")
    return EvalResult(ready.loaded.info, next(ready.loaded.model.parameters()).dtype, ready.dataset, ready.windows,
                      measurement, warnings, generation)
