"""Forward passes through the capture: the decoder over calibration batches, or the whole model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from kvq.capture.cache import CaptureCache
from kvq.capture.queries import queries_captured
from kvq.capture.states import Consumer
from kvq.data import Batch
from kvq.errors import KvqError


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head: a capture needs K and V, not logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", model)
    return decoder


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids go: where the input embedding runs (the first layer of a device map).

    With an accelerate device map an offloaded embedding's weight sits on the meta device and its
    hook names the device it executes on.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    if embeddings is not None and getattr(embeddings, "weight", None) is not None \
            and embeddings.weight.device.type != "meta":
        return embeddings.weight.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _cache_argument(module: torch.nn.Module) -> str:
    """The name ``module.forward`` takes a cache under: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise KvqError(
        f"model {type(module).__name__} does not take a transformers KV cache",
        hint="kvq captures models whose attention writes through transformers' Cache.update",
    )


def forward(module: torch.nn.Module, input_ids: torch.Tensor, cache: CaptureCache,
            attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
    """``module(input_ids)`` (batch, seq) with ``cache`` capturing every layer; returns the module's output
    (with ``labels``, its own loss too)."""
    extra = {} if labels is None else {"labels": labels}
    queries = queries_captured(module) if cache.consumer.wants_queries else nullcontext()
    with cache.active(), queries:
        return module(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **{_cache_argument(module): cache}, **extra)


def plain_forward(module: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache | None = None):
    """``module(input_ids)`` with transformers' own cache (a new one when None), no capture: (output, cache)."""
    cache = DynamicCache(config=module.config) if cache is None else cache
    return module(input_ids=input_ids, use_cache=True, **{_cache_argument(module): cache}), cache


def capture_batches(
    model: torch.nn.Module,
    batch_iter: Iterable[Batch],
    consumer: Consumer,
    on_batch: Callable[[Batch], None] | None = None,
) -> int:
    """Run the decoder (no LM head) over every batch, handing every layer's K/V to ``consumer``.

    Padding is described to the consumer, never fed to it as tokens. Returns the number of batches.
    """
    decoder = decoder_of(model)
    device = input_device(model)
    count = 0
    with torch.inference_mode():
        for n, batch in enumerate(batch_iter):
            mask = batch.attention_mask.to(device)  # (batch, seq), 1 = real token
            cache = CaptureCache(consumer, mask, config=model.config, batch_index=n)
            forward(decoder, batch.input_ids.to(device), cache, mask)
            count += 1
            if on_batch is not None:
                on_batch(batch)
    return count
