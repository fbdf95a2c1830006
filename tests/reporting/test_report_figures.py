"""The report's files: PNG sizes, axes covering every layer and head, no clipped label, a self-contained HTML."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report_helpers
from report_helpers import eval_json, even_absmax, png_size, stats_from, validation_json, write_json  # noqa: E402

from kvq.recipe.schema import load_recipe  # noqa: E402
from kvq.reporting import write_report  # noqa: E402
from kvq.solving.solver import solve_scales  # noqa: E402

LAYERS, HEADS, DIM = 30, 3, 8  # SmolLM2's layers and KV heads (fewer channels, to stay fast)
# Sizes documented in docs/report.md, computed by hand at 100 dpi: heatmaps 10 in x (1.5 + 0.25 x 30 = 9 in),
# the channel view 10 in x (1.5 + 2 x (0.5 + 0.125 x 30) = 10 in), bars 10 in x max(3, 1.5 + 0.5 x 2 rows)
# = 3 in, attention lines 10 in x 5 in.
SIZES = {"absmax.png": (1000, 900), "scales.png": (1000, 900), "sqnr.png": (1000, 900),
         "channels.png": (1000, 1000), "eval_ppl.png": (1000, 300), "attention_error.png": (1000, 500)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("art")
    stats = stats_from(even_absmax(LAYERS, HEADS, DIM))
    stats.save(folder)
    solve_scales(stats, load_recipe("int8-asym-per-channel")).save(folder)
    write_json(folder / "validate.json", validation_json({(7, 2, "k"): None, (3, 1, "v"): 20.0}, LAYERS, HEADS, DIM))
    errors = {str(i): 1e-3 * (1 + i % 3) for i in range(LAYERS)}
    evaluation = write_json(folder.parent / "eval.json", eval_json(
        [{"name": "int8-asym-per-channel", "delta_pct": 0.4, "delta_pct_stderr": 0.2,
          "attention_error": {"per_layer": errors}},
         {"name": "fp8-e4m3-scale-1.0", "delta_pct": 1.5, "delta_pct_stderr": None, "attention_error": None}],
        LAYERS, HEADS, DIM))
    write_report(folder, eval_json=evaluation)
    return folder / "report"


def test_files_and_pixel_sizes(report):
    names = sorted(p.name for p in report.iterdir())
    assert names == sorted([*SIZES, "figures.json", "report.md", "report.html"])  # no subnormal view: no histograms
    for name, size in SIZES.items():
        assert png_size(report / name) == size, name


def test_heatmap_axes_cover_every_layer_and_head(report):
    figures = {f["file"]: f for f in json.loads((report / "figures.json").read_text())["figures"]}
    for name in ("absmax.png", "scales.png", "sqnr.png"):
        axes = figures[name]["axes"]
        assert len(axes) == 2 and [a["title"] for a in axes] == ["K", "V"]
        for ax in axes:
            assert ax["y_ticks"] == [str(i) for i in range(LAYERS)] and ax["y_label"] == "layer"
            assert ax["x_ticks"] == [str(h) for h in range(HEADS)] and ax["x_label"] == "KV head"
            assert ax["images"] == [[LAYERS, HEADS]]
        assert len(figures[name]["colorbars"]) == 2 and all(figures[name]["colorbars"])
    for ax in figures["channels.png"]["axes"]:
        assert ax["images"] == [[LAYERS, HEADS * DIM]] and ax["y_ticks"] == [str(i) for i in range(LAYERS)]
        assert ax["x_ticks"] == [str(h) for h in range(HEADS)]
    # the SQNR grid holds what the validation report says, +inf (exact, JSON null) as None
    sqnr = figures["sqnr.png"]["data"]
    assert sqnr["k"][7][2] is None and sqnr["v"][3][1] == 20.0 and sqnr["k"][0][0] == 40.0
    assert "per channel: the largest channel scale of each head" in figures["scales.png"]["title"]


def test_eval_bars_hold_the_rows_with_their_standard_error(report):
    figures = {f["file"]: f for f in json.loads((report / "figures.json").read_text())["figures"]}
    bars = figures["eval_ppl.png"]
    assert bars["axes"][0]["y_ticks"] == ["int8-asym-per-channel", "fp8-e4m3-scale-1.0"]
    assert bars["data"]["rows"] == [{"name": "int8-asym-per-channel", "delta_pct": 0.4, "stderr": 0.2},
                                    {"name": "fp8-e4m3-scale-1.0", "delta_pct": 1.5, "stderr": None}]
    assert figures["attention_error.png"]["axes"][0]["x_ticks"] == [str(i) for i in range(LAYERS)]


def test_no_label_is_clipped():
    """Every visible text of every figure lies inside the figure (matplotlib's own text extents)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from kvq.reporting.build import plots
    from kvq.reporting.inputs import ReportInputs
    from kvq.reporting.measures import compute_grids

    stats = stats_from(even_absmax(LAYERS, HEADS, DIM))
    scales = solve_scales(stats, load_recipe("fp8-e4m3-per-tensor"))
    evaluation = eval_json([{"name": "a-rather-long-recipe-name-with-skip-0,17", "delta_pct": -0.4,
                             "delta_pct_stderr": 0.3, "attention_error": {"per_layer": {"0": 0.1, "29": 0.2}}}],
                           LAYERS, HEADS, DIM)
    validation = validation_json({}, LAYERS, HEADS, DIM)
    inputs = ReportInputs(Path("."), stats, scales, validation=validation, evaluation=evaluation)
    for plot in plots(compute_grids(inputs)):
        canvas = FigureCanvasAgg(plot.figure)
        canvas.draw()
        drawn = [t for t in plot.figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert drawn
        # the box of everything drawn (what savefig's bbox_inches="tight" measures), in inches
        tight = plot.figure.get_tightbbox(canvas.get_renderer())
        width, height = plot.figure.get_size_inches()
        slack = 0.01  # inches: a hundredth of an inch, one pixel at 100 dpi
        assert tight.x0 >= -slack and tight.y0 >= -slack, (plot.name, tight)
        assert tight.x1 <= width + slack and tight.y1 <= height + slack, (plot.name, tight)


def test_html_is_self_contained_and_md_links_every_figure(report):
    html = (report / "report.html").read_text()
    sources = re.findall(r"""src\s*=\s*["']([^"']*)""", html)
    assert len(sources) == len(SIZES) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<link|<script|url\(|https?://", html)
    md = (report / "report.md").read_text()
    for name in SIZES:
        assert f"]({name})" in md
    assert "**fp8-e4m3-per-tensor**" in md  # even statistics (docs/report.md's rule)
    assert "| model | hand-built |" in md and "| tokens | 100 |" in md
