"""The checks of ``kvq report``: what in the figures matters for choosing a recipe, and the recipe it points to.

Every finding names the figure it is read from (docs/report.md lists the thresholds). Thresholds:

* outlier channel: a channel's absmax > ``OUTLIER_RATIO`` x the median channel absmax of its head;
* uneven heads: in one layer, the largest head absmax > ``HEAD_SPREAD`` x the smallest;
* fp8 e4m3 at scale 1.0: saturates where absmax > 448; subnormal where |x| < 2**-6, flagged when more
  than ``SUBNORMAL_SHARE`` of a head's values are (histograms), or when a head's absmax is below 2**-6;
* a scale at ``kvq.quant.qparams.SCALE_FLOOR`` (a range of zero width);
* a dominant layer: per-layer round-trip SQNR more than ``DOMINANT_DB`` below the median layer's
  (validate.json), or attention-output error more than ``DOMINANT_RATIO`` x the median layer's (eval.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvq.quant.formats import FP8_E4M3
from kvq.quant.qparams import SCALE_FLOOR
from kvq.reporting.measures import E4M3_MIN_NORMAL, Grids, head_spread

OUTLIER_RATIO = 6.0
HEAD_SPREAD = 4.0
SUBNORMAL_SHARE = 0.5
DOMINANT_DB = 6.0
DOMINANT_RATIO = 3.0
OUTLIER_LAYERS = 0.25  # the share of layers with key outlier channels from which per-channel keys are recommended
E4M3_MAX = FP8_E4M3.qmax
SHOWN = 6  # places listed in one finding; the rest are counted
NAMES = {"k": "K", "v": "V"}


@dataclass(frozen=True)
class Finding:
    """One warning: ``kind`` (outlier-channels, head-spread, fp8-saturation, fp8-subnormal, scale-floor,
    dominant-layer, note), the tensor ("k", "v" or "" for both), the text, and the figure it is read from."""

    kind: str
    tensor: str
    text: str
    figure: str
    layers: tuple[int, ...] = ()


@dataclass
class Assessment:
    findings: list[Finding] = field(default_factory=list)
    recipe: str = ""
    reasons: list[str] = field(default_factory=list)

    def of(self, kind: str, tensor: str | None = None) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind and (tensor is None or f.tensor == tensor)]


def _places(items: list[str], total: int) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {total - SHOWN} more" if total > SHOWN else "")


def outlier_channels(grids: Grids) -> list[Finding]:
    out = []
    for w in ("k", "v"):
        ratio = grids.ratio[w]  # (layers, heads, head_dim), NaN where a layer has no such head or channel
        layers = grids.layer_ids(np.any(ratio > OUTLIER_RATIO, axis=(1, 2)))
        if layers:
            hits = np.argwhere(ratio > OUTLIER_RATIO)  # (n, 3): row, head, channel
            order = np.argsort(-ratio[tuple(hits.T)], kind="stable")
            items = [f"layer {grids.layers[a]} head {b} channel {c} ({ratio[a, b, c]:.1f}x)"
                     for a, b, c in hits[order]]
            out.append(Finding(
                "outlier-channels", w, f"{NAMES[w]}: {len(hits)} outlier channel(s) (absmax > {OUTLIER_RATIO:g}x "
                f"the head's median channel) in {len(layers)} of {grids.num_layers} layers: "
                f"{_places(items, len(items))}. One scale per head or tensor spends its levels on these channels; "
                "per-channel scales or smoothing recover the others' precision.", "channels.png", layers))
    return out


def _spread(grids: Grids, w: str, spread: np.ndarray) -> Finding | None:
    """The head-spread finding of one tensor, from its per-layer spread (layers,); None when every layer is even."""
    rows = np.flatnonzero(spread > HEAD_SPREAD)
    layers = grids.layer_ids(spread > HEAD_SPREAD)
    items = [f"layer {grids.layers[r]} ({spread[r]:.1f}x)" for r in sorted(rows, key=lambda r: -spread[r])]
    text = (f"{NAMES[w]}: KV head ranges differ by more than {HEAD_SPREAD:g}x within {len(layers)} layer(s): "
            f"{_places(items, len(items))}. A per-tensor scale wastes levels on the small heads; per-head scales pay.")
    return Finding("head-spread", w, text, "absmax.png", layers) if layers else None


def uneven_heads(grids: Grids) -> list[Finding]:
    found = [_spread(grids, w, head_spread(grids.absmax[w])) for w in ("k", "v")]
    return [f for f in found if f is not None]


def fp8_at_unit_scale(grids: Grids) -> list[Finding]:
    out = []
    for w in ("k", "v"):
        absmax = grids.absmax[w]  # (layers, heads)
        mask = np.nanmax(absmax, axis=1) > E4M3_MAX
        if mask.any():
            layers = grids.layer_ids(mask)
            items = [f"layer {grids.layers[r]} (absmax {np.nanmax(absmax[r]):.4g})" for r in np.flatnonzero(mask)]
            out.append(Finding("fp8-saturation", w, f"{NAMES[w]}: fp8 e4m3 at scale 1.0 saturates (|x| > "
                               f"{E4M3_MAX:g}) in {len(layers)} layer(s): {_places(items, len(items))}. Calibrated "
                               "scales are needed; the scale-1.0 fallback clips these layers.", "absmax.png", layers))
        if grids.subnormal is not None:
            share = grids.subnormal[w]  # (layers, heads)
            mask = np.nanmax(share, axis=1) > SUBNORMAL_SHARE
            what = (f"more than {SUBNORMAL_SHARE:.0%} of a head's values are below 2**-6 = {E4M3_MIN_NORMAL:g} "
                    "(subnormal in e4m3 at scale 1.0, 1 to 3 significant bits)")
            figure = "subnormal.png"
        else:
            share = absmax
            mask = np.nanmin(absmax, axis=1) < E4M3_MIN_NORMAL
            what = (f"a head's absmax is below 2**-6 = {E4M3_MIN_NORMAL:g}, so all its values are subnormal in "
                    "e4m3 at scale 1.0 (no histograms: calibrate with --histograms head for the share per head)")
            figure = "absmax.png"
        if mask.any():
            layers = grids.layer_ids(mask)
            items = [f"layer {grids.layers[r]} ({np.nanmax(share[r]):.0%})" if grids.subnormal is not None
                     else f"layer {grids.layers[r]}" for r in np.flatnonzero(mask)]
            out.append(Finding("fp8-subnormal", w, f"{NAMES[w]}: in {len(layers)} layer(s) {what}: "
                               f"{_places(items, len(items))}. Scale 1.0 loses their precision; calibrated scales "
                               "move them into the normal range.", figure, layers))
    return out


def floor_scales(grids: Grids) -> list[Finding]:
    scales = grids.raw_scales
    if scales is None:
        return []
    out = []
    for w in ("k", "v"):
        items, layers = [], []
        for i in sorted(scales.layers):
            s = scales.layers[i].scale(w)
            n = int((s <= SCALE_FLOOR).sum())
            if n:
                layers.append(i)
                items.append(f"layer {i} ({n} of {s.numel()} scale(s))")
        if items:
            out.append(Finding("scale-floor", w, f"{NAMES[w]}: scales at the floor {SCALE_FLOOR:.3g} (a range of "
                               f"zero width: always 0 in calibration) in {_places(items, len(items))}. Check that "
                               "the calibration data reached these heads.", "scales.png", tuple(layers)))
    return out


def dominant_layers(grids: Grids) -> list[Finding]:
    out = []
    if grids.layer_sqnr is not None:
        for w in ("k", "v"):
            sqnr = grids.layer_sqnr[w]  # (layers,)
            finite = sqnr[np.isfinite(sqnr)]
            if not len(finite):
                continue
            median = float(np.median(finite))
            mask = np.isfinite(sqnr) & (sqnr < median - DOMINANT_DB)
            if mask.any():
                layers = grids.layer_ids(mask)
                items = [f"layer {grids.layers[r]} ({sqnr[r]:.1f} dB)"
                         for r in sorted(np.flatnonzero(mask), key=lambda r: sqnr[r])]
                out.append(Finding("dominant-layer", w, f"{NAMES[w]}: round-trip SQNR more than {DOMINANT_DB:g} dB "
                                   f"below the median layer's ({median:.1f} dB) in {_places(items, len(items))}: "
                                   "these layers dominate the quantization error.", "sqnr.png", layers))
    for row in grids.eval_rows or []:
        errs = row["per_layer"]
        if not errs:
            continue
        values = np.array([errs[i] for i in sorted(errs)])
        median = float(np.median(values))
        hot = [i for i in sorted(errs, key=lambda i: -errs[i]) if errs[i] > DOMINANT_RATIO * median and errs[i] > 0]
        if hot:
            items = [f"layer {i} ({errs[i]:.2e})" for i in hot]
            out.append(Finding("dominant-layer", "", f"{row['name']}: attention-output error more than "
                               f"{DOMINANT_RATIO:g}x the median layer's ({median:.2e}) in {_places(items, len(items))}"
                               ": candidates for `kvq plan` to keep unquantized.", "attention_error.png", tuple(hot)))
    return out


def recommend(grids: Grids, findings: list[Finding]) -> tuple[str, list[str]]:
    """The recipe the figures point to, and why (each reason names its figure)."""
    keys_out = [f for f in findings if f.kind == "outlier-channels" and f.tensor == "k"]
    spread = [f for f in findings if f.kind == "head-spread"]
    share = len(keys_out[0].layers) / grids.num_layers if keys_out else 0.0
    if share >= OUTLIER_LAYERS:
        return "int8-asym-per-channel", [
            f"keys have outlier channels in {share:.0%} of layers, at least {OUTLIER_LAYERS:.0%} (channels.png): "
            "per-channel key scales give "
            "each channel its own range; for an engine that takes only per-tensor or per-head fp8 scales, add "
            "`transforms: [smooth-keys]` to an fp8 recipe instead (docs/transforms.md)."]
    if spread:
        return "fp8-e4m3-per-head", [
            f"KV head ranges differ by more than {HEAD_SPREAD:g}x within a layer (absmax.png), and no key "
            f"outlier channels stand out in {OUTLIER_LAYERS:.0%} of layers or more (channels.png): one scale per "
            "head keeps small heads' precision."]
    keys = (f"key outlier channels appear in only {share:.0%} of layers" if share else
            f"key channels are even (none above {OUTLIER_RATIO:g}x its head's median)")
    reasons = [f"{keys} (channels.png) and heads differ by at most {HEAD_SPREAD:g}x in every layer (absmax.png): "
               "one scale per layer loses little."]
    if not any(f.kind in ("fp8-saturation", "fp8-subnormal") for f in findings):
        reasons.append(f"no layer saturates fp8 e4m3 at scale 1.0 (absmax <= {E4M3_MAX:g}) or is mostly subnormal, "
                       "so the uncalibrated scale-1.0 fallback neither clips nor loses most values to subnormals; calibrated "
                       "scales use more of the fp8 range (compare both in eval_ppl.png with `kvq eval`).")
    return "fp8-e4m3-per-tensor", reasons


def measured_best(grids: Grids) -> str | None:
    """The quantized eval row with the smallest perplexity change, as a sentence (None without eval rows)."""
    rows = [r for r in grids.eval_rows or [] if r["memory_saved"] > 0]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["delta_pct"])
    pm = "" if best["stderr"] is None else f" ± {best['stderr']:.3f}"
    return (f"measured (eval_ppl.png): {best['name']} changes perplexity least, {best['delta_pct']:+.3f}%{pm} "
            f"(one standard error), saving {best['memory_saved']:.0%} of the KV cache; differences within a few "
            "standard errors are not significant.")


def assess(grids: Grids) -> Assessment:
    findings = [*outlier_channels(grids), *uneven_heads(grids), *fp8_at_unit_scale(grids), *floor_scales(grids),
                *dominant_layers(grids)]
    recipe, reasons = recommend(grids, findings)
    best = measured_best(grids)
    return Assessment(findings, recipe, reasons + ([best] if best else []))
