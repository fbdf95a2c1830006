"""`kvq export-scales` warns when an engine's loader for the model's type ignores KV scales (engine matrix rows with
a model_type, kvq/engines/engine_matrix.yaml).

Oracle: SGLang 0.5.23's Qwen2 loader does not remap ``self_attn.k_scale`` and logs "Parameter ... not found in
params_dict" (sglang/srt/models/qwen2.py:719@0.5.23, read in the wheel); Llama's remaps it
(sglang/srt/models/llama.py:748@0.5.23, maybe_remap_kv_scale_name): no such warning for llama.
"""

from __future__ import annotations

from export_helpers import model_metadata, recipe

from kvq.cli import main

QWEN2_LINE = "SGLang >=0.5.19 ignores KV scales for model type qwen2: "
SOURCE = "(sglang/srt/models/qwen2.py:719@0.5.23)"


def test_cli_warns_for_a_model_type_an_engine_ignores(tiny_model_factory, make_artifact, tmp_path, capsys):
    qwen2 = tiny_model_factory("qwen2")
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(qwen2))
    code = main(["export-scales", str(artifact), "--format", "vllm", "--model", str(qwen2),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines: one space between words
    assert printed.count("warning: " + QWEN2_LINE) == 1, printed
    warning = printed.split("warning: " + QWEN2_LINE)[1].split(" warning: ")[0].split(" serve: ")[0]
    assert warning.endswith(SOURCE), warning


def test_no_model_type_warning_for_llama(tiny_llama, make_artifact, tmp_path, capsys):
    artifact = make_artifact(recipe("fp8_e4m3", True, "tensor"), model_metadata(tiny_llama))
    code = main(["export-scales", str(artifact), "--format", "vllm", "--model", str(tiny_llama),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    assert "KV scales for model type" not in capsys.readouterr().out
