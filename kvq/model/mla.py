"""Multi-head latent attention (MLA: DeepSeek-V2 / V3 / R1, Kimi K2, GLM-5 ...): what its layers cache, read from
the config's attributes (never its class name).

An MLA layer caches one row per token, shared by all attention heads: the normalized compressed latent
``kv_a_layernorm(kv_a_proj_with_mqa(x)[:kv_lora_rank])`` and the rotary key part ``k_pe`` after RoPE. Per-head
keys and values are expanded from the latent by ``kv_b_proj`` only after the cache.

* transformers 5.23 hands ``Cache.update`` the latent as "keys", shaped (batch, 1, seq, kv_lora_rank), and the
  rotary part as "values", (batch, 1, seq, qk_rope_head_dim) (models/deepseek_v3/modeling_deepseek_v3.py:444-459,
  models/deepseek_v2/modeling_deepseek_v2.py:385-394). kvq captures there, so its K statistics are the latent's
  and its V statistics the rotary part's, one "head" each.
* vLLM 0.34.0 caches the same row ``[kv_c_normed | k_pe]`` (head_size kv_lora_rank + qk_rope_head_dim, one KV
  head: model_executor/layers/attention/mla_attention.py:490-496) and writes it with ``concat_and_cache_mla``
  with a single scale, the layer's ``_k_scale`` (mla_attention.py:958-969 -> v1/attention/backend.py:1088-1110):
  one scale per layer for the whole row; ``_v_scale`` is never used (the Triton MLA decode passes
  ``v_scale=layer._k_scale``, v1/attention/backends/mla/triton_mla.py:372-373; FlashMLA ``descale_k``,
  flashmla.py:322). kvq's fp8 solve therefore gives an MLA layer's K and V one scale (kvq.solving.row_scale).

Channel order of the rotary part: with ``rope_interleave`` transformers de-interleaves the pairs while rotating,
so its channels are a permutation of vLLM's; a per-layer scale (a maximum over the row) does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvq.errors import UsageError

# The artifact metadata key and value that say the KV cache is MLA's latent row (absent: separate K and V rows).
KV_LAYOUT_KEY = "kv_layout"
MLA_LAYOUT = "mla"
_DIM_MAX = 1 << 16  # the bound kvq puts on every config count (kvq.model.loading.COUNT_MAX)


@dataclass(frozen=True)
class LatentDims:
    """What one MLA layer caches per token: the latent (``kv_lora_rank`` channels, kvq's "K") and the rotary
    key part (``qk_rope_head_dim`` channels, kvq's "V"), one head each."""

    kv_lora_rank: int
    qk_rope_head_dim: int

    @property
    def k(self) -> tuple[int, int]:
        """(heads, dim) of what transformers hands the cache as keys: the latent."""
        return (1, self.kv_lora_rank)

    @property
    def v(self) -> tuple[int, int]:
        """(heads, dim) of what transformers hands the cache as values: the rotary key part."""
        return (1, self.qk_rope_head_dim)

    @property
    def row(self) -> int:
        """Elements one token adds to one layer's cache: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def latent_dims(text_config, source: str = "the model's config") -> LatentDims | None:
    """The cached row of an MLA decoder config (``kv_lora_rank`` and ``qk_rope_head_dim`` both set), or None for
    any other attention. ``text_config``: the decoder's config (``get_text_config(decoder=True)``).

    A config stating only one of the two, or a count that is not a whole number from 1 to 65536, is refused:
    kvq cannot tell what its layers cache. (vLLM serves ``qk_rope_head_dim`` 0 and ``kv_lora_rank`` unset as
    plain multi-head attention, deepseek_v2.py:1893-1896; transformers' MLA modules always rotate a part.)"""
    values = {key: getattr(text_config, key, None) for key in ("kv_lora_rank", "qk_rope_head_dim")}
    if all(value is None for value in values.values()):
        return None
    if values["kv_lora_rank"] is None and values["qk_rope_head_dim"] == 0:
        return None
    for key, value in values.items():
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or not 1 <= value <= _DIM_MAX:
            raise UsageError(
                f"{source}: {key} is {str(value)[:40]}, but a multi-head latent attention config (it states "
                f"{' and '.join(k for k, v in values.items() if v is not None)}) needs kv_lora_rank and "
                f"qk_rope_head_dim as whole numbers from 1 to {_DIM_MAX}",
                hint="fix the config or pass another checkpoint",
            )
    return LatentDims(values["kv_lora_rank"], values["qk_rope_head_dim"])


def config_latent_dims(config) -> LatentDims | None:
    """:func:`latent_dims` of a model config (its decoder's config for a multimodal one: Kimi K2.5)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return latent_dims(text)


def layout_metadata(config) -> dict[str, str]:
    """What an artifact's metadata records of the cache's layout: ``{"kv_layout": "mla"}`` for MLA, else nothing."""
    return {KV_LAYOUT_KEY: MLA_LAYOUT} if config_latent_dims(config) is not None else {}


def is_mla(metadata: dict[str, str]) -> bool:
    """Whether an artifact's metadata says its statistics / scales are of an MLA latent cache."""
    return metadata.get(KV_LAYOUT_KEY) == MLA_LAYOUT
