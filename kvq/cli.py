"""The ``kvq`` command line: thin commands over library calls.

Known errors print as one line (``kvq: error: ...``) plus a hint line, and exit 2 for bad usage
(a bad flag, recipe or missing file) or 1 for failures while working. ``KVQ_DEBUG=1`` shows the
traceback instead.

Each command is a pair: ``_add_<command>(subparsers)`` declares its flags, ``_run_<command>(args)``
calls the library.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path

from kvq import __version__
from kvq.errors import KvqError, UsageError

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line error (its default prints usage first)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"kvq: error: {message}\n  hint: run `{self.prog} --help` for the flags\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --trust-remote-code: the flags of every command that runs the model."""
    p.add_argument("--model", default=None, help="HF checkpoint folder, .gguf file or hub id "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the model's own)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")


# --- calibrate ----------------------------------------------------------------------------------


def _add_calibrate(sub) -> None:
    from kvq.data import DATASET_NAMES
    from kvq.recipe import DEFAULT_RECIPE

    p = sub.add_parser(
        "calibrate",
        help="run a model over calibration data, record K/V statistics, solve scales",
        description="Run a model over a calibration set, record per-layer, per-KV-head, per-channel "
        "min/max/absmax of the keys (post-RoPE) and values as the engine caches them, and solve "
        "scales for a recipe. Writes stats.safetensors, scales.safetensors and scales.json.",
    )
    _add_model_flags(p)
    p.add_argument("--dataset", required=True,
                   help=f"{', '.join(DATASET_NAMES)}, or a path to local files")
    p.add_argument("--data-files", nargs="+", default=None, metavar="FILE",
                   help="local jsonl/json/txt/parquet files holding the named dataset (offline)")
    p.add_argument("--samples", type=_positive_int, default=128, help="number of samples (default 128)")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per sample at most (default 2048)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="samples per forward pass (default 1)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"built-in recipe name or YAML path (default {DEFAULT_RECIPE})")
    p.add_argument("--out", default="./kvq-out", help="output folder (default ./kvq-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample selection (default 0)")


def _run_calibrate(args) -> int:
    from kvq.calibrate import CalibrationConfig, calibrate
    from kvq.calibrate.report import print_summary
    from kvq.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # fail on a bad recipe before loading any model
    cfg = CalibrationConfig(
        model=args.model,
        dataset=args.dataset,
        data_files=args.data_files,
        samples=args.samples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    result = calibrate(cfg, recipe, Path(args.out), progress=True)
    print_summary(result)
    return 0


# --- solve --------------------------------------------------------------------------------------


def _add_solve(sub) -> None:
    p = sub.add_parser(
        "solve",
        help="turn saved statistics into scales for a recipe (no model run)",
        description="Solve scales for a recipe from a stats.safetensors written by `kvq calibrate`.",
    )
    p.add_argument("stats", help="stats.safetensors, or the calibration output folder holding it")
    p.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
    p.add_argument("--out", required=True, help="output folder for scales.safetensors and scales.json")


def _run_solve(args) -> int:
    from rich.console import Console

    from kvq.recipe import load_recipe
    from kvq.solver import solve
    from kvq.stats import KVStats

    recipe = load_recipe(args.recipe)
    stats = KVStats.load(args.stats)
    written = solve(stats, recipe).save(Path(args.out))
    Console().print(f"recipe [bold]{recipe.name}[/] on {stats.num_layers} layers: wrote "
                    + ", ".join(str(p) for p in written))
    return 0


# --- validate -----------------------------------------------------------------------------------


def _add_validate(sub) -> None:
    from kvq.data import DATASET_NAMES

    p = sub.add_parser(
        "validate",
        help="round-trip error of a scales artifact on K/V captured from (held-out) data",
        description="Capture K/V of a model on (ideally held-out) data and report, per layer and KV head, the "
        "quantize -> dequantize error of the scales: SQNR, RMSE, max |error|, clip rate; worst heads first. "
        "Writes the full report as JSON (default: validate.json in the scales folder).",
    )
    p.add_argument("scales", help="the calibration output folder (or its scales.safetensors)")
    _add_model_flags(p)
    p.add_argument("--dataset", required=True, help=f"{', '.join(DATASET_NAMES)}, or a path to local files "
                   "(named sets load their evaluation split)")
    p.add_argument("--data-files", nargs="+", default=None, metavar="FILE",
                   help="local jsonl/json/txt/parquet files holding the dataset (offline)")
    p.add_argument("--samples", type=_positive_int, default=32, help="number of samples (default 32)")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per sample at most (default 2048)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="samples per forward pass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample selection (default 0)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the JSON report (default: validate.json beside the scales)")
    p.add_argument("--top", type=_positive_int, default=20, help="rows of the worst-heads table (default 20)")


def _run_validate(args) -> int:
    from kvq.evaluate.report import (
        print_validation,
        progress_bar,
        report_console,
        validation_json,
        write_json,
    )
    from kvq.evaluate.validate import ValidateConfig, validate

    cfg = ValidateConfig(scales=args.scales, model=args.model, dataset=args.dataset, data_files=args.data_files,
                         samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
                         device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    with ExitStack() as stack:

        def on_start(samples: int, tokens: int):
            advance = stack.enter_context(progress_bar("validating", samples, "samples"))
            return lambda batch: advance(batch.num_samples)

        result = validate(cfg, on_start)
    out = Path(args.json) if args.json else result.scales_path.parent / "validate.json"
    write_json(out, validation_json(result))
    console = report_console()
    print_validation(result, top=args.top, console=console)
    console.print(f"report: {out}")
    return 0


# --- eval ---------------------------------------------------------------------------------------


def _add_eval(sub) -> None:
    from kvq.data import DATASET_NAMES
    from kvq.evaluate.dynamic import EVAL_ONLY_RECIPE_NAMES

    p = sub.add_parser(
        "eval",
        help="perplexity with the KV cache fake-quantized, recipes side by side with the baseline",
        description="Perplexity of the model with its KV cache fake-quantized at the cache write (attention reads "
        "the quantized K/V, as in an engine), next to the unquantized baseline, the fp8 scale = 1.0 fallback "
        "for fp8 artifacts, and run-time dynamic modes; also the per-layer attention-output error and the "
        "KV-cache bytes per token each saves. Non-overlapping windows of --seqlen tokens from the start of "
        "the text (docs/evaluate.md).",
    )
    _add_model_flags(p)
    p.add_argument("--dataset", default="wikitext2", help=f"{', '.join(DATASET_NAMES)}, or a path to local files "
                   "(named sets load their evaluation split; default wikitext2)")
    p.add_argument("--data-files", nargs="+", default=None, metavar="FILE",
                   help="local jsonl/json/txt/parquet files holding the dataset (offline)")
    p.add_argument("--scales", action="append", default=[], metavar="DIR",
                   help="a calibration output folder (or scales.safetensors); repeat to compare several")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME",
                   help=f"an eval-only recipe, repeatable: {', '.join(EVAL_ONLY_RECIPE_NAMES)}")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="number of windows (default: every full window of the text)")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON to FILE")
    p.add_argument("--no-attention-error", action="store_true",
                   help="skip the per-layer attention-output error (saves the attention re-runs)")
    p.add_argument("--no-fp8-fallback", action="store_true",
                   help="do not add the fp8 scale = 1.0 row next to fp8 artifacts")


