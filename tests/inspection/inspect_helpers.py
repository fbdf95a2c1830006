"""Helpers of the inspect tests: the compressed-tensors checkpoint's values, running `kvq inspect`."""

from __future__ import annotations

import json
from pathlib import Path

# The checkpoint compressed-tensors writes: 3 layers, 4 query heads, 2 KV heads of head_dim 16.
CT_LAYERS, CT_HEADS, CT_KV_HEADS, CT_HEAD_DIM = 3, 4, 2, 16


def ct_k(layer: int) -> float:
    return 0.015625 * (layer + 1)  # dyadic: exact in float32


def ct_v(layer: int) -> float:
    return 0.03125 * (layer + 1)


def ct_q(layer: int, head: int) -> float:
    return 0.25 * (head + 1) + layer


def inspect_json(argv: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    """Run ``kvq inspect ARGV --json`` in process: exit code, the JSON report, the console output."""
    from bad_input import run_in_process

    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*.json')))}.json"
    outcome = run_in_process(["inspect", *map(str, argv), "--json", str(report)], capsys)
    assert "Traceback" not in outcome.stdout + outcome.stderr
    return outcome.code, json.loads(report.read_text()), outcome.stdout
