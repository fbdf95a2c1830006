"""Hugging Face checkpoint folders: the KV-cache scheme their configs declare and their KV-scale tensors.

Declarations read (no weights loaded; tensors are opened by name with ``safetensors.safe_open``):

* compressed-tensors (llm-compressor, kvq ``--format vllm``): ``config.json`` ``quantization_config``
  with ``quant_method: compressed-tensors`` and ``kv_cache_scheme`` (``num_bits``, ``type`` float / int,
  ``strategy`` tensor / attn_head / channel, ``symmetric``, ``dynamic``);
* ModelOpt (kvq ``--format modelopt``): ``hf_quant_config.json`` ``quantization.kv_cache_quant_algo``
  and / or a ``config.json`` ``quantization_config`` with ``quant_method`` ``modelopt``
  (``kv_cache_quant_algo`` or ``kv_cache_scheme``);
* AutoFP8-style ``quant_method: fp8`` with ``kv_cache_scheme``.

Tensors recognised, per ``*.layers.{i}.``: ``...k_scale`` / ``...v_scale`` / ``...q_scale`` (under
``self_attn``, ``self_attn.k_proj`` ..., ``attn``), ``k_proj.output_scale`` / ``v_proj.output_scale``
(old FP8 checkpoints), ``kv_scale`` and ``kv_cache_scaling_factor`` (one factor for K and V).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kvq.errors import UsageError
from kvq.export.checkpoint_folder import INDEX, SINGLE
from kvq.export.modelopt import HF_QUANT_CONFIG
from kvq.inspection.found import (
    COMPRESSED_TENSORS,
    HF_CHECKPOINT,
    MODELOPT,
    Found,
    ScaleEntry,
    Scheme,
    shape_from_config,
)
from kvq.io.contained import leaves_folder

_SCALE = re.compile(r"^(?:.*\.)?layers\.(?P<i>[0-9]{1,18})\.(?P<rest>.+)$")
_ROLE_SUFFIXES = (  # (name ending, role), longest first where one ends another
    (".kv_cache_scaling_factor", "kv"), (".kv_scale", "kv"),
    (".k_proj.output_scale", "k"), (".v_proj.output_scale", "v"),
    (".k_scale", "k"), (".v_scale", "v"), (".q_scale", "q"),
)
_CT_STRATEGY = {"tensor": "tensor", "attn_head": "head", "head": "head", "channel": "channel"}
_MODELOPT_ALGO = {"FP8": ("fp8_e4m3", "tensor"), "INT8": ("int8", "tensor")}


def kv_role(name: str) -> tuple[int, str] | None:
    """(layer, role) of a tensor name holding a KV-cache (or query) scale, None for any other tensor."""
    match = _SCALE.match(name)
    if match is None:
        return None
    rest = "." + match.group("rest")
    for suffix, role in _ROLE_SUFFIXES:
        if rest.endswith(suffix):
            return int(match.group("i")), role
    return None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as exc:  # nesting deeper than the parser goes: as unreadable as a syntax error
        raise UsageError(f"{path} does not parse as JSON: nested too deeply", hint="pass a checkpoint folder "
                         "whose JSON files parse") from exc
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise UsageError(f"{path} does not parse as JSON: {exc}", hint="pass a checkpoint folder whose "
                         "JSON files parse") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return data


def _weight_files(folder: Path) -> dict[str, list[str]]:
    """File name -> tensor names, from the index, else the single file, else every *.safetensors."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UsageError(f"{index} has no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(file), []).append(name)
        return files
    paths = [folder / SINGLE] if (folder / SINGLE).is_file() else sorted(folder.glob("*.safetensors"))
    out = {}
    for path in paths:
        out[path.name] = open_safetensors(path, lambda fh: list(fh.keys()))
    return out


def open_safetensors(path: Path, read):
    try:
        with safe_open(str(path), framework="pt") as fh:
            return read(fh)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc


def _scale_entries(folder: Path) -> tuple[list[ScaleEntry], list[tuple[str, str]]]:
    """The KV-scale tensors, and a conflict for each file the index names outside the folder (never opened)."""
    entries, outside = [], []
    for file, names in sorted(_weight_files(folder).items()):
        if leaves_folder(file):
            outside.append((INDEX, f"weight_map points to {file!r}, outside the checkpoint folder: kvq does not "
                            "read it, and a loader that does reads a file the checkpoint does not hold"))
            continue
        wanted = sorted((n, kv_role(n)) for n in names if kv_role(n) is not None)
        if not wanted:
            continue
        path = folder / file
        if not path.is_file():
            raise UsageError(f"{folder / INDEX} lists {file}, which is not in {folder}")

        def read(fh, wanted=wanted, file=file):
            return [ScaleEntry(layer=i, role=role, name=n, file=file, values=fh.get_tensor(n).to(torch.float32))
                    for n, (i, role) in wanted]

        entries += open_safetensors(path, read)
    return entries, outside


