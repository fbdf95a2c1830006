"""``kvq report``: figures, warnings and a recommended recipe from a calibration artifact (docs/report.md).

:func:`write_report` reads OUT_DIR's statistics (and scales, validate.json, an eval.json), draws the
figures (:mod:`kvq.reporting.build`), runs the checks (:mod:`kvq.reporting.findings`) and writes
OUT_DIR/report/ as one set through kvq's atomic writer: a failure leaves the previous report (or none).
"""

from __future__ import annotations

from pathlib import Path

from kvq.artifacts.files import REPORT_DIR, REPORT_NAMES
from kvq.io.atomic import write_folder

FIGURE_FILES = tuple(name for name in REPORT_NAMES if name.endswith(".png"))
REPORT_FILES = REPORT_NAMES  # what a report folder may hold (named once, in kvq.artifacts.files)


def write_report(out_dir: str | Path, validation: str | Path | None = None, eval_json: str | Path | None = None,
                 *, out: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write the report of the artifact folder ``out_dir`` into ``out`` (default OUT_DIR/report); the paths written.

    ``validation``: a validate.json (default: the one in ``out_dir``, if any); ``eval_json``: a
    ``kvq eval --json`` file. An existing report folder is replaced as a whole; a folder holding
    other files needs ``force``.
    """
    from kvq.reporting.build import describe, plots, png_bytes
    from kvq.reporting.findings import assess
    from kvq.reporting.inputs import load_inputs
    from kvq.reporting.measures import compute_grids
    from kvq.reporting.render import figures_json, markdown, page, source_warnings

    inputs = load_inputs(out_dir, validation, eval_json)
    target = Path(out) if out is not None else Path(out_dir) / REPORT_DIR
    grids = compute_grids(inputs)
    assessment = assess(grids)
    images: dict[str, bytes] = {}
    figures = []
    for plot in plots(grids):
        images[plot.name] = png_bytes(plot)
        figures.append({"file": plot.name, **describe(plot)})
    notes = source_warnings(inputs)
    files = {**images, "figures.json": figures_json(figures, assessment),
             "report.md": markdown(inputs, assessment, figures, notes).encode("utf-8"),
             "report.html": page(inputs, assessment, figures, notes, images).encode("utf-8")}
    written = write_folder(target, files, kind=REPORT_FILES, force=force, inputs=inputs.read)
    return written.paths
