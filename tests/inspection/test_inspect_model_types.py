"""`kvq inspect` reports engine releases whose loader for the checkpoint's model type ignores its KV scales.

Oracle: SGLang 0.5.23's Qwen2 loader does not remap ``self_attn.k_scale`` (sglang/srt/models/qwen2.py:719@0.5.23,
"Parameter ... not found in params_dict"), so a compressed-tensors Qwen2 checkpoint is served at scale 1.0 there.
"""

from __future__ import annotations

from export_helpers import model_metadata, recipe
from inspect_helpers import inspect_json

from kvq.export import export_artifact

LINE = "SGLang >=0.5.19 ignores KV scales for model type qwen2: "
SOURCE = "(sglang/srt/models/qwen2.py:719@0.5.23)"


def test_inspect_reports_a_model_type_an_engine_ignores(tiny_model_factory, make_artifact, tmp_path, capsys):
    qwen2 = tiny_model_factory("qwen2")
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(qwen2))
    out = tmp_path / "fp8kv"
    export_artifact(artifact, "vllm", out=out, model=str(qwen2))
    code, report, console = inspect_json([out], tmp_path, capsys)
    assert code == 0, report["defects"]  # a note, not a defect of the file
    notes = [n for n in report["notes"] if n.startswith(LINE)]
    assert len(notes) == 1 and notes[0].endswith(SOURCE), report["notes"]
    assert "note: " + LINE in console
    # the engines table shows the Qwen2 row, and no row limited to another model type
    model_rows = [r for r in report["engines"] if r["model_type"] != "any"]
    assert model_rows and all("qwen2" in r["model_type"] for r in model_rows)
