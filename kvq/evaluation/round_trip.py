"""``kvq validate``: the round-trip error of a scales artifact on K/V captured from (held-out) data.

The capture is calibration's (:mod:`kvq.capture`): one prefill per batch through the decoder (no
LM head); :class:`ErrorAccumulator` is its consumer, folding :func:`kvq.kernels.roundtrip_error` of
each layer's real-token K and V, per KV head, into running totals (attention reads the K/V
unchanged). Padding never enters the totals. Samples are
selected exactly as calibration selects them (:func:`kvq.data.select_samples`, seeded).

Per (layer, KV head, K|V) the report gives SQNR (``10 log10(sum x^2 / sum (x - x_hat)^2)``),
RMSE, max |error| and the share of values the saturating clamp changed. "Worst" means lowest SQNR:
a scale-free measure, so heads with small and large values compare fairly; ties (e.g. several
heads with no error at all, SQNR +inf) go by clip rate, then layer, head, K before V.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq.artifacts.scales import KVScales, LayerScales, scales_path
from kvq.capture import CapturedKV, CapturedQuery, capture_batches
from kvq.data import Batch, LoadedDataset, batches, load_documents, select_samples
from kvq.data.data_spec import DataSpec
from kvq.errors import KvqError, UsageError
from kvq.evaluation.preflight import check_scales_match, same_data_warning
from kvq.kernels import RoundTripError, roundtrip_error
from kvq.model.loading import check_seqlen, check_spec, load_spec
from kvq.model.model_spec import LoadedModel, ModelInfo, ModelSpec
from kvq.progress import Progress, counter
from kvq.transforms.record import fold_recorded


@dataclass
class LayerError:
    k: RoundTripError
    v: RoundTripError

    def tensor(self, which: str) -> RoundTripError:
        return self.k if which == "k" else self.v


class ErrorAccumulator:
    """The capture consumer that folds the round-trip error of every layer's K and V into ``errors``."""

    wants_queries = False

    def __init__(self, scales: KVScales):
        self.scales = scales
        self.errors: dict[int, LayerError] = {}
        self._layers: dict[tuple[torch.device, int], LayerScales] = {}

    def _scales(self, layer_idx: int, device: torch.device) -> LayerScales:
        key = (device, layer_idx)
        if key not in self._layers:
            layer = self.scales.layers.get(layer_idx)
            if layer is None:
                raise KvqError(f"the model wrote K/V of layer {layer_idx}, which the scales do not have")
            self._layers[key] = layer.to(device)
        return self._layers[key]

    def kv(self, captured: CapturedKV) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._scales(captured.layer_idx, captured.key.device)
        recipe = self.scales.recipe
        found = {
            which: roundtrip_error(real, layer.scale(which), layer.zero_point(which), recipe.spec(which).format)
            for which, real in (("k", captured.real_key), ("v", captured.real_value))
        }
        done = self.errors.get(captured.layer_idx)
        self.errors[captured.layer_idx] = (LayerError(found["k"], found["v"]) if done is None
                                           else LayerError(done.k.merge(found["k"]), done.v.merge(found["v"])))
        return captured.key, captured.value

    def query(self, captured: CapturedQuery) -> None:  # wants_queries is False: never called
        return None


@dataclass(frozen=True)
class HeadError:
    """The round-trip error of one (layer, KV head) of K or V."""

    layer: int
    kv_head: int
    tensor: str  # "k" | "v"
    sqnr_db: float  # +inf when the error is exactly 0
    mse: float
    max_abs_err: float
    clip_rate: float
    clipped: int
    count: int

    @property
    def rmse(self) -> float:
        return math.sqrt(self.mse)

    def sort_key(self) -> tuple:
        return (self.sqnr_db, -self.clip_rate, self.layer, self.kv_head, self.tensor)


def head_errors(errors: dict[int, LayerError]) -> list[HeadError]:
    """One :class:`HeadError` per (layer, KV head, K|V), worst (lowest SQNR) first."""
    rows = []
    for i in sorted(errors):
        for which in ("k", "v"):
            e = errors[i].tensor(which)
            sqnr, mse, clip = e.sqnr_db.tolist(), e.mse.tolist(), e.clip_rate.tolist()
            max_err, clipped, count = e.max_abs_err.tolist(), e.clipped.tolist(), e.count.tolist()
            for h in range(e.num_kv_heads):
                rows.append(HeadError(i, h, which, float(sqnr[h]), float(mse[h]), float(max_err[h]),
                                      float(clip[h]), int(clipped[h]), int(count[h])))
    return sorted(rows, key=HeadError.sort_key)