def _ct_scheme(qc: dict) -> Scheme | None:
    scheme = qc.get("kv_cache_scheme")
    if not isinstance(scheme, dict):
        return None
    bits, kind = scheme.get("num_bits"), scheme.get("type")
    number = {("float", 8): "fp8_e4m3", ("int", 8): "int8", ("int", 4): "int4"}.get((kind, bits))
    strategy = scheme.get("strategy")
    text = (f"compressed-tensors kv_cache_scheme: {kind} {bits}-bit, strategy {strategy}, "
            f"{'symmetric' if scheme.get('symmetric', True) else 'asymmetric'}"
            + (", dynamic" if scheme.get("dynamic") else ""))
    return Scheme("config.json quantization_config.kv_cache_scheme", text, number,
                  _CT_STRATEGY.get(str(strategy)), bool(scheme.get("symmetric", True)),
                  dynamic=bool(scheme.get("dynamic")))


def _modelopt_scheme(algo: object, where: str) -> Scheme | None:
    if algo is None:
        return None
    number, granularity = _MODELOPT_ALGO.get(str(algo).upper(), (None, None))
    return Scheme(where, f"ModelOpt kv_cache_quant_algo {algo}", number, granularity, True)


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _modelopt_config_scheme(qc: dict) -> Scheme | None:
    """The KV scheme a ModelOpt ``quantization_config`` in config.json declares."""
    algo = qc.get("kv_cache_quant_algo") or _dict(qc.get("quantization")).get("kv_cache_quant_algo")
    scheme = _modelopt_scheme(algo, "config.json quantization_config.kv_cache_quant_algo")
    args = qc.get("kv_cache_scheme")
    if scheme is None and isinstance(args, dict):
        number = "fp8_e4m3" if (args.get("type"), args.get("num_bits")) == ("float", 8) else None
        scheme = Scheme("config.json quantization_config.kv_cache_scheme", f"ModelOpt kv_cache_scheme {json.dumps(args)}",
                        number, "tensor", True)
    return scheme


def modelopt_weights(hf_quant: dict | None, qc: dict) -> str | None:
    """What a ModelOpt checkpoint's weights are (its ``quant_algo``), in kvq.engines.matrix' terms; None if unknown."""
    from kvq.engines.matrix import FP8_WEIGHTS, UNQUANTIZED

    quantization = _dict(_dict(hf_quant).get("quantization")) if hf_quant is not None else qc
    if "quant_algo" not in quantization:
        return None
    algo = quantization.get("quant_algo")
    return UNQUANTIZED if not algo else FP8_WEIGHTS if algo == "FP8" else None


def read_checkpoint(folder: Path) -> Found:
    """A checkpoint folder's declared KV scheme, its KV-scale tensors and the config's KV shape."""
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    hf_quant = read_json(folder / HF_QUANT_CONFIG) if (folder / HF_QUANT_CONFIG).is_file() else None
    qc = _dict(config.get("quantization_config"))
    method = str(qc.get("quant_method", ""))
    entries, outside = _scale_entries(folder)
    found = Found(path=folder, kind=HF_CHECKPOINT, scheme=None, entries=entries,
                  shape=shape_from_config(config, f"{folder / 'config.json'}"), conflicts=outside)
    if not config:
        found.notes.append("no config.json: the model's layers and heads are unknown (pass --model)")
    from_hf = _modelopt_scheme(_dict(_dict(hf_quant).get("quantization")).get("kv_cache_quant_algo"),
                               f"{HF_QUANT_CONFIG} quantization.kv_cache_quant_algo")
    if method == "compressed-tensors":
        found.kind, found.scheme = COMPRESSED_TENSORS, _ct_scheme(qc)
        if from_hf is not None:
            found.conflicts.append((HF_QUANT_CONFIG, "config.json declares compressed-tensors and "
                                    f"{HF_QUANT_CONFIG} declares ModelOpt: engines read one or the other"))
    elif method.startswith("modelopt") or from_hf is not None:
        from_config = _modelopt_config_scheme(qc) if method.startswith("modelopt") else None
        found.kind, found.scheme = MODELOPT, from_hf or from_config
        found.weights = modelopt_weights(hf_quant, qc)
        if from_hf is not None and from_config is not None and from_hf.number != from_config.number:
            found.conflicts.append((HF_QUANT_CONFIG, f"{from_hf.declared_in} says {from_hf.text!r} but "
                                    f"{from_config.declared_in} says {from_config.text!r}"))
    elif method in ("fp8", "fbgemm_fp8") and qc.get("kv_cache_scheme") is not None:
        found.scheme = Scheme("config.json quantization_config.kv_cache_scheme",
                              f"{method} kv_cache_scheme {qc['kv_cache_scheme']}", "fp8_e4m3", "tensor", True)
    elif method:
        found.unread_method = method
        found.notes.append(f"config.json declares quant_method {method!r}, whose KV-cache scheme kvq does not read")
    if found.scheme is not None and found.scheme.dynamic and found.entries:
        found.notes.append("the scheme is dynamic: engines compute the scales at run time and ignore these tensors")
    return found
