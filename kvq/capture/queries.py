"""Queries as FP8 attention quantizes them: after RoPE, per attention head, captured on request.

transformers hands no cache the queries: each attention layer computes them, applies RoPE and
passes them to an attention function looked up by name (``config._attn_implementation`` in
``ALL_ATTENTION_FUNCTIONS``). :func:`queries_captured` registers, next to the model's own
implementation ``X``, a function ``kvq_capture+X`` that hands the queries to the active
:class:`~kvq.capture.cache.CaptureCache`'s consumer and then calls ``X`` itself with the same
arguments, and points the config at it while the block runs. Attention therefore computes exactly
what it computes without kvq; the mask functions are ``X``'s own. A run whose consumer does not ask
for queries never enters this module, so it costs nothing there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from kvq.capture.cache import ACTIVE_CACHE
from kvq.capture.states import CapturedQuery, check_states
from kvq.errors import KvqError

PREFIX = "kvq_capture+"


def _implementation(name: str, module: torch.nn.Module) -> Callable:
    """The attention function ``name`` means for ``module``.

    "eager" is not registered in transformers' interface: each modeling file keeps its own
    ``eager_attention_forward`` beside the attention class and uses it as the default, so it is
    looked up there (by that one documented name, the same for every transformers model).
    """
    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise KvqError(
            f"cannot capture queries of {type(module).__name__}: its module has no eager_attention_forward",
            hint="load the model with attn_implementation='sdpa'",
        )
    return eager


def _capturing(name: str) -> Callable:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        cache = ACTIVE_CACHE.get()
        if cache is not None and cache.consumer.wants_queries:
            layer_idx = getattr(module, "layer_idx", None)
            if not isinstance(layer_idx, int):
                raise KvqError(f"cannot capture queries of {type(module).__name__}: it has no integer layer_idx")
            check_states(query, cache.token_mask, layer_idx, "queries")
            scaling = kwargs.get("scaling")
            replaced = cache.consumer.query(CapturedQuery(layer_idx, query, cache.token_mask, cache.batch_index,
                                                          float(scaling) if isinstance(scaling, (int, float)) else None))
            if replaced is not None:  # what attention reads instead (FP8 attention's quantized query)
                query = replaced
        return _implementation(name, module)(module, query, key, value, attention_mask, **kwargs)

    return attention


@contextmanager
def queries_captured(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, ``model``'s attention hands its queries to the active cache's consumer."""
    config = model.config
    original = config._attn_implementation
    if not isinstance(original, str) or original not in ("eager", *ALL_ATTENTION_FUNCTIONS.keys()):
        raise KvqError(f"cannot capture queries with attention implementation {original!r}",
                       hint="load the model with attn_implementation='sdpa' or 'eager'")
    if original.startswith(PREFIX):  # already capturing (a nested call)
        yield
        return
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = original
