"""The KV-cache shape read from a config.json: transformers keys, nested text configs, TensorRT-LLM's head_size."""

from __future__ import annotations

from kvq.inspection.found import shape_from_config


def test_nested_text_config():
    config = {"model_type": "llava", "vision_config": {"num_hidden_layers": 24},
              "text_config": {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "hidden_size": 4096}}
    shape = shape_from_config(config, "config.json")
    # head_dim = hidden_size / num_attention_heads = 4096 / 32
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.num_heads) == (32, 8, 128, 32)
    assert shape.model_type == "llama"


def test_explicit_head_dim_and_default_kv_heads():
    shape = shape_from_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
                               "head_dim": 32}, "config.json")
    assert (shape.num_kv_heads, shape.head_dim) == (4, 32)  # no num_key_value_heads: one per query head


def test_tensorrt_llm_head_size():
    shape = shape_from_config({"architecture": "LlamaForCausalLM", "num_hidden_layers": 3, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "hidden_size": 64, "head_size": 8}, "config.json")
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (3, 2, 8)


def test_a_config_without_heads_leaves_them_unknown():
    shape = shape_from_config({"model_type": "mamba", "num_hidden_layers": 4}, "config.json")
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (4, None, None)
