"""The ``loss`` observer: per layer and per K and V, the candidate range whose fake-quantized cache gives the
model's lowest loss on calibration windows. Runs the model; no files, no printing.

Candidates: the ranges the other observers choose from the same statistics (:data:`CANDIDATES` order:
``minmax``, then ``percentile`` and ``mse`` where the statistics hold histograms fine enough, ``attention``
where they hold Q/K/V rows; ``mse`` never for nvfp4).

Objective: the sum over the calibration windows (one forward each, no padding) of the model's own
``labels=`` loss (mean cross entropy of tokens 1.. given the ones before), attention reading the
fake-quantized K/V through the capture (:class:`kvq.evaluation.quant_cache.FakeQuantize`, the cache the
evaluation applies).

Search, in two steps, every candidate judged in the cache the engine will hold (every layer quantized):

1. The start: all loss tensors at the range of one observer (the same in every layer): all-minmax, and each
   other observer the statistics allow in every layer; the one of least loss among those that beat
   all-minmax significantly (below), else minmax. One full forward per window and uniform candidate.
2. Greedy refinement, layer by layer from the first, K before V: each candidate of layer i's K with the layers
   before i at their choices and the layers after i at the start; a candidate replaces the current choice only
   if it lowers the loss significantly; then V with K at its choice. Each accepted change lowers the loss on
   the calibration windows, so the result's loss there is at most the start's, hence at most all-minmax's.

Significance: with ``d`` a candidate's per-window loss minus the current choice's, ``mean(d) + 2 * stderr(d) <
0`` (stderr over windows; one window: ``d < 0``); among those passing, the least total loss wins (ties keep
the earlier, :data:`CANDIDATES` order). Without it the search picked, for int4 per-channel values on SmolLM2,
clipped ranges that lowered the loss of 4 calibration windows and raised held-out perplexity by ~5%
(docs/quality.md).

Greedy rather than full coordinate descent: the cost is linear in the layers (candidates x 2 forwards per
window and layer, one sweep, after step 1's few), and since the choices of layers before i are fixed, the
output of layer i - 1 is the same for every candidate of layer i: it is recorded once and the layers before i
are skipped (each run computes layers i.. only; :class:`_Prefix`), so a later layer costs less than an earlier
one. Deterministic:
the windows are the calibration's first samples (seeded), candidates are compared in a fixed order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats, LayerStats
from kvq.capture import CaptureCache, decoder_of, forward, input_device
from kvq.errors import KvqError, UsageError
from kvq.evaluation.quant_cache import FakeQuantize
from kvq.kernels import fake_quantize
from kvq.quant.qparams import choose_qparams
from kvq.recipe.schema import KVRecipe, QuantSpec
from kvq.solving.attention import attention_ranges
from kvq.solving.observers import OBSERVERS, counts_at_granularity
from kvq.solving.solver import layer_ranges, rows_of, solve_scales

CANDIDATES: tuple[str, ...] = ("minmax", "percentile", "mse", "attention")
DEFAULT_LOSS_WINDOWS = 4
METADATA_KEY = "loss_observer"  # the choices, as JSON, in the scales' metadata


@dataclass
class LossSearch:
    """What the loss observer chose, and what it cost."""

    windows: int
    candidates: dict[int, tuple[str, ...]]  # layer -> the candidates it was chosen from
    choices: dict[int, dict[str, str]] = field(default_factory=dict)  # layer -> {"k": name, "v": name} (loss ones)
    seconds: float = 0.0
    forwards: int = 0  # forward passes run (each over the layers from the one being chosen)
    candidate_seconds: float = 0.0  # of ``seconds``: computing the other observers' ranges (attention's search)
    start: str = "minmax"  # the observer every loss tensor started from (step 1)

    @property
    def seconds_per_layer(self) -> float:
        return self.seconds / max(1, len(self.choices))

    def to_json(self) -> dict:
        """What the artifact records (no timings: the same seed gives the same bytes)."""
        return {"windows": self.windows, "start": self.start,
                "layers": {str(i): {**self.choices[i], "from": list(self.candidates[i])} for i in sorted(self.choices)}}


def uses_loss(recipe: KVRecipe) -> bool:
    return "loss" in (recipe.key.observer, recipe.value.observer)


def recorded_choices(metadata: dict[str, str]) -> dict | None:
    """The loss observer's record in an artifact's metadata (:meth:`LossSearch.to_json`), or None."""
    text = metadata.get(METADATA_KEY)
    return None if text is None else json.loads(text)


def candidate_ranges(stats: KVStats, i: int, recipe: KVRecipe) -> dict[str, tuple[tuple, tuple]]:
    """Observer name -> ((k_lo, k_hi), (v_lo, v_hi)) for layer i, for every candidate the statistics allow."""
    layer = stats.layers[i]
    out = {}
    for name in CANDIDATES:
        key, value = (spec.model_copy(update={"observer": name}) for spec in (recipe.key, recipe.value))
        if name == "attention":
            if stats.reservoir is None:
                continue
            minmax = OBSERVERS["minmax"](layer.k, key), OBSERVERS["minmax"](layer.v, value)
            out[name] = attention_ranges(layer, rows_of(stats, i), stats.reservoir.scaling.get(i), key, value, *minmax)
        elif _allowed(layer, name, key) and _allowed(layer, name, value):
            out[name] = OBSERVERS[name](layer.k, key), OBSERVERS[name](layer.v, value)
    return out


def _allowed(layer: LayerStats, name: str, spec: QuantSpec) -> bool:
    if name == "minmax":
        return True
    if name == "mse" and spec.format == "nvfp4":
        return False
    ts = layer.k  # K and V are recorded at the same histogram level
    try:
        counts_at_granularity(ts, spec.granularity)
    except UsageError:
        return False
    return True


class _RangeQuantizer:
    """Fake-quantizes the (layer, K or V) pairs it holds qparams for; the rest stay as they are."""

    name = "loss observer"
    kind = "static"
    source = "candidate ranges"
    quantizes_queries = False

    def __init__(self, params: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None, str]]):
        self.params = params

    def quantize(self, x: torch.Tensor, layer_idx: int, which: str) -> torch.Tensor:
        found = self.params.get((layer_idx, which))
        if found is None:
            return x
        scale, zp, fmt = found
        return fake_quantize(x, scale.to(x.device), None if zp is None else zp.to(x.device), fmt)


class _Recorded(torch.nn.Module):
    """Stands in for a decoder layer before the one being chosen: returns the recorded output of the layer
    just before it, whatever it is handed."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class _Prefix:
    """The layers before ``start`` skipped: each window's recorded output of layer ``start - 1`` (under the
    layers' chosen quantization) is what the stand-ins return. No reuse when the decoder has no ``layers``."""

    def __init__(self, model: torch.nn.Module):
        layers = getattr(decoder_of(model), "layers", None)
        self.layers = layers if isinstance(layers, torch.nn.ModuleList) else None
        self.start = 0
        self.outputs: list = []

    def usable(self, i: int | None) -> bool:
        return self.layers is not None and i is not None and 0 <= i < len(self.layers)

    @contextmanager
    def skipped(self, window: int) -> Iterator[None]:
        if self.start == 0:
            yield
            return
        kept = [self.layers[j] for j in range(self.start)]
        stand_in = _Recorded(self.outputs[window])
        for j in range(self.start):
            self.layers[j] = stand_in
        try:
            yield
        finally:
            for j, layer in enumerate(kept):
                self.layers[j] = layer

    @contextmanager
    def recording(self, i: int | None, sink: list) -> Iterator[None]:
        """Appends layer i's output of every run to ``sink``."""
        if not self.usable(i):
            yield
            return
        handle = self.layers[i].register_forward_hook(lambda module, args, out: sink.append(out))
        try:
            yield
        finally:
            handle.remove()


