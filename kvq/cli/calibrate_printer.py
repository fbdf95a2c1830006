"""What a calibration run shows when it ends: a summary table (its progress bar is :class:`kvq.cli.console.ProgressBar`)."""

from __future__ import annotations

import json
from collections import Counter

import torch
from rich.console import Console

from kvq.artifacts.stats import KVStats
from kvq.calibration.pipeline import CalibrationResult
from kvq.cli.console import summary_table
from kvq.model.mla import is_mla
from kvq.solving.loss import LossSearch
from kvq.solving.row_scale import shares_row_scale


def largest_absmax(stats: KVStats, which: str) -> tuple[float, int, int, int]:
    """(value, layer, kv head, channel) of the largest |K| or |V| seen."""
    best = (-1.0, -1, -1, -1)
    for i, layer in stats.layers.items():
        absmax = (layer.k if which == "k" else layer.v).absmax  # (heads, dim)
        flat = int(torch.argmax(absmax))
        value = float(absmax.flatten()[flat])
        if value > best[0]:
            best = (value, i, flat // absmax.shape[1], flat % absmax.shape[1])
    return best


def loss_cost(search: LossSearch) -> str:
    """The loss observer's choices in short and its cost, for one table row or line."""
    picked = Counter(name for layer in search.choices.values() for name in layer.values())
    shown = ", ".join(f"{name} x{n}" for name, n in sorted(picked.items()))
    return (f"{search.windows} window(s), {search.forwards} forward passes, {search.seconds_per_layer:.2f} s per layer "
            f"({search.seconds:.1f} s, of which {search.candidate_seconds:.1f} s computing the candidates); started from "
            f"{search.start}, chose {shown}")


def print_summary(result: CalibrationResult, console: Console | None = None) -> None:
    console = console or Console()
    info = result.info
    table = summary_table("kvq calibration")
    table.add_row("model", f"{info.model_id} ({info.model_type}, config {info.config_hash})")
    if info.shape.uniform:
        table.add_row("layers x kv heads x head_dim", f"{info.num_layers} x {info.num_kv_heads} x {info.head_dim}")
    else:
        table.add_row("KV cache shape", info.shape.text())
    if not info.shape.all_layers_cached:
        table.add_row("layers with a KV cache", f"{len(info.kv_layers)} of {info.num_layers}: "
                      + ", ".join(map(str, info.kv_layers))
                      + " (the others keep a recurrent state or read another layer's cache: not calibrated)")
    meta = result.stats.metadata
    table.add_row("data", f"{meta.get('dataset')} ({meta.get('dataset_origin')}), "
                  f"{result.samples} samples from {meta.get('documents_used')} documents, seqlen {meta.get('seqlen')}")
    rate = result.tokens / result.seconds if result.seconds > 0 else float("nan")
    table.add_row("tokens seen", f"{result.tokens:,} per layer ({rate:,.0f} tok/s, {result.seconds:.1f} s), dtype {meta.get('dtype')}")
    for which, name in (("k", "largest |K|"), ("v", "largest |V|")):
        value, layer, head, channel = largest_absmax(result.stats, which)
        table.add_row(name, f"{value:.4g} at layer {layer}, kv head {head}, channel {channel}")
    r = result.scales.recipe
    table.add_row("recipe", f"{r.name}: K {r.key.format} {'sym' if r.key.symmetric else 'asym'} per {r.key.granularity}, "
                  f"V {r.value.format} {'sym' if r.value.symmetric else 'asym'} per {r.value.granularity}")
    if is_mla(meta):
        shared = shares_row_scale(r)
        table.add_row("MLA latent row", "K is the compressed latent, V the rotary key part; "
                      + ("one scale per layer for both, as vLLM writes the row" if shared else
                         "K and V scales as the recipe says, which vLLM cannot apply to MLA (the export refuses them)"))
    if r.transforms:
        table.add_row("transforms", ", ".join(json.dumps(t.model_dump(mode="json")) for t in r.transforms)
                      + " (folded into the weights before calibrating; transforms.safetensors)")
    if result.scales.loss_search is not None:
        table.add_row("observer loss", loss_cost(result.scales.loss_search))
    table.add_row("files written", "\n".join(str(p) for p in result.files))
    console.print(table)
    if int(meta.get("samples", 0)) < int(meta.get("samples_requested", 0)):
        console.print(f"[yellow]note:[/] the dataset gave {meta['samples']} samples of the {meta['samples_requested']} "
                      "asked for (every document used in full)")
