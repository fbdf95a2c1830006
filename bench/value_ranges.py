"""Why a squared-error observer loses to min/max on int4 per-channel values: local error against perplexity.

    python bench/value_ranges.py [--model M] [--cal-samples 32] [--windows 8] [--seqlen 512] [--device cpu|cuda]

Keys are int4 asymmetric per channel with min/max throughout; only the values' range changes. Steps:

1. Calibrate ONCE (``--cal-samples`` C4 train samples, per-channel histograms) and take two value ranges per layer:
   min/max and the mse observer's (``kvq.solving.observers.observed_range``).
2. On each evaluation set, from one unquantized forward with eager attention (the model's own attention
   probabilities and cache): the squared error of V and of the attention output (probabilities x V error, per
   query head, before o_proj) summed over layers, mse against min/max. These are the objectives a local
   observer can minimise; the held-out data is not the calibration data.
3. Perplexity change against the unquantized model, with the paired standard error over windows:
   * min/max and mse, each also at six nearby scales (the range stretched by 0.2% to 1.3%): the spread over
     nearby scales is the luck of one rounding grid, which the paired standard error over windows does not hold;
   * the min/max range shrunk to 0.9 / 0.8 / 0.6 with every entry outside it kept exact ("no clip"): the cost of
     a finer grid alone, with clipping taken out.

Figures and reading: docs/quality.md (Observers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import held_out  # noqa: E402  (bench/held_out.py: what the held-out benches share)

from kvq.calibration import collect_stats  # noqa: E402
from kvq.data import batches  # noqa: E402
from kvq.evaluation import StaticQuantizer, eval_windows, measure  # noqa: E402
from kvq.evaluation.perplexity import paired_stderr  # noqa: E402
from kvq.quant.qparams import choose_qparams, qrange  # noqa: E402
from kvq.recipe.schema import QuantSpec, parse_recipe  # noqa: E402
from kvq.solving.attention import fake_quantize_range  # noqa: E402
from kvq.solving.observers import observed_range  # noqa: E402
from kvq.solving.solver import solve_scales  # noqa: E402

NEARBY = (1.0, 1.002, 1.004, 1.006, 1.008, 1.01, 1.013)
SHRINK = (0.9, 0.8, 0.6)
Ranges = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (lo, hi), each (kv_heads, head_dim)


def recipe(observer: str):
    data = {"format": "int4", "symmetric": False, "granularity": "channel", "observer": observer}
    return parse_recipe(data, "bench/value_ranges.py", f"int4-asym-per-channel+{observer}")


def round_trip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
               keep_clipped: bool = False) -> torch.Tensor:
    """x (batch, kv_heads, tokens, head_dim) through int4 with the range (lo, hi) (kv_heads, head_dim); entries
    outside the range kept exact when ``keep_clipped``."""
    lo, hi = lo.to(x.device), hi.to(x.device)
    back = fake_quantize_range(x.float(), lo, hi, spec)  # the recipe's quantizer with the scales of [lo, hi]
    if keep_clipped:
        scale, zp = choose_qparams(lo, hi, spec)
        scale, zp = scale[None, :, None, :], zp[None, :, None, :]  # (h, d) -> (1, h, 1, d)
        qmin, qmax = qrange(spec.format)
        low, high = (qmin - zp - 0.5) * scale, (qmax - zp + 0.5) * scale  # the codes' reach, half a step beyond
        back = torch.where((x < low) | (x > high), x.float(), back)
    return back.to(x.dtype)


class ValueRangeQuantizer:
    """Keys through a calibrated quantizer; values through int4 with the given ranges scaled by ``stretch``."""

    kind = "static"
    source = "bench/value_ranges.py"
    quantizes_queries = False

    def __init__(self, name: str, keys: StaticQuantizer, ranges: Ranges, spec: QuantSpec, stretch: float = 1.0,
                 keep_clipped: bool = False):
        self.name, self.keys, self.ranges, self.spec = name, keys, ranges, spec
        self.stretch, self.keep_clipped = stretch, keep_clipped

    def describe(self, which: str) -> str:
        return self.name

    def kv_bytes_per_token(self, shape, model_dtype: torch.dtype) -> float:
        return self.keys.kv_bytes_per_token(shape, model_dtype)

    def quantize(self, x: torch.Tensor, layer_idx: int, which: str) -> torch.Tensor:
        if which == "k":
            return self.keys.quantize(x, layer_idx, which)
        lo, hi = self.ranges[layer_idx]
        return round_trip(x, lo * self.stretch, hi * self.stretch, self.spec, self.keep_clipped)


def local_errors(model, windows, ranges: dict[str, Ranges], spec: QuantSpec) -> dict[str, tuple[float, float]]:
    """Observer -> (squared error of V, squared error of the attention output), summed over layers and windows."""
    out = {name: [0.0, 0.0] for name in ranges}
    with torch.inference_mode():
        for w in range(windows.num_windows):
            run = model(windows.input_ids[w : w + 1].to(model.device), use_cache=True, output_attentions=True)
            for i, attn in enumerate(run.attentions):  # (1, heads, n, n)
                v = run.past_key_values.layers[i].values.float()  # (1, kv_heads, n, d)
                group = attn.shape[1] // v.shape[1]
                for name, r in ranges.items():
                    err = round_trip(v, *r[i], spec).float() - v  # (1, kv_heads, n, d)
                    out_err = attn.float() @ err.repeat_interleave(group, dim=1)  # (1, heads, n, d)
                    out[name][0] += float((err**2).sum())
                    out[name][1] += float((out_err**2).sum())
    return {name: (a, b) for name, (a, b) in out.items()}


def main() -> int:
    parser = held_out.parser(__doc__.split("\n\n")[0])
    parser.set_defaults(windows=8)
    args = parser.parse_args()
    run = held_out.setup(args, "bench/value_ranges.py")
    model, tok = run.loaded.model, run.loaded.tokenizer
    t0 = time.perf_counter()
    stats = collect_stats(model, batches(run.picked.token_ids, 1, run.pad_id), histograms="channel")
    stats.check_complete(run.loaded.info.num_layers)
    keys = StaticQuantizer(solve_scales(stats, recipe("minmax")))
    spec = recipe("mse").value
    ranges = {o: {i: observed_range(layer.v, recipe(o).value) for i, layer in stats.layers.items()}
              for o in ("minmax", "mse")}
    print(f"calibrated once ({len(run.picked.token_ids)} C4 train samples) and solved in {time.perf_counter() - t0:.0f} s")
    quantizers = [ValueRangeQuantizer(f"{o} x{s}", keys, ranges[o], spec, s) for o in ranges for s in NEARBY]
    quantizers += [ValueRangeQuantizer(f"minmax x{s} no clip", keys, ranges["minmax"], spec, s, keep_clipped=True)
                   for s in SHRINK]
    for path in args.eval_data:
        windows = eval_windows(held_out.eval_documents(path), tok, args.seqlen, args.windows)
        attention = model.config._attn_implementation
        model.set_attn_implementation("eager")  # attention probabilities for the local errors
        local = local_errors(model, windows, ranges, spec)
        model.set_attn_implementation(attention)
        (v_mm, o_mm), (v_mse, o_mse) = local["minmax"], local["mse"]
        print(f"\n{Path(path).name}: {windows.num_windows} windows x {windows.seqlen} tokens")
        print(f"  held-out squared error, mse / minmax: V {v_mse / v_mm:.3f}, attention output {o_mse / o_mm:.3f}")
        m = measure(model, windows, quantizers, attention_error=False)
        base = m.baseline
        by_observer: dict[str, list[float]] = {}
        for e in m.entries:
            d = 100 * (e.ppl / base.ppl - 1)
            se = 100 * paired_stderr(e.window_nll, base.window_nll, e.tokens_per_window)
            print(f"  values {e.quantizer.name:24s} {d:+7.2f}% ± {se:.2f}")
            if not e.quantizer.keep_clipped:
                by_observer.setdefault(e.quantizer.name.split()[0], []).append(d)
        for o, ds in by_observer.items():
            t = torch.tensor(ds)
            print(f"  {o} over {len(ds)} nearby scales: mean {t.mean():+.2f}%, standard deviation {t.std():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
