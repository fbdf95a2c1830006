"""``kvq report``: figures, warnings and a recommended recipe for a calibration artifact (docs/report.md).

Registered on the app in :mod:`kvq.cli.commands` (kept apart so that module stays small). matplotlib is
imported only when the report is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvq.cli.params import option

SHORT_HELP = "draw an artifact's statistics, scales and error reports as PNGs, report.md and report.html"


def report_command(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", show_default=False,
                                            help="the calibration output folder (it holds stats.safetensors)")],
    validation: Annotated[Path | None, option(
        "--validation", metavar="FILE", help="a validate.json from `kvq validate` (default: OUT_DIR/validate.json "
        "when present): adds the SQNR heatmap and the layers that dominate the round-trip error")] = None,
    eval_json: Annotated[Path | None, option(
        "--eval", metavar="FILE", help="a JSON table from `kvq eval --json`: adds the perplexity change per recipe "
        "and the per-layer attention-output error")] = None,
    out: Annotated[Path | None, option("--out", metavar="DIR", help="where to write the report folder "
                                       "(default OUT_DIR/report)")] = None,
    force: Annotated[bool, option("--force", help="replace a report folder that holds files a report does not "
                                  "write")] = False,
) -> int:
    """Draw OUT_DIR's K/V ranges (layer x KV head absmax, per-channel outlier view, fp8 subnormal share),
    its scales, and, when given, the validation SQNR and the eval perplexity changes as PNGs, and write
    report.md and a self-contained report.html with the run's metadata, the warnings that matter and a
    recommended recipe. The report folder is replaced as a whole. docs/report.md."""
    from rich.console import Console
    from rich.markup import escape

    from kvq.api import report

    written = report(out_dir, validation=validation, eval_json=eval_json, out=out, force=force)
    html = next(p for p in written if p.name == "report.html")
    Console().print(f"report: {escape(str(html))} ({len(written)} files in {escape(str(html.parent))})",
                    soft_wrap=True)
    return 0