def _run_eval(args) -> int:
    from kvq.evaluate.perplexity import EvalConfig, run_eval
    from kvq.evaluate.report import eval_json, print_eval, progress_bar, report_console, write_json

    cfg = EvalConfig(model=args.model, dataset=args.dataset, data_files=args.data_files, scales=args.scales,
                     recipes=args.recipe, samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size,
                     device=args.device, dtype=args.dtype, attention_error=not args.no_attention_error,
                     fp8_fallback=not args.no_fp8_fallback, trust_remote_code=args.trust_remote_code)
    with ExitStack() as stack:

        def on_start(windows: int):
            return stack.enter_context(progress_bar("evaluating", windows, "windows"))

        result = run_eval(cfg, on_start)
    console = report_console()
    print_eval(result, console=console)
    if args.json:
        console.print(f"table: {write_json(args.json, eval_json(result))}")
    return 0


# --- export-scales ------------------------------------------------------------------------------


def _add_export_scales(sub) -> None:
    from kvq.export import FORMATS, REDUCTIONS

    p = sub.add_parser(
        "export-scales",
        help="write calibrated scales in the form a serving engine loads (vLLM, SGLang, TRT-LLM, ...)",
        description="Turn scales.safetensors (or a calibration output folder) into exactly what an engine "
        "reads, after checking the scales against the model. Refuses what a format cannot express; "
        "reduces finer scales only with --reduce max. Formats and engine flags: docs/engines.md.",
    )
    p.add_argument("artifact", help="scales.safetensors, or the calibration output folder holding it")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                   help="vllm / modelopt: checkpoint folder; sglang-json: one JSON file; "
                   "trtllm: TensorRT-LLM checkpoint ranks; lmdeploy: TurboMind parameter files")
    p.add_argument("--model", default=None,
                   help="the model the scales are for: HF checkpoint folder, .gguf file or hub id "
                   "(vllm and modelopt need its files; default there: the embedded SmolLM2-135M-Instruct). "
                   "Other formats check against it when given, else use the shape the artifact records")
    p.add_argument("--out", required=True, help="output folder (output file for sglang-json)")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel size the engine runs with (sglang-json, trtllm, lmdeploy; default 1)")
    p.add_argument("--reduce", choices=REDUCTIONS, default=None,
                   help="merge finer scales (per channel / per head) into what the format holds by taking "
                   "their maximum (exact for symmetric scales); without it such an export is refused")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--trtllm-checkpoint", default=None, metavar="DIR",
                   help="(trtllm) a TensorRT-LLM checkpoint from convert_checkpoint.py to merge the scales into")


def _run_export_scales(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from kvq.export import export_scales

    result = export_scales(args.artifact, args.fmt, out=args.out, model=args.model, tp=args.tp,
                           reduce=args.reduce, force=args.force, trtllm_checkpoint=args.trtllm_checkpoint)
    console = Console()
    linked = f", {result.linked} model file(s) linked" if result.linked else ""
    console.print(f"[bold]{result.format}[/]: wrote {escape(str(result.out))} "
                  f"({len(result.written)} new file(s){linked}{', ' + str(result.copied) + ' copied' if result.copied else ''})")
    for note in result.notes:
        console.print(f"  note: {escape(note)}")
    return 0


# --- main ---------------------------------------------------------------------------------------

COMMANDS = {
    "calibrate": (_add_calibrate, _run_calibrate),
    "solve": (_add_solve, _run_solve),
    "validate": (_add_validate, _run_validate),
    "eval": (_add_eval, _run_eval),
    "export-scales": (_add_export_scales, _run_export_scales),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvq", description="Calibrate KV-cache quantization for LLM serving engines.")
    parser.add_argument("--version", action="version", version=f"kvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except KvqError as exc:
        if os.environ.get("KVQ_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(f"kvq: error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"  hint: {exc.hint}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("kvq: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main", "build_parser", "UsageError", "EXIT_USAGE", "EXIT_FAILURE"]
