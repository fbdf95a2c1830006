"""``kvq plan``: the layers to keep unquantized for a budget, written into the artifact (docs/plan.md).

Registered on the app in :mod:`kvq.cli.commands` (kept apart so that module stays small).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Literal

from kvq.cli.params import ModelFlags, input_path, option, positive

SHORT_HELP = "measure each layer's sensitivity and choose the layers to keep unquantized (plan.json)"


def plan_command(
    scales: Annotated[Path, input_path("ARTIFACT", "the calibration output folder (or its scales.safetensors); "
                                       "plan.json is written there")],
    dataset: Annotated[str, option("--dataset", help="{datasets}, or a path to local files (named sets load "
                                   "their evaluation split)")],
    flags: ModelFlags,
    skip: Annotated[int | None, positive("--skip", help="keep the N most sensitive layers unquantized")] = None,
    bytes_per_token: Annotated[float | None, option(
        "--bytes-per-token", metavar="B", help="instead of --skip: keep the most sensitive layers unquantized "
        "while the KV cache takes at most B bytes per token (skipped layers at the model dtype)")] = None,
    keep_sliding_window: Annotated[bool, option(
        "--keep-sliding-window", help="instead of --skip: keep every sliding-window layer unquantized (the "
        "model config's layer_types; their cache is bounded by the window)")] = False,
    by: Annotated[Literal["attention", "perplexity"], option(
        "--by", help="sensitivity measure: attention (relative attention-output error of each layer, one "
        "forward; default) or perplexity (NLL change with only that layer quantized, one forward per layer)")
    ] = "attention",
    samples: Annotated[int, positive("--samples", help="number of windows (default 8)")] = 8,
    seqlen: Annotated[int, positive("--seqlen", help="tokens per window (default 512)")] = 512,
    batch_size: Annotated[int, positive("--batch-size", help="windows per forward pass (default 1)")] = 1,
    force: Annotated[bool, option("--force", help="write plan.json into a folder that holds files other than a "
                                  "kvq artifact's")] = False,
) -> int:
    """Measure, on evaluation windows, how much each layer's quantized KV cache costs with only that
    layer quantized (attention-output error, or perplexity with --by perplexity), choose the layers to
    keep unquantized for the budget (--skip N, --bytes-per-token B, or --keep-sliding-window), write plan.json into the
    artifact and print the engine flags that apply it (vLLM: --kv-cache-dtype-skip-layers).
    `kvq eval --plan ARTIFACT` evaluates the plan. docs/plan.md."""
    flags.check_device()
    from kvq.api import plan
    from kvq.cli.console import ProgressBar
    from kvq.cli.eval_printer import print_plan, report_console

    with ExitStack() as stack:
        result = plan(scales, flags.model, dataset=dataset, data_files=flags.data_files, skip=skip,
                      bytes_per_token=bytes_per_token, keep_sliding_window=keep_sliding_window, by=by,
                      samples=samples, seqlen=seqlen, batch_size=batch_size, force=force, device=flags.device, dtype=flags.dtype, trust_remote_code=flags.trust_remote_code,
                      **flags.placement(), progress=ProgressBar(stack, f"measuring ({by})", "windows"))
    print_plan(result, report_console())
    return 0
