"""docs/api.md's example runs: its python blocks, in order, in one namespace, on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_the_api_example_runs(tiny_llama, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4
    monkeypatch.setenv("KVQ_EXAMPLE_MODEL", str(tiny_llama))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_md"}
    for n, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {n + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "3 layers x 2 KV heads x 16" in out  # the tiny Llama's shape (tests/tiny_models.py)
    assert "samples done: [0, 1, 2" in out and "16]" in out
    assert "same |K| as by path: True" in out
    for name in ("stats.safetensors", "scales.safetensors", "scales.json"):
        assert (tmp_path / "kvq-out" / name).is_file()
    assert (tmp_path / "kvq-int8" / "scales.safetensors").is_file()
    assert (tmp_path / "model-fp8kv" / "config.json").is_file()
