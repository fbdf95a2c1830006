"""Which kind of input a path is, and its reader.

A file: ``scales.safetensors`` (any safetensors with kvq's recipe metadata) is a kvq artifact; a JSON
file with ``kv_cache`` is SGLang's / old vLLM's scales JSON; a ``config.json``,
``hf_quant_config.json`` or ``model.safetensors.index.json`` means its folder; a ``rank{N}.safetensors`` means its TensorRT-LLM folder.
A folder: holding ``scales.safetensors`` -> kvq artifact; ``rank{N}.safetensors`` -> TensorRT-LLM;
``layers.N.past_kv_scale.R.weight`` files -> LMDeploy TurboMind; ``config.json`` /
``hf_quant_config.json`` with safetensors -> Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from kvq.artifacts.files import SCALES_FILE
from kvq.errors import UsageError
from kvq.export.checkpoint_folder import INDEX
from kvq.export.modelopt import HF_QUANT_CONFIG
from kvq.inspection.engine_files import (
    RANK_FILE,
    lmdeploy_files,
    read_lmdeploy,
    read_sglang_json,
    read_trtllm,
)
from kvq.inspection.found import Found
from kvq.inspection.hf_checkpoint import read_checkpoint, read_json
from kvq.inspection.kvq_artifact import is_kvq_scales, read_kvq_scales

_WHAT = ("a kvq artifact (scales.safetensors or its folder), a Hugging Face checkpoint folder (config.json + "
         "safetensors), a TensorRT-LLM checkpoint (rank*.safetensors), an SGLang scales JSON or a folder of "
         "LMDeploy past_kv_scale files")


def read_path(path: str | Path) -> Found:
    """The reader's :class:`Found` for ``path``; UsageError (exit 2) for a path that is none of the inputs."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist", hint=f"pass {_WHAT}")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        if is_kvq_scales(path):
            return read_kvq_scales(path)
        if RANK_FILE.match(path.name):
            return read_trtllm(path.parent)
        raise UsageError(f"{path} is a safetensors file without kvq's recipe metadata",
                         hint="for a checkpoint, pass its folder (kvq reads config.json and the index beside it)")
    if path.name in ("config.json", HF_QUANT_CONFIG, INDEX):
        return _read_folder(path.parent)
    if path.suffix == ".json":
        data = read_json(path)
        if "kv_cache" in data:
            return read_sglang_json(path)
    raise UsageError(f"{path} is not a KV-cache scales file kvq recognises", hint=f"pass {_WHAT}")


def _read_folder(folder: Path) -> Found:
    if (folder / SCALES_FILE).is_file():
        return read_kvq_scales(folder / SCALES_FILE)
    names = [p.name for p in folder.iterdir()]
    if any(RANK_FILE.match(n) for n in names):
        return read_trtllm(folder)
    if lmdeploy_files(folder):
        return read_lmdeploy(folder)
    has_config = (folder / "config.json").is_file() or (folder / HF_QUANT_CONFIG).is_file()
    if has_config and any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return read_checkpoint(folder)
    raise UsageError(f"folder {folder} holds no KV-cache scales kvq recognises", hint=f"pass {_WHAT}")
