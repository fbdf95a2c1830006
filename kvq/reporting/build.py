"""The report's figures: matplotlib Figures (Agg canvas, no display, no pyplot state) and their PNG bytes.

Sizes, at ``DPI`` dots per inch, with the layout engine keeping every label inside the figure:

* layer x KV head heatmaps (absmax, subnormal share, scales, SQNR): ``WIDTH`` x ``heatmap_height(layers)``,
  K left and V right, layer 0 at the top, each panel with its colour bar;
* the per-channel view: ``WIDTH`` x ``channel_height(layers)``, K above V, every head's channels side by side;
* eval: ``WIDTH`` x ``bar_height(rows)`` bars of the perplexity change, and ``WIDTH`` x ``LINE_HEIGHT`` lines of
  the per-layer attention-output error.

matplotlib is imported here only, and this module only when a report is written (``kvq --help`` stays fast).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvq.errors import KvqError
from kvq.reporting.findings import OUTLIER_RATIO
from kvq.reporting.measures import Grids

DPI = 100
WIDTH = 10.0  # inches; every size is a multiple of 1/8 inch, so figures are exactly inches x DPI pixels
LINE_HEIGHT = 5.0
MAX_LAYER_TICKS = 40  # beyond this, every n-th layer is labelled (the image still has a row per layer)
MAX_HEAD_TICKS = 16
NAMES = {"k": "K", "v": "V"}


def heatmap_height(layers: int) -> float:
    return max(4.0, 1.5 + 0.25 * layers)


def channel_height(layers: int) -> float:
    return max(5.0, 1.5 + 2 * (0.5 + 0.125 * layers))


def bar_height(rows: int) -> float:
    return max(3.0, 1.5 + 0.5 * rows)


@dataclass
class Plot:
    """One figure of the report: its file name, the matplotlib Figure, a caption and the data it shows."""

    name: str
    title: str
    figure: object  # matplotlib.figure.Figure
    caption: str
    data: dict


def _figure(height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise KvqError("kvq report needs matplotlib, which is not installed",
                       hint="pip install 'matplotlib>=3.7'") from exc
    return Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")


def every(n: int, most: int) -> list[int]:
    """0..n-1, thinned to at most about ``most`` evenly spaced ticks."""
    return list(range(0, n, max(1, math.ceil(n / most))))


def _json_values(a: np.ndarray) -> list:
    """An array as nested lists, non-finite values as None (JSON has no NaN or infinity)."""
    return [_json_values(x) for x in a] if a.ndim > 1 else [float(x) if np.isfinite(x) else None for x in a]


def _layer_axis(ax, layer_ids: tuple[int, ...]) -> None:
    """Row n of an image is layer ``layer_ids[n]`` (a hybrid model's rows are its KV-cache layers only)."""
    ticks = every(len(layer_ids), MAX_LAYER_TICKS)
    ax.set_yticks(ticks, labels=[str(layer_ids[t]) for t in ticks], fontsize=7 if len(layer_ids) > 20 else 9)
    ax.set_ylabel("layer" if layer_ids == tuple(range(len(layer_ids))) else "layer (those with a KV cache)")


def _heatmap(grids_by_tensor: dict[str, np.ndarray], layer_ids: tuple[int, ...], name: str, title: str, unit: str,
             caption: str, *, log: bool = False, cmap: str = "viridis", shared: bool = False) -> Plot:
    """Two (layers, heads) heatmaps, K and V, each with its colour bar in ``unit``; row n is layer ``layer_ids[n]``
    (NaN cells, heads a layer does not have, are grey)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    layers, heads = grids_by_tensor["k"].shape
    fig = _figure(heatmap_height(layers))
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(1, 2)
    both = np.concatenate([g[np.isfinite(g)] for g in grids_by_tensor.values()])
    for ax, w in zip(axes, ("k", "v"), strict=True):
        data = np.where(np.isfinite(grids_by_tensor[w]), grids_by_tensor[w], np.nan)  # inf (exact) shown grey
        colours = colormaps[cmap].with_extremes(bad="lightgrey")
        finite = both if shared else data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (None, None)
        norm = LogNorm(vmin=lo, vmax=hi) if log and lo is not None and lo > 0 else None
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=colours, norm=norm,
                          **({} if norm is not None or not shared else {"vmin": lo, "vmax": hi}))
        ax.set_title(f"{NAMES[w]}", fontsize=10)
        ticks = every(heads, MAX_HEAD_TICKS)
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.set_xlabel("KV head")
        _layer_axis(ax, layer_ids)
        fig.colorbar(image, ax=ax, label=unit, shrink=0.9)
    return Plot(name, title, fig, caption, {"layers": list(layer_ids)}
                | {w: _json_values(g) for w, g in grids_by_tensor.items()})


def absmax_plot(grids: Grids) -> Plot:
    return _heatmap(grids.absmax, grids.layers, "absmax.png", "max |x| per layer and KV head (over its channels)",
                    "max |x| (K/V units)", "The largest magnitude each KV head wrote to the cache. fp8 e4m3 at scale "
                    "1.0 saturates above 448; a layer whose heads differ by more than 4x pays per-head scales.")


def subnormal_plot(grids: Grids) -> Plot:
    return _heatmap(grids.subnormal, grids.layers, "subnormal.png", "share of values with |x| < 2^-6 (subnormal in fp8 e4m3 at "
                    "scale 1.0)", "share of values (0..1)", "From the calibration histograms: the share of each "
                    "head's values that fp8 e4m3 would store as subnormals (1 to 3 significant bits) or zero at "
                    "scale 1.0.", cmap="magma", shared=True)


def scales_plot(grids: Grids) -> Plot:
    recipe = grids.raw_scales.recipe
    how = {"tensor": "per tensor: one scale per layer, repeated in every head",
           "head": "per head", "channel": "per channel: the largest channel scale of each head"}
    kinds = {how[recipe.key.granularity], how[recipe.value.granularity]}
    return _heatmap(grids.scales, grids.layers, "scales.png", f"scales of {recipe.name} ({'; '.join(sorted(kinds))})",
                    "scale (K/V units per quantization step, log)", f"The scales of recipe {recipe.name} "
                    "(x = (q - zero_point) x scale). Colours are on a log scale.", log=True, cmap="cividis")


def sqnr_plot(grids: Grids) -> Plot:
    return _heatmap(grids.sqnr, grids.layers, "sqnr.png", "round-trip SQNR per layer and KV head (grey: exact or not measured)",
                    "SQNR (dB, higher is better)", "From the validation report: 10 log10(sum x^2 / sum (x - x_hat)^2) "
                    "of the quantize -> dequantize round trip on held-out K/V; K and V share one colour scale.",
                    cmap="RdYlGn", shared=True)


def channel_plot(grids: Grids) -> Plot:
    """Every channel's absmax over its head's median channel absmax, layer x (head, channel), K above V."""
    from matplotlib.colors import LogNorm

    layers = grids.ratio["k"].shape[0]
    fig = _figure(channel_height(layers))
    title = f"channel absmax / median channel absmax of its head (outlier: > {OUTLIER_RATIO:g}x)"
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(2, 1)
    top = max(OUTLIER_RATIO * 2, max(float(np.nanmax(r)) for r in grids.ratio.values()))
    norm = LogNorm(vmin=1 / top, vmax=top)  # symmetric around 1 (white): outliers red, quiet channels blue
    for ax, w in zip(axes, ("k", "v"), strict=True):
        _, heads, dim = grids.ratio[w].shape  # K and V each their own (MLA: the latent and the rotary part)
        flat = grids.ratio[w].reshape(layers, heads * dim)  # (layers, heads, dim) -> (layers, heads * dim)
        image = ax.imshow(np.clip(flat, 1 / top, top), aspect="auto", interpolation="nearest", cmap="RdBu_r",
                          norm=norm)
        for h in range(1, heads):
            ax.axvline(h * dim - 0.5, color="black", linewidth=1.0)
        ticks = every(heads, MAX_HEAD_TICKS)
        ax.set_xticks([t * dim + (dim - 1) / 2 for t in ticks], labels=[str(t) for t in ticks])
        ax.set_xlabel(f"KV head ({dim} channels each, channel 0 at the left of its block)")
        ax.set_title(NAMES[w], fontsize=10)
        _layer_axis(ax, grids.layers)
        bar = fig.colorbar(image, ax=ax, label="ratio to the head's median channel (log)")
        bar.ax.axhline(OUTLIER_RATIO, color="black", linewidth=1.5)
    return Plot("channels.png", title, fig, "Per layer, every channel's absmax divided by the median channel "
                f"absmax of its KV head; red cells are channels far above their head's typical range "
                "(the black line on the colour bar marks "
                f"{OUTLIER_RATIO:g}x). Outlier key channels are what per-channel scales or smoothing fix.",
                {w: _json_values(r.reshape(layers, -1)) for w, r in grids.ratio.items()})


def eval_plot(grids: Grids) -> Plot:
    rows = grids.eval_rows
    fig = _figure(bar_height(len(rows)))
    ax = fig.subplots()
    y = np.arange(len(rows))
    values = [r["delta_pct"] for r in rows]
    errors = [r["stderr"] or 0.0 for r in rows]
    bars = ax.barh(y, values, xerr=errors, color="tab:blue", ecolor="black", capsize=4)
    ax.bar_label(bars, labels=[f"{v:+.3f}%" for v in values], padding=6, fontsize=8)
    ax.set_yticks(y, labels=[r["name"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.margins(x=0.25)
    ax.set_xlabel("perplexity change vs the unquantized baseline (%), error bar: one standard error")
    title = "perplexity change per recipe (lower is better)"
    ax.set_title(title, fontsize=11)
    return Plot("eval_ppl.png", title, fig, "From the eval report: the perplexity change of each quantized KV cache "
                "against the baseline on the same windows, with one standard error of the paired difference.",
                {"rows": [{k: r[k] for k in ("name", "delta_pct", "stderr")} for r in rows]})


def attention_plot(grids: Grids) -> Plot:
    rows = [r for r in grids.eval_rows if r["per_layer"]]
    fig = _figure(LINE_HEIGHT)
    ax = fig.subplots()
    layer_ids = grids.layers
    for r in rows:
        xs = sorted(r["per_layer"])
        ax.plot(xs, [r["per_layer"][i] for i in xs], marker="o", markersize=3, label=r["name"])
    if any(v > 0 for r in rows for v in r["per_layer"].values()):
        ax.set_yscale("log")
    ticks = [layer_ids[n] for n in every(len(layer_ids), MAX_LAYER_TICKS)]
    ax.set_xticks(ticks, labels=[str(t) for t in ticks], fontsize=7 if len(layer_ids) > 20 else 9)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative L2 error of the attention output")
    title = "attention-output error per layer (each layer quantized alone)"
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return Plot("attention_error.png", title, fig, "From the eval report: per layer, sqrt(sum|o_q - o|^2 / sum|o|^2) "
                "of the attention module's output with that layer's cache quantized.",
                {"rows": [{"name": r["name"], "per_layer": {str(k): v for k, v in r["per_layer"].items()}}
                          for r in rows]})


def plots(grids: Grids) -> list[Plot]:
    """Every figure the inputs allow, in report order."""
    makers: list[Callable[[Grids], Plot]] = [absmax_plot, channel_plot]
    if grids.subnormal is not None:
        makers.append(subnormal_plot)
    if grids.scales is not None:
        makers.append(scales_plot)
    if grids.sqnr is not None:
        makers.append(sqnr_plot)
    if grids.eval_rows:
        makers.append(eval_plot)
        if any(r["per_layer"] for r in grids.eval_rows):
            makers.append(attention_plot)
    return [make(grids) for make in makers]


def png_bytes(plot: Plot) -> bytes:
    """The figure as PNG, exactly figsize x DPI pixels (no date or software stamp, so equal inputs give equal bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(plot.figure)
    buf = io.BytesIO()
    plot.figure.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def describe(plot: Plot) -> dict:
    """What a figure shows, read back from its drawn axes: titles, axis labels and tick labels, pixel size."""
    fig = plot.figure
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    axes = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        axes.append({"title": ax.get_title(), "x_label": ax.get_xlabel(), "y_label": ax.get_ylabel(),
                     "x_ticks": [t.get_text() for t in ax.get_xticklabels()],
                     "y_ticks": [t.get_text() for t in ax.get_yticklabels()],
                     "images": [list(im.get_array().shape) for im in ax.get_images()]})
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    return {"title": plot.title, "caption": plot.caption,
            "size_px": [width, height], "axes": axes, "colorbars": bars, "data": plot.data}