def total_error(parts: list[RoundTripError]) -> dict[str, float]:
    """SQNR, MSE, max |error| and clip rate of several heads/layers pooled together."""
    sse = sum(float(p.sse.sum()) for p in parts)
    signal = sum(float(p.signal.sum()) for p in parts)
    count = sum(int(p.count.sum()) for p in parts)
    clipped = sum(int(p.clipped.sum()) for p in parts)
    return {
        "sqnr_db": math.inf if sse == 0 else 10.0 * math.log10(signal / sse) if signal > 0 else -math.inf,
        "mse": sse / count if count else math.nan,
        "max_abs_err": max((float(p.max_abs_err.max()) for p in parts), default=0.0),
        "clip_rate": clipped / count if count else math.nan,
        "count": count,
    }


@dataclass
class ValidateConfig:
    """The model, the held-out data and its sample selection (as a calibration selects), and the scales."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    scales: str = ""
    samples: int = 32
    seqlen: int = 2048
    batch_size: int = 1
    seed: int = 0


@dataclass
class ValidationResult:
    scales_path: Path
    scales: KVScales
    info: ModelInfo
    dataset: LoadedDataset
    samples: int
    tokens: int
    errors: dict[int, LayerError]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def heads(self) -> list[HeadError]:
        return head_errors(self.errors)

    def layer_totals(self, which: str) -> dict[int, dict[str, float]]:
        return {i: total_error([self.errors[i].tensor(which)]) for i in sorted(self.errors)}

    def overall(self, which: str) -> dict[str, float]:
        return total_error([self.errors[i].tensor(which) for i in sorted(self.errors)])


def collect_errors(
    model: torch.nn.Module, scales: KVScales, batch_iter, on_batch: Callable[[Batch], None] | None = None
) -> dict[int, LayerError]:
    """Run the decoder over every batch, folding the round-trip error of every layer's K/V."""
    accumulator = ErrorAccumulator(scales)
    capture_batches(model, batch_iter, accumulator, on_batch)
    return accumulator.errors


def run_validation(cfg: ValidateConfig, progress: Progress | None = None, loaded: LoadedModel | None = None
             ) -> ValidationResult:
    """Measure the round-trip error of ``cfg.scales`` on ``cfg.model`` (or the ``loaded`` model) over
    ``cfg.data``; ``progress(done, total)`` counts samples (:mod:`kvq.progress`)."""
    check_spec(cfg.model)  # before any data or model is loaded
    scales = KVScales.load(cfg.scales)  # a missing or bad artifact fails before the model loads
    if scales.recipe.transforms and loaded is not None:
        raise UsageError(f"the scales {cfg.scales} were calibrated with transforms, which validating folds into "
                         "the model's weights: that would change the model object passed in",
                         hint="pass the model by its path or id, which kvq loads itself")
    dataset = load_documents(cfg.data.dataset, cfg.data.data_files, purpose="evaluation")
    loaded = load_spec(cfg.model) if loaded is None else loaded
    check_seqlen(loaded.model.config, cfg.seqlen)
    warnings = check_scales_match(scales, loaded.info, str(cfg.scales))
    fold_recorded(loaded.model, scales.recipe.transforms, scales.metadata, scales_path(cfg.scales))
    same = same_data_warning(scales.metadata, dataset, str(cfg.scales))
    if same:
        warnings.append(same)
    tok = loaded.tokenizer
    picked = select_samples(dataset.documents, tok, cfg.samples, cfg.seqlen, cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    advance = counter(progress, len(picked.token_ids))
    start = time.perf_counter()
    errors = collect_errors(loaded.model, scales, batches(picked.token_ids, cfg.batch_size, pad_id),
                            None if advance is None else lambda batch: advance(batch.num_samples))
    seconds = time.perf_counter() - start
    missing = [i for i in loaded.info.kv_layers if i not in errors]
    if missing:
        raise KvqError(
            f"{len(missing)} of {len(loaded.info.kv_layers)} attention layers never wrote K/V "
            f"(layers {', '.join(map(str, missing[:8]))})",
            hint="the model must write its KV cache through transformers' Cache.update",
        )
    for i in sorted(errors):
        for which in ("k", "v"):
            e = errors[i].tensor(which)
            if not (torch.isfinite(e.sse).all() and torch.isfinite(e.signal).all()):
                raise KvqError(f"layer {i}: {which.upper()} holds NaN or inf",
                               hint="the model overflows in this dtype: try --dtype float32 or bfloat16")
    return ValidationResult(
        scales_path=scales_path(cfg.scales),
        scales=scales,
        info=loaded.info,
        dataset=dataset,
        samples=len(picked.token_ids),
        tokens=picked.total_tokens,
        errors=errors,
        warnings=warnings,
        seconds=seconds,
    )
