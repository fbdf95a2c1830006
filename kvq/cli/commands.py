"""The ``kvq`` commands: thin typer commands over library calls.

Each command declares its flags in its signature (typer/click check them: integers of at least 1,
choices, paths that must exist) and calls the library. torch, transformers and the data and export
modules are imported inside the command bodies, so ``kvq --help`` stays fast. Errors are not handled
here: they reach :func:`kvq.cli.main`, which prints them through :mod:`kvq.cli.error_map`.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Literal

import typer

from kvq import __version__
from kvq.cli.params import (
    KvqCommand,
    ModelFlags,
    Seed,
    input_path,
    option,
    parse_export_format,
    parse_reduction,
    paths_arg,
    positive,
    with_model_flags,
)
from kvq.cli.plan_command import SHORT_HELP as PLAN_SHORT_HELP
from kvq.cli.plan_command import plan_command
from kvq.cli.report_command import SHORT_HELP as REPORT_SHORT_HELP
from kvq.cli.report_command import report_command
from kvq.errors import UsageError
from kvq.recipe.schema import DEFAULT_RECIPE

app = typer.Typer(
    name="kvq",
    help="Calibrate KV-cache quantization for LLM serving engines.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

LossWindows = Annotated[int, positive("--loss-windows", help="observer loss: the calibration samples it runs the "
                                     "model on per candidate (default 4); its cost grows with them")]
Force = Annotated[bool, option("--force", help="replace an existing --out that holds files other than a kvq artifact")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, option("--version", help="print the version and exit", callback=_version,
                                    is_eager=True)] = False,
) -> None:
    """Calibrate KV-cache quantization for LLM serving engines."""


# --- calibrate ----------------------------------------------------------------------------------


@app.command("calibrate", cls=KvqCommand,
             short_help="run a model over calibration data, record K/V statistics, solve scales")
@with_model_flags
def calibrate_command(
    dataset: Annotated[str, option("--dataset", help="{datasets}, or a path to local files")],
    flags: ModelFlags,
    samples: Annotated[int, positive("--samples", help="number of samples (default 128)")] = 128,
    seqlen: Annotated[int, positive("--seqlen", help="tokens per sample at most (default 2048)")] = 2048,
    batch_size: Annotated[int, positive("--batch-size", help="samples per forward pass (default 1)")] = 1,
    recipe: Annotated[str, option("--recipe", help=f"built-in recipe name or YAML path (default {DEFAULT_RECIPE})")
                      ] = DEFAULT_RECIPE,
    out: Annotated[str, option("--out", help="output folder (default ./kvq-out)")] = "./kvq-out",
    seed: Seed = 0,
    force: Force = False,
    save_every: Annotated[int | None, positive("--save-every", help="save partial statistics in --out every N "
                                                "samples (default: about every minute of work)")] = None,
    resume: Annotated[bool, option("--resume", help="continue the interrupted calibration whose partial "
                                   "statistics are in --out (the same model, data, samples and recipe)")] = False,
    histograms: Annotated[Literal["head", "channel"] | None, option("--histograms",
                                             help="also record histograms per head or per channel, so that "
                                             "`kvq solve` can run clipping observers (percentile, mse) later; "
                                             "default: what the recipe's observer needs")] = None,
    report: Annotated[bool, option("--report", help="also write OUT/report/ (kvq report) at the end")] = False,
    loss_windows: LossWindows = 4,
) -> int:
    """Run a model over a calibration set, record per-layer, per-KV-head, per-channel min/max/absmax of
    the keys (post-RoPE) and values as the engine caches them, and solve scales for a recipe. Writes
    stats.safetensors, scales.safetensors and scales.json."""
    from kvq.api import calibrate
    from kvq.cli.calibrate_printer import print_summary
    from kvq.cli.console import ProgressBar

    with ExitStack() as stack:
        result = calibrate(flags.model, dataset=dataset, data_files=flags.data_files, recipe=recipe, samples=samples,
                           seqlen=seqlen, batch_size=batch_size, seed=seed, histograms=histograms, out=out,
                           force=force, save_every=save_every, resume=resume, loss_windows=loss_windows,
                           device=flags.device, dtype=flags.dtype,
                           trust_remote_code=flags.trust_remote_code, **flags.placement(),
                           progress=ProgressBar(stack, "calibrating", "samples"))
    if result.files:  # under torchrun only rank 0 writes, and reports
        print_summary(result)
        _print_link_note(out)
        if report:
            from kvq import api

            api.report(Path(out))
    return 0


# --- solve --------------------------------------------------------------------------------------


@app.command("solve", cls=KvqCommand,
             short_help="turn saved statistics into scales for a recipe (no model run)")
def solve_command(
    stats: Annotated[Path, input_path("STATS", "stats.safetensors, or the calibration output folder holding it")],
    recipe: Annotated[str, option("--recipe", help="built-in recipe name or YAML path")],
    out: Annotated[str, option("--out", help="output folder for scales.safetensors and scales.json")],
    force: Force = False,
    model: Annotated[str | None, option(
        "--model", help="observer loss only: the model the statistics are of (folder, .gguf or hub id), run on "
        "the statistics' first calibration samples (their data files must still be there)")] = None,
    loss_windows: LossWindows = 4,
) -> int:
    """Solve scales for a recipe from a stats.safetensors written by `kvq calibrate` (no model run, except
    for observer loss, which needs --model)."""
    from rich.console import Console
    from rich.markup import escape

    from kvq.api import solve
    from kvq.cli.calibrate_printer import loss_cost

    scales = solve(stats, recipe, out=out, force=force, model=model, loss_windows=loss_windows)
    console = Console()
    console.print(f"recipe [bold]{escape(scales.recipe.name)}[/] on {scales.num_layers} layers: wrote "
                  + escape(", ".join(str(Path(out) / name) for name in sorted(scales.to_files()))))
    if scales.loss_search is not None:
        console.print(f"observer loss: {escape(loss_cost(scales.loss_search))}")
    _print_link_note(out)
    return 0


def _print_link_note(out: str | Path) -> None:
    from rich.console import Console
    from rich.markup import escape

    from kvq.cli.console import link_note

    note = link_note(out)
    if note is not None:
        Console().print(f"  note: {escape(note)}")


# --- validate -----------------------------------------------------------------------------------


@app.command("validate", cls=KvqCommand,
             short_help="round-trip error of a scales artifact on K/V captured from (held-out) data")
@with_model_flags
def validate_command(
    scales: Annotated[Path, input_path("SCALES", "the calibration output folder (or its scales.safetensors)")],
    dataset: Annotated[str, option("--dataset", help="{datasets}, or a path to local files "
                                   "(named sets load their evaluation split)")],
    flags: ModelFlags,
    samples: Annotated[int, positive("--samples", help="number of samples (default 32)")] = 32,
    seqlen: Annotated[int, positive("--seqlen", help="tokens per sample at most (default 2048)")] = 2048,
    batch_size: Annotated[int, positive("--batch-size", help="samples per forward pass (default 1)")] = 1,
    seed: Seed = 0,
    json: Annotated[str | None, option("--json", metavar="FILE", help="where to write the JSON report "
                                       "(default: validate.json beside the scales)")] = None,
    top: Annotated[int, positive("--top", help="rows of the worst-heads table (default 20)")] = 20,
) -> int:
    """Capture K/V of a model on (ideally held-out) data and report, per layer and KV head, the
    quantize -> dequantize error of the scales: SQNR, RMSE, max |error|, clip rate; worst heads
    first. Writes the full report as JSON (default: validate.json in the scales folder)."""
    flags.check_device()
    from kvq.api import validate
    from kvq.artifacts.scales import scales_path
    from kvq.cli.console import ProgressBar
    from kvq.cli.eval_printer import print_validation, report_console
    from kvq.evaluation.results_json import validation_json, write_json
    from kvq.io.out_policy import check_report_target

    report = Path(json) if json else scales_path(scales).parent / "validate.json"
    check_report_target(report)  # before the model runs, not after
    with ExitStack() as stack:
        result = validate(scales, flags.model, dataset=dataset, data_files=flags.data_files, samples=samples,
                          seqlen=seqlen, batch_size=batch_size, seed=seed, device=flags.device, dtype=flags.dtype,
                          trust_remote_code=flags.trust_remote_code, **flags.placement(),
                          progress=ProgressBar(stack, "validating", "samples"))
    console = report_console()
    print_validation(result, top=top, console=console)
    write_json(report, validation_json(result))
    console.print(f"report: {report}")
    return 0


# --- eval ---------------------------------------------------------------------------------------


@app.command("eval", cls=KvqCommand,
             short_help="perplexity with the KV cache fake-quantized, recipes side by side with the baseline")
@with_model_flags
def eval_command(
    flags: ModelFlags,
    dataset: Annotated[str, option("--dataset", help="{datasets}, or a path to local files (named sets load "
                                   "their evaluation split; default wikitext2)")] = "wikitext2",
    scales: Annotated[list[Path] | None, option(
        "--scales", metavar="DIR", exists=True,
        help="a calibration output folder (or scales.safetensors); repeat to compare several")] = None,
    recipe: Annotated[list[str] | None, option(
        "--recipe", metavar="NAME", help="an eval-only recipe, repeatable: {eval_recipes}")] = None,
    plan: Annotated[list[Path] | None, option(
        "--plan", metavar="PLAN", exists=True,
        help="a plan.json from `kvq plan` (or the artifact folder holding it): its layers stay unquantized; "
        "shown next to its artifact with every layer quantized; repeatable")] = None,
    samples: Annotated[int | None, positive("--samples", help="number of windows (default: every full window "
                                            "of the text)")] = None,
    seqlen: Annotated[int, positive("--seqlen", help="tokens per window (default 2048)")] = 2048,
    batch_size: Annotated[int, positive("--batch-size", help="windows per forward pass (default 1)")] = 1,
    json: Annotated[str | None, option("--json", metavar="FILE", help="also write the table as JSON to FILE")
                    ] = None,
    no_attention_error: Annotated[bool, option("--no-attention-error", help="skip the per-layer attention-output "
                                               "error (saves the attention re-runs)")] = False,
    no_fp8_fallback: Annotated[bool, option("--no-fp8-fallback", help="do not add the fp8 scale = 1.0 row next "
                                            "to fp8 artifacts")] = False,
    report: Annotated[bool, option("--report", help="with --json: also write the report of each --scales "
                                   "artifact (kvq report DIR --eval FILE)")] = False,
    generate: Annotated[int | None, positive("--generate", help="also generate N tokens greedily from "
                                             "held-out prompts per row: the share of tokens equal to the unquantized "
                                             "model's, and where the first differs")] = None,
    generate_prompts: Annotated[int, positive("--generate-prompts", help="prompts for --generate: the first "
                                              "windows, cut to --seqlen minus N tokens (default 8)")] = 8,
) -> int:
    """Perplexity of the model with its KV cache fake-quantized at the cache write (attention reads the
    quantized K/V, as in an engine), next to the unquantized baseline, the fp8 scale = 1.0 fallback
    for fp8 artifacts, and run-time dynamic modes; also the per-layer attention-output error and the
    KV-cache bytes per token each saves. Non-overlapping windows of --seqlen tokens from the start
    of the text (docs/evaluate.md)."""
    flags.check_device()
    from kvq.api import evaluate
    from kvq.cli.console import ProgressBar
    from kvq.cli.eval_printer import print_eval, report_console
    from kvq.evaluation.results_json import eval_json, write_json
    from kvq.io.out_policy import check_report_target

    if report and not json:
        raise UsageError("--report needs --json FILE (the report is drawn from it)", hint="add --json eval.json")
    if json:
        check_report_target(json)  # before the model runs, not after
    with ExitStack() as stack:
        result = evaluate(flags.model, scales=paths_arg(scales), recipes=recipe, plans=paths_arg(plan),
                          dataset=dataset, data_files=flags.data_files, samples=samples, seqlen=seqlen,
                          batch_size=batch_size, attention_error=not no_attention_error,
                          fp8_fallback=not no_fp8_fallback, generate=generate, generate_prompts=generate_prompts,
                          device=flags.device, dtype=flags.dtype,
                          trust_remote_code=flags.trust_remote_code, **flags.placement(),
                          progress=ProgressBar(stack, "evaluating", "windows"))
    console = report_console()
    print_eval(result, console=console)
    if json:
        console.print(f"table: {write_json(json, eval_json(result))}")
    if report:
        from kvq import api
        from kvq.artifacts.scales import scales_path

        for artifact in paths_arg(scales) or []:
            console.print(f"report: {api.report(scales_path(artifact).parent, eval_json=json)[0].parent}")
    return 0


app.command("plan", cls=KvqCommand, short_help=PLAN_SHORT_HELP)(with_model_flags(plan_command))
app.command("report", cls=KvqCommand, short_help=REPORT_SHORT_HELP)(report_command)


# --- export-scales ------------------------------------------------------------------------------


@app.command("export-scales", cls=KvqCommand,
             short_help="write calibrated scales in the form a serving engine loads (vLLM, SGLang, TRT-LLM, ...)")
def export_scales_command(
    artifact: Annotated[Path, input_path("ARTIFACT",
                                         "scales.safetensors, or the calibration output folder holding it")],
    export_format: Annotated[str, option("--format", parser=parse_export_format, metavar="FORMAT",
                               help="vllm / modelopt: checkpoint folder; sglang-json: one JSON file; "
                               "trtllm: TensorRT-LLM checkpoint ranks; lmdeploy: TurboMind parameter files")],
    out: Annotated[str, option("--out", help="output folder (output file for sglang-json)")],
    model: Annotated[str | None, option(
        "--model", help="the model the scales are for: HF checkpoint folder, .gguf file or hub id (vllm and "
        "modelopt need its files; default there: the embedded SmolLM2-135M-Instruct). Other formats check "
        "against it when given, else use the shape the artifact records")] = None,
    tp: Annotated[int, positive("--tp", help="tensor-parallel size the engine runs with (sglang-json, trtllm, "
                                "lmdeploy; default 1)")] = 1,
    reduce: Annotated[str | None, option(
        "--reduce", parser=parse_reduction, metavar="HOW",
        help="merge finer scales (per channel / per head) into what the format holds by taking their maximum "
        "(exact for symmetric scales); without it such an export is refused")] = None,
    force: Annotated[bool, option("--force", help="replace an existing non-empty --out")] = False,
    legacy: Annotated[bool, option("--legacy", help="write a format that only older engine releases apply "
                                   "(sglang-json, lmdeploy; the refusal without it names the releases)")] = False,
    trtllm_checkpoint: Annotated[Path | None, option(
        "--trtllm-checkpoint", metavar="DIR", exists=True, file_okay=False,
        help="(trtllm) a TensorRT-LLM checkpoint from convert_checkpoint.py to merge the scales into")] = None,
) -> int:
    """Turn scales.safetensors (or a calibration output folder) into exactly what an engine reads,
    after checking the scales against the model. Refuses what a format cannot express; reduces finer
    scales only with --reduce max. Formats and engine flags: docs/engines.md."""
    from rich.console import Console
    from rich.markup import escape

    from kvq.api import export_scales

    result = export_scales(artifact, export_format, out=out, model=model, tp=tp, reduce=reduce, force=force,
                           trtllm_checkpoint=trtllm_checkpoint, legacy=legacy)
    console = Console()
    linked = f", {result.linked} model file(s) linked" if result.linked else ""
    copied = f", {result.copied} copied" if result.copied else ""
    console.print(f"[bold]{result.export_format}[/]: wrote {escape(str(result.out))} "
                  f"({len(result.written)} new file(s){linked}{copied})")
    _print_link_note(result.out)
    for note in result.notes:
        console.print(f"  note: {escape(note)}")
    for warning in result.warnings:
        console.print(f"  [yellow]warning:[/] {escape(warning)}")
    for command in result.serve:
        console.print(f"  serve: {escape(command)}")
    return 0


# --- inspect ------------------------------------------------------------------------------------


@app.command("inspect", cls=KvqCommand,
             short_help="report the KV-cache scales of any checkpoint or kvq output, and their defects")
def inspect_command(
    path: Annotated[Path, input_path("PATH", "a checkpoint folder, TensorRT-LLM checkpoint, SGLang scales JSON, "
                                     "LMDeploy past_kv_scale folder, or kvq artifact")],
    tp: Annotated[int | None, positive("--tp", help="check that per-head scales split over this tensor-parallel "
                                       "size (and per-rank files are written for it)")] = None,
    model: Annotated[str | None, option(
        "--model", help="the model the scales should be for (folder, .gguf or hub id; its config only is read): "
        "checks layers, heads and the config hash the artifact records")] = None,
    stats: Annotated[Path | None, option(
        "--stats", metavar="STATS", exists=True,
        help="a stats.safetensors of the same model: per layer, the share of observed ranges each scale clips")
                     ] = None,
    json: Annotated[str | None, option("--json", metavar="FILE", help="also write the report as JSON to FILE")
                    ] = None,
) -> int:
    """Read the KV-cache scales of PATH without loading model weights and report the declared scheme,
    the scale tensors per layer, their defects and which engines apply them. Exit 0 when clean,
    1 when a defect is found. docs/inspect.md."""
    from kvq.api import inspect
    from kvq.cli.eval_printer import report_console
    from kvq.cli.inspect_printer import print_inspection
    from kvq.evaluation.results_json import write_json
    from kvq.inspection.inspect_json import inspection_json

    result = inspect(path, tp=tp, model=model, stats=stats)
    console = report_console()
    print_inspection(result, console)
    if json:
        console.print(f"report: {write_json(json, inspection_json(result))}")
    return 0 if result.clean else 1
