"""The report of bench/device_check.py: one JSON file (everything) and one markdown file (the tables that
docs/kernels.md publishes), both in the --out folder."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def environment(device: str) -> dict:
    """Device, driver-visible name and the versions the figures depend on."""
    env = {"device": device, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import transformers

    env["transformers"] = transformers.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        env["gpu"] = None
    return env


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}" if v < 1 else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _gbps(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def kernel_table(kernels: dict) -> list[str]:
    """One row per format: reference, both kernels' call / GPU time, GB/s, % of copy, speed-up."""
    if not kernels.get("rows"):
        return [f"(kernels not run: {kernels.get('error', 'no rows')})"]
    lines = [f"x {tuple(kernels['shape'])} {kernels['dtype']}; measured copy bandwidth "
             f"{_gbps(kernels['copy_gbps'])} GB/s" + (f" ({kernels['copy_skipped']})" if kernels.get("copy_skipped") else ""),
             "",
             "| format, granularity | error: ref / call / GPU ms | GB/s, % copy | speed-up | "
             "fake-quantize: ref / call / GPU ms | GB/s, % copy | speed-up |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in kernels["rows"]:
        name = f"{row['format']} {'sym' if row['symmetric'] else 'asym'} {row['granularity']}"
        if "error" not in row:
            lines.append(f"| {name} | failed: {row['checks'][-1]['detail']} | | | | | |")
            continue
        cells = []
        for kind in ("error", "fake_quant"):
            e = row[kind]
            cells += [f"{_ms(e['reference_ms'])} / {_ms(e['call_ms'])} / {_ms(e['gpu_ms'])}",
                      f"{_gbps(e['gbps'])}, {_pct(e['fraction_of_copy'])}",
                      "-" if e["speedup"] is None else f"{e['speedup']:.1f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def sweep_table(sweep: dict) -> list[str]:
    """Per format and kernel: the default tile and its time, the best tile of the sweep and its time; then the
    tables (ERROR_TILES / FAKE_QUANT_TILES entries) the best tiles suggest."""
    if not sweep.get("rows"):
        return ["(sweep not run)"]
    lines = [f"timing: {sweep['timing']}" + (f"; stopped: {sweep['stopped']}" if sweep.get("stopped") else ""), "",
             "| format, granularity | kernel | default tile | default ms | best tile | best ms | best GB/s | tiles timed |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sweep["rows"]:
        best = row["best"] or {}
        tile = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("ms", "gbps")) or "-"
        default = ", ".join(f"{k}={v}" for k, v in (row["default"] or {}).items()) or "-"
        timed = sum("ms" in t for t in row["timings"])
        lines.append(f"| {row['format']} {'sym' if row['symmetric'] else 'asym'} {row['granularity']} | {row['kernel']} "
                     f"| {default} | {_ms(row.get('default_ms'))} | {tile} | {_ms(best.get('ms'))} "
                     f"| {_gbps(best.get('gbps'))} | {timed} |")
    for kind, table in (sweep.get("suggested") or {}).items():
        if table:
            name = "ERROR_TILES" if kind == "error" else "FAKE_QUANT_TILES"
            lines += ["", f"suggested {name} entries (where a swept tile beat the default): "
                      + "; ".join(f"{fmt}: Tile({', '.join(f'{k}={v}' for k, v in t.items())})" for fmt, t in table.items())]
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    head = (f"# kvq device check ({'toy, CPU interpreter' if report['toy'] else env.get('gpu') or env['device']})\n\n"
            f"{env.get('gpu') or env['device']}; torch {env['torch']}, Triton {env['triton']}, "
            f"transformers {env['transformers']}, Python {env['python']}; {report['seconds']:.0f} s in all. "
            f"**{'all checks passed' if report['ok'] else 'FAILED: ' + str(report['failed']) + ' check(s)'}**\n")
    checks = ["| check | result | detail |", "|---|---|---|"]
    for c in report["checks"]:
        mark = "ok" if c["ok"] else ("MISS (target)" if c.get("target") else "FAIL")
        checks.append(f"| {c['name']} | {mark} | {c.get('detail', '')} |")
    skipped = [f"* {s}" for s in report.get("skipped", [])]
    parts = [head, "## Checks\n", *checks, "", "## Kernels\n", *kernel_table(report.get("kernels", {})), "",
             "## Tile sweep\n", *sweep_table(report.get("sweep", {})), ""]
    if skipped:
        parts += ["## Skipped\n", *skipped, ""]
    return "\n".join(parts)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    """device_check.json and device_check.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "device_check.json", out / "device_check.md"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(markdown(report))
    return js, md
