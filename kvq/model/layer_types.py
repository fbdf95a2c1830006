"""What kind of attention each layer of a model runs, read from its config (no weights needed).

transformers' configs name it per layer in ``layer_types`` ("full_attention", "sliding_attention", ...)
for Gemma 2/3, Qwen2/3, GPT-OSS and more; older configs give one ``sliding_window`` for every layer
(Mistral) and nothing at all when every layer attends to the whole context (Llama).
"""

from __future__ import annotations

from kvq.errors import UsageError

FULL = "full_attention"
SLIDING = "sliding_attention"


def attention_types(config) -> tuple[str, ...]:
    """Each decoder layer's attention type, as transformers names it (``config``: a PretrainedConfig)."""
    text = config.get_text_config()
    layers = int(text.num_hidden_layers)
    types = getattr(text, "layer_types", None)
    if types is not None:
        if len(types) != layers:
            raise UsageError(f"the model config's layer_types lists {len(types)} layers, but num_hidden_layers is "
                             f"{layers}", hint="fix the checkpoint's config.json")
        return tuple(str(t) for t in types)
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False:
        return (SLIDING,) * layers  # one window for every layer (Mistral)
    return (FULL,) * layers


def sliding_window_layers(config) -> tuple[int, ...]:
    """The layers whose attention is a sliding window."""
    return tuple(i for i, kind in enumerate(attention_types(config)) if kind == SLIDING)
