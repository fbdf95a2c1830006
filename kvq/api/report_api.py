"""``kvq.report``: figures, warnings and a recommended recipe from a calibration artifact (docs/report.md)."""

from __future__ import annotations

from pathlib import Path

from kvq.reporting import write_report


def report(artifact: str | Path, *, validation: str | Path | None = None, eval_json: str | Path | None = None,
           out: str | Path | None = None, force: bool = False) -> list[Path]:
    """Draw the artifact's statistics, scales and (when given) validation and eval results as PNGs, and write
    ``report.md`` and a self-contained ``report.html`` (what ``kvq report`` does).

    Args:
        artifact: the calibration output folder (it holds ``stats.safetensors``).
        validation: a ``validate.json`` (default: the one in ``artifact``, if any); ``eval_json``: a
            ``kvq eval --json`` file.
        out: the report folder (default ``ARTIFACT/report``), replaced as a whole; ``force``: replace a folder
            holding files a report does not write.

    Returns:
        The paths written (``report.html`` among them).
    """
    return write_report(artifact, validation, eval_json, out=out, force=force)
