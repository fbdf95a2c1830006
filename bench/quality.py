"""Quality of every built-in recipe on SmolLM2: WikiText-2 perplexity next to the baseline.

    python bench/quality.py [--model M] [--cal-samples 32] [--cal-seqlen 512] [--windows 16]
                            [--seqlen 512] [--batch-size 1] [--device cpu|cuda] [--dtype D]
                            [--no-attention-error] [--json FILE]

1. Calibrate ONCE: the model runs over ``--cal-samples`` samples of ``--cal-seqlen`` tokens of the C4
   validation sample (``../shared/data/c4-en-validation-sample.jsonl``, seed 0) and records K/V
   statistics (``kvq.calibration.collect_stats``).
2. ``solve`` every built-in recipe (``recipes/*.yaml``) from those same statistics.
3. Evaluate, on the first ``--windows`` non-overlapping ``--seqlen``-token windows of the WikiText-2
   test split (``../shared/data/wikitext-2-raw-test.txt``), the perplexity of the unquantized model,
   of every solved recipe (nvfp4-kv and fp8-e4m3fnuz-per-tensor among them), of fp8 e4m3 per tensor with a
   calibrated per-head query scale (FP8 attention quantizes the query), of fp8 e4m3 / e5m2 with scale = 1.0
   (vLLM's uncalibrated default), of FP8 attention with every scale 1.0, of nvfp4 with global scale 1.0, and of
   the dynamic per-token modes (LMDeploy int8 / int4), all on the same windows
   (``kvq.evaluation.measure``), with the per-layer attention-output error.
4. Check the targets and print PASS / FAIL: int8 asymmetric per head within 0.1% of the baseline
   perplexity; fp8 e4m3 calibrated (per tensor and per head) no worse than fp8 e4m3 with scale 1.0.

Exit status 0 when every target passes, 1 otherwise. The defaults run in a few minutes on a 2-core
CPU; raise ``--windows`` / ``--seqlen`` / ``--cal-samples`` for tighter figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvq.calibration import collect_stats  # noqa: E402
from kvq.cli.console import progress_bar  # noqa: E402
from kvq.cli.eval_printer import print_eval, report_console  # noqa: E402
from kvq.data import batches, load_documents, select_samples  # noqa: E402
from kvq.evaluation import (  # noqa: E402
    DYNAMIC_RECIPES,
    DynamicQuantizer,
    EvalResult,
    StaticQuantizer,
    UnitScaleQuantizer,
    eval_windows,
    measure,
)
from kvq.evaluation.perplexity import paired_stderr  # noqa: E402
from kvq.evaluation.results_json import eval_json, write_json  # noqa: E402
from kvq.model.loading import load_model  # noqa: E402
from kvq.recipe.schema import builtin_recipe_names, load_recipe, parse_recipe  # noqa: E402
from kvq.solving.solver import solve_scales  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
INT8_TARGET_PCT = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--cal-data", default=str(SHARED / "c4-en-validation-sample.jsonl"))
    p.add_argument("--eval-data", default=str(SHARED / "wikitext-2-raw-test.txt"))
    p.add_argument("--cal-samples", type=int, default=32)
    p.add_argument("--cal-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (0 = the whole text)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-attention-error", action="store_true")
    p.add_argument("--json", default=None, help="also write the table as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in (args.cal_data, args.eval_data):
        if not Path(path).is_file():
            sys.exit(f"bench/quality.py: {path} not found (the shared data folder sits beside the repository)")
    console = report_console()
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # 1. calibrate once
    cal = load_documents("c4", [args.cal_data], purpose="calibration")
    picked = select_samples(cal.documents, tok, args.cal_samples, args.cal_seqlen, args.seed)
    t0 = time.perf_counter()
    with progress_bar("calibrating", len(picked.token_ids), "samples") as advance:
        stats = collect_stats(loaded.model, batches(picked.token_ids, args.batch_size, pad_id),
                              lambda b: advance(b.num_samples), queries=True)  # query ranges: FP8 attention rows
    stats.check_complete(loaded.info.num_layers)
    cal_seconds = time.perf_counter() - t0

    # 2. solve every built-in recipe from the same statistics
    quantizers = [StaticQuantizer(solve_scales(stats, load_recipe(name)), source="solved from the one calibration")
                  for name in builtin_recipe_names()]
    fp8_attention = parse_recipe({"name": "fp8-e4m3-per-tensor+q-per-head", "format": "fp8_e4m3",
                                  "granularity": "tensor", "query": {"granularity": "head"}}, "bench", "q")
    quantizers.append(StaticQuantizer(solve_scales(stats, fp8_attention), source="K/V and the query calibrated"))
    quantizers += [UnitScaleQuantizer("fp8_e4m3", "fp8_e4m3"), UnitScaleQuantizer("fp8_e5m2", "fp8_e5m2"),
                   UnitScaleQuantizer("fp8_e4m3", "fp8_e4m3", query=True), UnitScaleQuantizer("nvfp4", "nvfp4")]
    quantizers += [DynamicQuantizer(r) for r in DYNAMIC_RECIPES.values()]

    # 3. evaluate everything on the same windows
    evaluation = load_documents("wikitext2", [args.eval_data], purpose="evaluation")
    windows = eval_windows(evaluation.documents, tok, args.seqlen, args.windows or None)
    with progress_bar("evaluating", windows.num_windows, "windows") as advance:
        measurement = measure(loaded.model, windows, quantizers, args.batch_size, not args.no_attention_error,
                              advance)
    dtype = next(loaded.model.parameters()).dtype
    result = EvalResult(loaded.info, dtype, evaluation, windows, measurement, warnings=[])
    console.print(f"calibration: {len(picked.token_ids)} C4 samples x <= {args.cal_seqlen} tokens "
                  f"({picked.total_tokens:,} tokens, {cal_seconds:.0f} s), once; every recipe solved from it")
    print_eval(result, console)

    # 4. targets
    entry = {e.quantizer.name: e for e in measurement.entries}
    base = measurement.baseline.ppl
    checks = []
    int8 = entry["int8-asym-per-head"]
    dev = 100.0 * abs(int8.ppl / base - 1.0)
    checks.append((dev <= INT8_TARGET_PCT, f"int8-asym-per-head within {INT8_TARGET_PCT}% of the baseline: "
                   f"{int8.ppl:.4f} vs {base:.4f} ({dev:.3f}% off, stderr "
                   f"{100 * measurement.delta_stderr(int8):.3f}% over windows)"))
    unit = entry["fp8-e4m3-scale-1.0"]
    for name in ("fp8-e4m3-per-tensor", "fp8-e4m3-per-head"):
        cal = entry[name]
        checks.append((cal.ppl <= unit.ppl, f"{name} no worse than fp8-e4m3 scale 1.0: {cal.ppl:.4f} vs "
                       f"{unit.ppl:.4f} ({100 * (cal.ppl / unit.ppl - 1):+.3f}%, stderr "
                       f"{100 * paired_stderr(cal.window_nll, unit.window_nll, cal.tokens_per_window):.3f}%)"))
    for name, unit_name in (("nvfp4-kv", "nvfp4-scale-1.0"),
                            ("fp8-e4m3-per-tensor+q-per-head", "fp8-e4m3-attention-scale-1.0")):
        cal, unit = entry[name], entry[unit_name]
        checks.append((cal.ppl <= unit.ppl, f"{name} no worse than {unit_name}: {cal.ppl:.4f} vs {unit.ppl:.4f} "
                       f"({100 * (cal.ppl / unit.ppl - 1):+.3f}%, stderr "
                       f"{100 * paired_stderr(cal.window_nll, unit.window_nll, cal.tokens_per_window):.3f}%)"))
    for ok, text in checks:
        console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {text}")
    console.print(f"total {time.perf_counter() - start:.0f} s on {loaded.model.device} "
                  f"({torch.get_num_threads()} threads)")
    if args.json:
        data = eval_json(result)
        data["calibration"] = {"data": args.cal_data, "samples": len(picked.token_ids), "seqlen": args.cal_seqlen,
                               "tokens": picked.total_tokens, "seed": args.seed}
        data["targets"] = [{"pass": ok, "check": text} for ok, text in checks]
        write_json(args.json, data)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
