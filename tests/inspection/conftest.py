"""Fixtures of the inspect tests: hand-made kvq artifacts, a checkpoint written by compressed-tensors' own code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # export_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inspect_helpers
from inspect_helpers import CT_HEAD_DIM, CT_HEADS, CT_KV_HEADS, CT_LAYERS, ct_k, ct_q, ct_v  # noqa: E402


def _export_conftest():
    """tests/export/conftest.py as a module: its ``make_artifact`` fixture serves these tests too."""
    path = Path(__file__).resolve().parents[1] / "export" / "conftest.py"
    spec = importlib.util.spec_from_file_location("export_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_artifact = _export_conftest().make_artifact  # a fixture: hand-made artifact (export_helpers.filled values)


def _compressed_tensors_checkpoint(folder: Path, strategy: str, with_queries: bool) -> Path:
    """A tiny Llama quantized and saved by compressed-tensors' own code path (as llm-compressor does)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=CT_LAYERS,
                         num_attention_heads=CT_HEADS, num_key_value_heads=CT_KV_HEADS, head_dim=CT_HEAD_DIM)
    model = AutoModelForCausalLM.from_config(config)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False, strategy=strategy)
    groups = {"attention": QuantizationScheme(targets=["LlamaAttention"], input_activations=args)} if with_queries else {}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, kv_cache_scheme=args,
                                                        quantization_status="frozen"), show_progress=False)
    with torch.no_grad():  # the observed scales, as a calibration would set them
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.k_scale.fill_(ct_k(i))
            attn.v_scale.fill_(ct_v(i))
            if with_queries:
                attn.q_scale.copy_(torch.tensor([ct_q(i, h) for h in range(CT_HEADS)]).reshape(attn.q_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder


@pytest.fixture(scope="session")
def ct_checkpoint(tmp_path_factory) -> Path:
    """Per-tensor fp8 KV scales, written by compressed-tensors 0.20 and transformers."""
    return _compressed_tensors_checkpoint(tmp_path_factory.mktemp("ct-tensor"), "tensor", with_queries=False)


@pytest.fixture(scope="session")
def ct_head_checkpoint(tmp_path_factory) -> Path:
    """Per-head fp8 K/V and query scales (strategy attn_head), written by compressed-tensors."""
    return _compressed_tensors_checkpoint(tmp_path_factory.mktemp("ct-head"), "attn_head", with_queries=True)
