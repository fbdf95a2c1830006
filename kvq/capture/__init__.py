"""The capture layer: the one place where a model hands kvq its K/V (and, on request, its queries).

Keys after RoPE and values per KV head (before GQA ``repeat_kv``) come through transformers'
``Cache.update`` (:class:`CaptureCache`); queries after RoPE per attention head come through the
attention function (:func:`queries_captured`), only when the consumer asks for them. A consumer
(:class:`Consumer`) gets one :class:`CapturedKV` per layer and forward pass and returns the K/V
attention reads: calibration's statistics observer, validation's error accumulator and eval's
fake-quantizer are consumers. docs/capture.md says how to write one.
"""

from kvq.capture.cache import CaptureCache, DecodingCaptureCache
from kvq.capture.forward_pass import capture_batches, decoder_of, forward, input_device, plain_forward
from kvq.capture.queries import queries_captured
from kvq.capture.states import CapturedKV, CapturedQuery, Consumer, check_states, real_tokens, token_mask_of

__all__ = [
    "CaptureCache",
    "CapturedKV",
    "CapturedQuery",
    "Consumer",
    "DecodingCaptureCache",
    "capture_batches",
    "check_states",
    "decoder_of",
    "forward",
    "input_device",
    "plain_forward",
    "queries_captured",
    "real_tokens",
    "token_mask_of",
]
