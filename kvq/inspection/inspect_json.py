"""The `kvq inspect` result as JSON (what ``--json`` writes); the console table is :mod:`kvq.cli.inspect_printer`."""

from __future__ import annotations

import math
from dataclasses import asdict

from kvq.inspection.inspect_path import Inspection

ROLES = ("k", "v", "kv", "q")  # the order scale tensors are listed in


def _number(x: float) -> float | str:
    """A float for JSON: NaN and inf as strings (JSON has no such numbers)."""
    return x if math.isfinite(x) else str(x)


def inspection_json(result: Inspection) -> dict:
    f = result.found
    return {
        "path": str(f.path),
        "kind": f.kind,
        "scheme": None if f.scheme is None else asdict(f.scheme),
        "shape": asdict(result.shape),
        "ranks": f.ranks,
        "granularity": result.granularity,
        "tensors": [{"layer": e.layer, "role": e.role, "name": e.name, "file": e.file, "rank": e.rank,
                     "shape": list(e.shape), "values": [_number(float(x)) for x in e.values.flatten().tolist()],
                     "offset": None if e.offset is None else [_number(float(x)) for x in e.offset.flatten().tolist()]}
                    for e in sorted(f.entries, key=lambda e: (e.layer, e.rank or 0, ROLES.index(e.role)))],
        "defects": [asdict(d) for d in result.defects],
        "clipping": [{**asdict(c), "worst": _number(c.worst)} for c in result.clipping],
        "engines": [asdict(row) for row in result.engines],
        "notes": list(f.notes),
        "clean": result.clean,
    }