def _loss(model, windows: Sequence[torch.Tensor], quantizer: _RangeQuantizer, prefix: _Prefix,
          record: int | None) -> tuple[list[float], list]:
    """The ``labels=`` loss of each window, and layer ``record``'s output of each window."""
    losses, outputs = [], []
    with prefix.recording(record, outputs):
        for w, ids in enumerate(windows):
            with prefix.skipped(w):
                out = forward(model, ids, CaptureCache(FakeQuantize(quantizer), config=model.config), labels=ids)
            losses.append(float(out.loss))
    return losses, outputs


SIGNIFICANCE = 2.0  # standard errors over windows a candidate must gain on minmax to replace it


def significantly_lower(losses: Sequence[float], reference: Sequence[float]) -> bool:
    """Whether ``losses`` (one per window) are below ``reference`` beyond the windows' noise: the paired
    differences d satisfy mean(d) + SIGNIFICANCE x stderr(d) < 0 (one window: d < 0)."""
    d = [a - b for a, b in zip(losses, reference, strict=True)]
    mean = sum(d) / len(d)
    if len(d) == 1:
        return mean < 0
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean + SIGNIFICANCE * (var / len(d)) ** 0.5 < 0


def _qparams(rng: tuple, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    scale, zp = choose_qparams(*rng, spec)
    return scale, zp, spec.format


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def solve_by_loss(stats: KVStats, recipe: KVRecipe, model: torch.nn.Module,
                  windows: Sequence[Sequence[int]]) -> KVScales:
    """The scales of ``recipe`` whose ``loss`` tensors take the candidate range of least loss (module
    docstring), the record of the search in their metadata (:data:`METADATA_KEY`) and ``loss_search``;
    ``windows`` are token id lists (calibration samples)."""
    if not windows:
        raise KvqError("the loss observer has no calibration windows to run the model on")
    if recipe.query is not None:
        raise UsageError(f"recipe {recipe.name}: observer loss does not model the query scale of FP8 attention",
                         hint="drop the query: section, or use another observer")
    device = input_device(model)
    ids = [torch.tensor(list(w), dtype=torch.long, device=device).unsqueeze(0) for w in windows]  # (1, n) each
    search = LossSearch(windows=len(ids), candidates={})
    prefix = _Prefix(model)
    ranges: dict[int, tuple] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        t0 = time.perf_counter()
        all_cands = {i: candidate_ranges(stats, i, recipe) for i in sorted(stats.layers)}
        search.candidate_seconds += time.perf_counter() - t0
        # Step 1, the start: every loss tensor at one observer's range (the same observer in every layer), the one of
        # least loss among those that beat all-minmax beyond the windows' noise; minmax when none does
        fixed = {i: dict(zip("kv", layer_ranges(stats, i, recipe), strict=True)) for i in sorted(stats.layers)}
        uniform = [name for name in CANDIDATES if all(name in cands for cands in all_cands.values())]
        tried_starts: list[tuple[str, list[float]]] = []
        for name in uniform:
            params = {(i, w): _qparams(all_cands[i][name][n] if recipe.spec(w).observer == "loss" else fixed[i][w],
                                       recipe.spec(w)) for i in fixed for n, w in enumerate("kv")}
            prefix.start = 0
            losses, _ = _loss(model, ids, _RangeQuantizer(params), prefix, None)
            search.forwards += len(ids)
            tried_starts.append((name, losses))
        better = [t for t in tried_starts[1:] if significantly_lower(t[1], tried_starts[0][1])]
        search.start = min(better, key=lambda t: sum(t[1]))[0] if better else "minmax"
        for i in fixed:
            for n, w in enumerate("kv"):
                if recipe.spec(w).observer == "loss":
                    fixed[i][w] = all_cands[i][search.start][n]
        chosen = {(i, w): _qparams(fixed[i][w], recipe.spec(w)) for i in fixed for w in "kv"}
        # Step 2, greedy refinement: layer by layer, K before V, a candidate replaces the current choice only beyond
        # the windows' noise
        for i in sorted(stats.layers):
            cands = all_cands[i]
            search.candidates[i] = tuple(cands)
            search.choices[i] = {}
            reuse = prefix.usable(i)
            prefix.start = i if reuse else 0
            outputs: list = []
            for which in "kv":
                spec = recipe.spec(which)
                if spec.observer != "loss":
                    continue
                tried: list[tuple[str, tuple, list[float], list]] = []
                for name, pair in cands.items():
                    rng = pair[0] if which == "k" else pair[1]
                    twin = next((t for t in tried if _same(t[1], rng)), None)
                    if twin is None:
                        params = {**chosen, (i, which): _qparams(rng, spec)}
                        losses, outs = _loss(model, ids, _RangeQuantizer(params), prefix, i if reuse else None)
                        search.forwards += len(ids)
                        tried.append((name, rng, losses, outs))
                    else:
                        tried.append((name, rng, twin[2], twin[3]))
                current = next(t for t in tried if t[0] == search.start)
                better = [t for t in tried if t is not current and significantly_lower(t[2], current[2])]
                best = min(better, key=lambda t: sum(t[2])) if better else current  # min keeps the first of equals
                search.choices[i][which] = best[0]
                fixed[i][which] = best[1]
                chosen[(i, which)] = _qparams(best[1], spec)
                outputs = best[3]
            ranges[i] = (fixed[i]["k"], fixed[i]["v"])
            if reuse:
                prefix.outputs = outputs
    search.seconds = time.perf_counter() - start
    scales = solve_scales(stats, recipe, ranges=ranges)
    scales.metadata[METADATA_KEY] = json.dumps(search.to_json(), sort_keys=True)
    scales.loss_search = search
    return scales
