"""What ``kvq validate`` and ``kvq eval`` show: progress bars, tables, and the same data as JSON.

JSON numbers that are not finite (an SQNR of +inf where the error is exactly 0) are written as
``null``: JSON has no infinity.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvq import __version__
from kvq.artifacts.files import json_bytes
from kvq.cli.console import summary_table
from kvq.evaluation.perplexity import EvalResult, Measured
from kvq.evaluation.plan_run import PlanResult
from kvq.evaluation.quant_cache import PartialQuantizer, describe_spec
from kvq.evaluation.round_trip import HeadError, ValidationResult
from kvq.io.atomic import write_file

PERPLEXITY_METHOD = (
    "documents in file order joined by EOS into one token stream, cut into consecutive non-overlapping "
    "windows of seqlen tokens from the start (tail dropped); each window is one forward pass without "
    "earlier context; ppl = exp(mean NLL of tokens 1..seqlen-1 of every window)"
)
ATTENTION_ERROR_METHOD = (
    "per layer, the attention module is re-run on its exact unquantized-run inputs with the quantized "
    "cache; relative L2 error sqrt(sum|o_q - o|^2 / sum|o|^2) of its output, accumulated over all "
    "windows; upstream layers stay unquantized, so each layer's error is its own"
)


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def write_json(path: str | Path, data: dict) -> Path:
    """Write a JSON report atomically (kvq.io.atomic's policy: an earlier report of the same kind is replaced)."""
    return write_file(path, json_bytes(data), option="--json")


# --- validate ---------------------------------------------------------------------------------


def _recipe_line(result: ValidationResult) -> str:
    r = result.scales.recipe
    return f"{r.name}: K {describe_spec(r.key)}, V {describe_spec(r.value)}"


def head_json(h: HeadError) -> dict:
    return {
        "layer": h.layer,
        "kv_head": h.kv_head,
        "tensor": h.tensor,
        "sqnr_db": finite_or_none(h.sqnr_db),
        "mse": h.mse,
        "rmse": h.rmse,
        "max_abs_err": h.max_abs_err,
        "clip_rate": h.clip_rate,
        "clipped": h.clipped,
        "count": h.count,
    }


def _total_json(t: dict[str, float]) -> dict:
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in t.items()}


def validation_json(result: ValidationResult) -> dict:
    """The whole validation report: every (layer, head, K|V), worst first, plus totals."""
    meta = result.scales.metadata
    info = result.info
    k_layers, v_layers = result.layer_totals("k"), result.layer_totals("v")
    return {
        "kvq_version": __version__,
        "report": "validate",
        "scales": str(result.scales_path),
        "recipe": result.scales.recipe.to_json(),
        "model": {"id": info.model_id, "config_hash": info.config_hash, "num_layers": info.num_layers,
                  "num_kv_heads": info.num_kv_heads, "head_dim": info.head_dim},
        "calibration": {k: meta[k] for k in ("model", "config_hash", "dataset", "dataset_origin", "samples",
                                             "seqlen", "seed", "tokens") if k in meta},
        "data": {"dataset": result.dataset.name, "origin": result.dataset.origin,
                 "files": list(result.dataset.files), "samples": result.samples, "tokens": result.tokens},
        "warnings": list(result.warnings),
        "sort": "heads by SQNR ascending (worst first); ties by clip rate descending, then layer, head, K before V",
        "overall": {"k": _total_json(result.overall("k")), "v": _total_json(result.overall("v"))},
        "layers": [{"layer": i, "k": _total_json(k_layers[i]), "v": _total_json(v_layers[i])} for i in sorted(k_layers)],
        "heads": [head_json(h) for h in result.heads()],
    }


def _db(x: float) -> str:
    return "inf (exact)" if x == math.inf else f"{x:.1f}"


