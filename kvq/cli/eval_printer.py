"""What ``kvq validate``, ``kvq eval`` and ``kvq plan`` show on the console: rich tables and warnings."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from kvq.cli.console import summary_table
from kvq.evaluation.perplexity import EvalResult
from kvq.evaluation.plan_run import PlanResult
from kvq.evaluation.quant_cache import describe_spec
from kvq.evaluation.results_json import eval_rows
from kvq.evaluation.round_trip import ValidationResult


def _recipe_line(result: ValidationResult) -> str:
    r = result.scales.recipe
    return f"{r.name}: K {describe_spec(r.key)}, V {describe_spec(r.value)}"


def _db(x: float) -> str:
    return "inf (exact)" if x == math.inf else f"{x:.1f}"


def print_validation(result: ValidationResult, top: int = 20, console: Console | None = None) -> None:
    console = console or report_console()
    info = result.info
    summary = summary_table("kvq validate")
    summary.add_row("scales", f"{result.scales_path} ({_recipe_line(result)})")
    summary.add_row("model", f"{info.model_id} ({info.shape.text()})")
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


def _fmt_bytes(b: float) -> str:
    return f"{b:,.0f}" if b == int(b) else f"{b:,.1f}"


def _pm(stderr: float | None) -> str:
    return "" if stderr is None else f" ± {stderr:.3f}"


def _kv_text(key: str, value: str) -> str:
    return key if key == value else f"K {key} / V {value}"


def _generation_text(g: dict) -> str:
    err = g["first_difference_stderr"]
    return f"{100 * g['agreement']:.1f}% / {g['first_difference_mean']:.1f}" + ("" if err is None else f" ± {err:.1f}")


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
    gen = result.generation
    if gen is not None:
        table.add_column(f"same tokens / first diff ({gen.tokens} generated)", justify="right", no_wrap=True)
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
            *([] if gen is None else [_generation_text(row["generation"])]),
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
    summary.add_row("budget", ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:g}")
                                        for k, v in result.budget.items()))
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
