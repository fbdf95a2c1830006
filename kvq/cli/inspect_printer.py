"""What `kvq inspect` shows on the console: a compact rich table of the scales, their defects and the engines."""

from __future__ import annotations

import math
import re
from collections import defaultdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvq.inspection.found import ROLE_NAME, ScaleEntry
from kvq.inspection.inspect_json import ROLES
from kvq.inspection.inspect_path import Inspection


def _summary(entry: ScaleEntry) -> str:
    values = [float(x) for x in entry.values.flatten().tolist()]
    if len(values) == 1:
        return f"{values[0]:.6g}"
    finite = [x for x in values if math.isfinite(x)]
    if not finite:
        return f"{len(values)} x nan/inf"
    return f"{min(finite):.4g}..{max(finite):.4g} ({len(values)})"


_INDICES = ((re.compile(r"scaling_factor\.\d+\.\d+$"), "scaling_factor.{r}.{i}"),
            (re.compile(r"layers\.\d+\."), "layers.{i}."), (re.compile(r"past_kv_scale\.\d+\."), "past_kv_scale.{r}."),
            (re.compile(r"^rank\d+\."), "rank{r}."))


def _pattern(name: str) -> str:
    """A tensor or file name with its layer ({i}) and rank ({r}) numbers replaced."""
    for pattern, replacement in _INDICES:
        name = pattern.sub(replacement, name, count=1)
    return name


def _header(result: Inspection, console: Console) -> None:
    f, s = result.found, result.shape
    console.print(f"[bold]{escape(str(f.path))}[/]: {f.kind}")
    if f.scheme is None:
        console.print("  scheme: none declared")
    else:
        console.print(f"  scheme: {escape(f.scheme.text)} ({escape(f.scheme.declared_in)})")
    dims = [f"{s.num_layers if s.num_layers is not None else '?'} layers",
            f"{s.num_kv_heads if s.num_kv_heads is not None else '?'} KV heads",
            f"head_dim {s.head_dim if s.head_dim is not None else '?'}"]
    if s.layers is not None:  # layers of different K/V shapes
        dims[1:] = ["K/V heads x dim per layer " + ", ".join(f"{i}: {kv.text()}" for i, kv in list(s.layers.items())[:8])
                    + (" ..." if len(s.layers) > 8 else "")]
    console.print(f"  model: {', '.join(dims)} ({escape(s.source)})" + (f", {f.ranks} TP rank(s)" if f.ranks else ""))
    shapes: dict[tuple[str, str, str], set] = defaultdict(set)
    for e in f.entries:
        shapes[(e.role, _pattern(e.name), _pattern(e.file))].add(e.shape)
    for (role, pattern, file), seen in sorted(shapes.items(), key=lambda x: ROLES.index(x[0][0])):
        console.print(f"  {ROLE_NAME[role]}: {escape(pattern)} shape {', '.join(map(str, sorted(seen)))} "
                      f"in {escape(file)}")


def _table(result: Inspection) -> Table:
    f = result.found
    roles = [r for r in ROLES if any(e.role == r for e in f.entries)]
    bad = {(d.layer, d.tensor) for d in result.defects}
    per_rank = any(e.rank is not None for e in f.entries)
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("layer", justify="right")
    if per_rank:
        table.add_column("rank", justify="right")
    for role in roles:
        table.add_column(ROLE_NAME[role], justify="right")
    clip = {(c.layer, c.role): c for c in result.clipping}
    if clip:
        table.add_column("K clip (share, worst)", justify="right")
        table.add_column("V clip (share, worst)", justify="right")
    cells: dict[tuple[int, int | None], dict[str, str]] = defaultdict(dict)
    for e in f.entries:
        text = escape(_summary(e))
        cells[(e.layer, e.rank)][e.role] = f"[red]{text} ![/]" if (e.layer, e.name) in bad else text
    for (layer, rank), row in sorted(cells.items(), key=lambda x: (x[0][0], x[0][1] or 0)):
        columns = [str(layer)] + ([str(rank)] if per_rank else []) + [row.get(r, "-") for r in roles]
        if clip:
            for role in ("k", "v"):
                c = clip.get((layer, role))
                columns.append("-" if c is None or rank not in (None, 0) else f"{c.share:.1%}, {c.worst:.3g}x")
        table.add_row(*columns)
    return table


def print_inspection(result: Inspection, console: Console) -> None:
    _header(result, console)
    if result.found.entries:
        console.print(_table(result))
    else:
        console.print("  no KV-cache scale tensors")
    for note in result.found.notes:
        console.print(f"  note: {escape(note)}")
    if result.engines:
        engines = Table(title="engines", title_justify="left", show_edge=False, box=None, header_style="bold")
        for name in ("engine", "versions", "backend", "verdict", "note"):
            engines.add_column(name)
        for row in result.engines:
            engines.add_row(*(escape(x) for x in (row.engine, row.versions, row.backend, row.verdict, row.note)))
        console.print(engines)
    elif result.found.entries:
        console.print("  engines: no row of kvq's engine matrix reads this kind of file (docs/engines.md)")
    if result.defects:
        console.print(f"[bold red]{len(result.defects)} defect(s):[/]")
        for d in result.defects:
            console.print(f"  [red]{d.kind}[/]: {escape(d.message)}")
    else:
        console.print("[bold green]no defects[/]")
