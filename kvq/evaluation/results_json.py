"""``kvq validate`` and ``kvq eval`` results as JSON (what ``--json`` writes and ``kvq report`` reads).

JSON numbers that are not finite (an SQNR of +inf where the error is exactly 0) are written as
``null``: JSON has no infinity. The console tables are :mod:`kvq.cli.eval_printer`.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvq import __version__
from kvq.artifacts.files import json_bytes
from kvq.evaluation.perplexity import EvalResult, Measured
from kvq.evaluation.quant_cache import PartialQuantizer
from kvq.evaluation.round_trip import HeadError, ValidationResult
from kvq.io.atomic import write_file
from kvq.model.model_spec import KVShape

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
                  "num_kv_heads": info.num_kv_heads, "head_dim": info.head_dim, "cached_layers": list(info.kv_layers),
                  **layer_shapes(info.shape)},
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
    gen = result.generation
    agreements = [None, *([None] * len(m.entries))] if gen is None else [gen.baseline, *gen.rows]
    for entry, agreement in zip((m.baseline, *m.entries), agreements, strict=True):
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
            "generation": None if agreement is None else agreement.to_json(),
        }
        rows.append(row)
    return rows


GENERATION_METHOD = ("per prompt (the first evaluation windows cut to seqlen - tokens), tokens generated greedily "
                     "with the quantized cache stored and read back; agreement: share of positions whose token is the "
                     "plain model's; first_difference: tokens before the first that differs (tokens when none), mean "
                     "and standard error over prompts")


def eval_json(result: EvalResult) -> dict:
    info = result.info
    w = result.windows
    return {
        "kvq_version": __version__,
        "report": "eval",
        "model": {"id": info.model_id, "config_hash": info.config_hash, "dtype": str(result.model_dtype).removeprefix("torch."),
                  "num_layers": info.num_layers, "num_kv_heads": info.num_kv_heads, "head_dim": info.head_dim,
                  "cached_layers": list(info.kv_layers), **layer_shapes(info.shape)},
        "data": {"dataset": result.dataset.name, "origin": result.dataset.origin, "files": list(result.dataset.files),
                 "windows": w.num_windows, "seqlen": w.seqlen, "predicted_tokens": w.predicted_tokens,
                 "documents_used": w.documents_used},
        "method": {"perplexity": PERPLEXITY_METHOD, "attention_error": ATTENTION_ERROR_METHOD,
                   "delta_pct_stderr": "one standard error, in percent, of the mean per-token NLL difference to "
                   "the baseline across windows (paired; ppl ratio ~ exp(difference))",
                   "kv_bytes_per_token": "K and V codes of every layer and KV head for one token, plus per-token "
                   "scale/zero-point bytes for dynamic modes (static scales cost nothing per token)"},
        "generation": None if result.generation is None else {
            "tokens": result.generation.tokens, "prompt_tokens": result.generation.prompt_tokens,
            "prompts": len(result.generation.reference), "method": GENERATION_METHOD},
        "seconds": result.measurement.seconds,
        "warnings": list(result.warnings),
        "rows": eval_rows(result),
    }


def _query_text(q) -> str | None:
    """How FP8 attention's query is quantized (``fp8_e4m3 per head``), None when it is not."""
    recipe = getattr(q, "recipe", None)  # the baseline and dynamic quantizers have no query spec
    if not q.quantizes_queries or recipe is None or recipe.query is None:
        return None
    return f"{recipe.query.format} per {recipe.query.granularity}"


def layer_shapes(shape: KVShape) -> dict[str, dict[str, dict[str, list[int]]]]:
    """``{"kv_shapes": {"i": {"k": [heads, dim], "v": [heads, dim]}}}`` per cached layer when the layers' shapes
    differ; {} for a uniform shape (num_kv_heads x head_dim says it)."""
    if shape.uniform:
        return {}
    return {"kv_shapes": {str(i): {w: list(shape.of(i).of(w)) for w in ("k", "v")} for i in shape.kv_layers}}