def print_validation(result: ValidationResult, top: int = 20, console: Console | None = None) -> None:
    console = console or report_console()
    info = result.info
    summary = summary_table("kvq validate")
    summary.add_row("scales", f"{result.scales_path} ({_recipe_line(result)})")
    summary.add_row("model", f"{info.model_id} ({info.num_layers} layers x {info.num_kv_heads} KV heads x "
                    f"head_dim {info.head_dim})")
    summary.add_row("data", f"{result.dataset.name} ({result.dataset.origin}), {result.samples} samples, "
                    f"{result.tokens:,} tokens ({result.seconds:.1f} s)")
    for which in ("k", "v"):
        t = result.overall(which)
        summary.add_row(f"overall {which.upper()}", f"SQNR {_db(t['sqnr_db'])} dB, RMSE {math.sqrt(t['mse']):.4g}, "
                        f"max |err| {t['max_abs_err']:.4g}, clipped {100 * t['clip_rate']:.4f}%")
    console.print(summary)
    heads = result.heads()
    shown = heads[:top]
    table = Table(title=f"worst {len(shown)} of {len(heads)} (layer, KV head, K|V) by SQNR", title_justify="left")
    for col, justify in (("layer", "right"), ("head", "right"), ("K/V", "center"), ("SQNR dB", "right"),
                         ("RMSE", "right"), ("max |err|", "right"), ("clipped", "right")):
        table.add_column(col, justify=justify)
    for h in shown:
        table.add_row(str(h.layer), str(h.kv_head), h.tensor.upper(), _db(h.sqnr_db), f"{h.rmse:.4g}",
                      f"{h.max_abs_err:.4g}", f"{100 * h.clip_rate:.4f}%")
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")


# --- eval ---------------------------------------------------------------------------------------


def _attention_json(m: Measured) -> dict | None:
    errs = m.attention_error
    if not errs:
        return None
    worst = max(errs, key=errs.get)
    return {
        "mean": sum(errs.values()) / len(errs),
        "max": errs[worst],
        "max_layer": worst,
        "per_layer": {str(i): e for i, e in sorted(errs.items())},
    }


def eval_rows(result: EvalResult) -> list[dict]:
    """The table's rows: the baseline first, then every quantizer in the order evaluated."""
    shape = result.kv_shape
    dtype = result.model_dtype
    m = result.measurement
    base_bytes = m.baseline.quantizer.kv_bytes_per_token(shape, dtype)
    rows = []
    for entry in (m.baseline, *m.entries):
        q = entry.quantizer
        kv_bytes = q.kv_bytes_per_token(shape, dtype)
        row = {
            "name": q.name if entry is not m.baseline else f"baseline ({str(dtype).removeprefix('torch.')})",
            "kind": q.kind,
            "source": q.source,
            "key": q.describe("k"),
            "value": q.describe("v"),
            "query": _query_text(q),
            "kv_bytes_per_token": kv_bytes,
            "memory_saved": 1.0 - kv_bytes / base_bytes,
            "ppl": entry.ppl,
            "mean_nll": entry.mean_nll,
            "delta_ppl": entry.ppl - m.baseline.ppl,
            "delta_pct": 100.0 * (entry.ppl / m.baseline.ppl - 1.0),
            "delta_pct_stderr": None if entry is m.baseline else finite_or_none(100.0 * m.delta_stderr(entry)),
            "attention_error": _attention_json(entry),
            "skip_layers": list(q.skip_layers) if isinstance(q, PartialQuantizer) else None,
        }
        rows.append(row)
    return rows


def eval_json(result: EvalResult) -> dict:
    info = result.info
    w = result.windows
    return {
        "kvq_version": __version__,
        "report": "eval",
        "model": {"id": info.model_id, "config_hash": info.config_hash, "dtype": str(result.model_dtype).removeprefix("torch."),
                  "num_layers": info.num_layers, "num_kv_heads": info.num_kv_heads, "head_dim": info.head_dim},
        "data": {"dataset": result.dataset.name, "origin": result.dataset.origin, "files": list(result.dataset.files),
                 "windows": w.num_windows, "seqlen": w.seqlen, "predicted_tokens": w.predicted_tokens,
                 "documents_used": w.documents_used},
        "method": {"perplexity": PERPLEXITY_METHOD, "attention_error": ATTENTION_ERROR_METHOD,
                   "delta_pct_stderr": "one standard error, in percent, of the mean per-token NLL difference to "
                   "the baseline across windows (paired; ppl ratio ~ exp(difference))",
                   "kv_bytes_per_token": "K and V codes of every layer and KV head for one token, plus per-token "
                   "scale/zero-point bytes for dynamic modes (static scales cost nothing per token)"},
        "seconds": result.measurement.seconds,
        "warnings": list(result.warnings),
        "rows": eval_rows(result),
    }


def _fmt_bytes(b: float) -> str:
    return f"{b:,.0f}" if b == int(b) else f"{b:,.1f}"


def _pm(stderr: float | None) -> str:
    return "" if stderr is None else f" ± {stderr:.3f}"


