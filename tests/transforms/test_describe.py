"""``describe_attention`` reads each architecture's layout as its modeling code defines it, and refuses,
with the model type, layer and reason, what kvq cannot fold exactly.

Oracles: the layouts written out by hand from the transformers modeling files (Phi-3 slices
[q; k; v], GPT-NeoX views per-head [q, k, v] blocks and rotates rotary_pct of head_dim, Cohere's
rotate_half interleaves, Gemma3's norms use 1 + weight).
"""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.llama import modeling_llama

from kvq.errors import UsageError
from kvq.transforms import HeadRows, NormFold, RopeLayout, describe_attention


def test_separate_projections_with_gqa(tiny):
    layers = describe_attention(tiny("llama"))
    assert len(layers) == 3
    layer = layers[1]
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.group) == (4, 2, 16, 2)
    assert layer.k == HeadRows("model.layers.1.self_attn.k_proj", 0, 16)
    assert layer.o == HeadRows("model.layers.1.self_attn.o_proj", 0, 16)
    assert layer.rope == RopeLayout("rotate_half", 16) and layer.rope.pairs()[:2] == [(0, 8), (1, 9)]
    assert layer.q_norm is None and layer.k_norm is None


def test_fused_qkv_rows_are_q_then_k_then_v(tiny):
    layer = describe_attention(tiny("phi3"))[0]
    fused = "model.layers.0.self_attn.qkv_proj"
    assert (layer.q, layer.k, layer.v) == (HeadRows(fused, 0, 16), HeadRows(fused, 64, 16), HeadRows(fused, 96, 16))


def test_gpt_neox_per_head_blocks_and_partial_rotary(tiny):
    layer = describe_attention(tiny("gpt_neox"))[0]
    fused = "gpt_neox.layers.0.attention.query_key_value"
    assert (layer.q, layer.k, layer.v) == (HeadRows(fused, 0, 48), HeadRows(fused, 16, 48), HeadRows(fused, 32, 48))
    assert layer.o.module == "gpt_neox.layers.0.attention.dense"
    assert layer.rope == RopeLayout("rotate_half", 8)  # rotary_pct 0.5 of 16
    assert torch.equal(layer.k.index(4, 16)[1, :3], torch.tensor([64, 65, 66]))


def test_interleaved_rope(tiny):
    layer = describe_attention(tiny("cohere"))[0]
    assert layer.rope == RopeLayout("interleaved", 16) and layer.rope.pairs()[:2] == [(0, 1), (2, 3)]


@pytest.mark.parametrize(("arch", "offset"), [("qwen3", 0.0), ("gemma3", 1.0)])
def test_qk_norms_and_their_weight_form(tiny, arch, offset):
    for layer in describe_attention(tiny(arch)):
        prefix = f"model.layers.{layer.layer_idx}.self_attn"
        assert layer.q_norm == NormFold(f"{prefix}.q_norm", offset, False)
        assert layer.k_norm == NormFold(f"{prefix}.k_norm", offset, False)


def test_per_head_layernorm(tiny):
    layer = describe_attention(tiny("cohere", use_qk_norm=True))[0]
    assert layer.q_norm.per_head and layer.k_norm.per_head and layer.q_norm.offset == 0.0


def mirrored_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Llama's RoPE on channels permuted so that it pairs (i, d - 1 - i): neither known layout."""
    d = q.shape[-1]
    perm = torch.cat([torch.arange(d // 2), torch.arange(d - 1, d // 2 - 1, -1)])
    inverse = torch.argsort(perm)
    rq, rk = ORIGINAL_ROPE(q[..., perm], k[..., perm], cos, sin, unsqueeze_dim)
    return rq[..., inverse], rk[..., inverse]


ORIGINAL_ROPE = modeling_llama.apply_rotary_pos_emb


def test_unknown_rope_pairing_is_refused(tiny, monkeypatch):
    model = tiny("llama")
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", mirrored_rope)
    with pytest.raises(UsageError, match=r"model llama layer 0 .*RoPE pairs channels \(0, 15\).*neither"):
        describe_attention(model)


def test_rope_contradicting_the_config_is_refused(tiny):
    model = tiny("gpt_neox")
    model.config.rope_parameters["partial_rotary_factor"] = 1.0
    with pytest.raises(UsageError, match="rotates 8 of 16 channels, but the config"):
        describe_attention(model)


def test_mla_is_refused():
    config = DeepseekV3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                              n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2)
    model = DeepseekV3ForCausalLM(config).eval()
    with pytest.raises(UsageError, match=r"model deepseek_v3 layer 0 .*multi-head latent attention") as info:
        describe_attention(model)
    assert "kv_a_proj_with_mqa" in str(info.value)


def test_a_fused_projection_kvq_cannot_split_is_refused(tiny):
    model = tiny("phi3")
    attn = model.model.layers[1].self_attn
    attn.qkv_proj = torch.nn.Linear(64, 64 + 2 * 32 + 16, bias=False)
    with pytest.raises(UsageError, match=r"model phi3 layer 1 .*fused qkv_proj has 144 rows.*cannot split"):
        describe_attention(model)


def test_keys_changed_by_something_kvq_does_not_see_are_refused(tiny):
    model = tiny("llama")
    model.model.layers[2].self_attn.k_proj.register_forward_hook(lambda module, args, out: out * 1.5)
    with pytest.raises(UsageError, match=r"model llama layer 2 .*not the ones it attends with"):
        describe_attention(model)


class BiasedNorm(torch.nn.LayerNorm):
    pass


class RolledNorm(torch.nn.Module):
    """normalize(x) * weight, but with the weight rolled by one channel: not per channel."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.roll(1)


@pytest.mark.parametrize(("norm", "reason"), [(BiasedNorm(16), r"parameters \['bias', 'weight'\]"),
                                              (RolledNorm(16), "is not normalize")])
def test_a_qk_norm_kvq_does_not_know_is_refused(tiny, norm, reason):
    model = tiny("qwen3")
    model.model.layers[0].self_attn.k_norm = norm
    with pytest.raises(UsageError, match=rf"model qwen3 layer 0 .*k_norm.*{reason}"):
        describe_attention(model)