def _query_text(q) -> str | None:
    """How FP8 attention's query is quantized (``fp8_e4m3 per head``), None when it is not."""
    recipe = getattr(q, "recipe", None)  # the baseline and dynamic quantizers have no query spec
    if not q.quantizes_queries or recipe is None or recipe.query is None:
        return None
    return f"{recipe.query.format} per {recipe.query.granularity}"


def _kv_text(key: str, value: str) -> str:
    return key if key == value else f"K {key} / V {value}"


def report_console() -> Console:
    """stdout; 160 columns wide when it is not a terminal (a file or a pipe), so no table is cut."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_eval(result: EvalResult, console: Console | None = None) -> None:
    console = console or report_console()
    w = result.windows
    info = result.info
    dtype = str(result.model_dtype).removeprefix("torch.")
    table = Table(
        title=f"kvq eval: {info.model_id} on {result.dataset.name}, {w.num_windows} windows x {w.seqlen} tokens "
        f"({w.predicted_tokens:,} predicted, {result.measurement.seconds:.0f} s)",
        title_justify="left",
    )
    table.add_column("recipe", no_wrap=True)
    table.add_column("K / V")
    table.add_column("KV bytes/token", justify="right")
    table.add_column(f"saved vs {dtype}", justify="right")
    table.add_column("ppl", justify="right", no_wrap=True)
    table.add_column("Δ ppl", justify="right", no_wrap=True)
    table.add_column("attn err mean / max (layer)", justify="right")
    for row in eval_rows(result):
        attn = row["attention_error"]
        attn_text = "" if attn is None else f"{attn['mean']:.2e} / {attn['max']:.2e} ({attn['max_layer']})"
        is_base = row["kind"] == "baseline"
        table.add_row(
            row["name"], _kv_text(row["key"], row["value"]) + (f" / Q {row['query']}" if row.get("query") else ""),
            _fmt_bytes(row["kv_bytes_per_token"]),
            "" if is_base else f"{100 * row['memory_saved']:.1f}%",
            f"{row['ppl']:.4f}",
            "" if is_base else f"{row['delta_ppl']:+.4f} ({row['delta_pct']:+.3f}%{_pm(row['delta_pct_stderr'])})",
            attn_text,
        )
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


# --- plan ---------------------------------------------------------------------------------------


def print_plan(result: PlanResult, console: Console | None = None) -> None:
    """The sensitivity of every layer (most sensitive first), the layers kept unquantized, the engine flags."""
    console = console or report_console()
    sens, info, w = result.sensitivity, result.info, result.windows
    skipped = set(result.skip_layers)
    unit = "rel. L2 error" if sens.by == "attention" else "Δ NLL/token (nats)"
    table = Table(title=f"kvq plan: sensitivity by {sens.by}, most sensitive first", title_justify="left")
    for col, justify in (("rank", "right"), ("layer", "right"), (unit, "right"), ("plan", "left")):
        table.add_column(col, justify=justify)
    for rank, layer in enumerate(sens.order(), 1):
        value = f"{sens.per_layer[layer]:.4g}" + (f" ± {sens.stderr[layer]:.2g}" if layer in sens.stderr else "")
        table.add_row(str(rank), str(layer), value, "unquantized" if layer in skipped else result.recipe)
    console.print(table)
    b = result.kv_bytes_per_token
    dtype = str(result.model_dtype).removeprefix("torch.")
    summary = summary_table("plan")
    summary.add_row("scales", f"{result.scales_file} ({result.recipe})")
    summary.add_row("model", f"{info.model_id} ({info.num_layers} layers)")
    summary.add_row("data", f"{result.dataset.name} ({result.dataset.origin}), {w.num_windows} windows x {w.seqlen} tokens")
    summary.add_row("sensitivity", f"by {sens.by}: {sens.description}")
    summary.add_row("budget", ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in result.budget.items()))
    summary.add_row("skip layers", ", ".join(map(str, result.skip_layers)) or "none")
    summary.add_row("KV bytes/token", f"{_fmt_bytes(b['plan'])} (every layer quantized: {_fmt_bytes(b['all_quantized'])}, "
                    f"unquantized {dtype}: {_fmt_bytes(b['unquantized'])})")
    summary.add_row("every layer quantized", f"Δ NLL/token {sens.all_layers_delta_nll:+.4g} nats on these windows")
    for name, engine in result.engines.items():
        summary.add_row(name, engine["flags"] + (" " if engine["flags"] else "") + f"({engine['note']})")
    console.print(summary)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"plan: {result.path}  (evaluate it: kvq eval --plan {result.path} ...)")
