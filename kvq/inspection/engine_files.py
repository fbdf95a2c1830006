"""The engines' own scale files: TensorRT-LLM checkpoints, SGLang / old-vLLM JSON, LMDeploy TurboMind files.

* TensorRT-LLM (``trtllm-build`` checkpoints, kvq ``--format trtllm``): ``config.json`` with
  ``quantization.kv_cache_quant_algo`` (FP8 / INT8) and ``mapping.tp_size``; ``rank{r}.safetensors``
  holding ``transformer.layers.{i}.attention.kv_cache_scaling_factor`` (one factor for K and V).
* SGLang ``--quantization-param-path`` and old vLLM's JSON (kvq ``--format sglang-json``):
  ``{"model_type", "kv_cache": {"dtype", "scaling_factor": {rank: {layer: value}}}}``.
* LMDeploy TurboMind 0.0.4-0.3.0 (kvq ``--format lmdeploy``): ``layers.{i}.past_kv_scale.{r}.weight``,
  raw little-endian float32 ``[k_scale, k_zp, v_scale, v_zp]`` (v0.0.2-0.0.3: ``[k_scale, v_scale]``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from kvq.errors import UsageError
from kvq.inspection.found import (
    LMDEPLOY,
    SGLANG_JSON,
    TRTLLM,
    UNKNOWN_SHAPE,
    Found,
    KVShape,
    ScaleEntry,
    Scheme,
    shape_from_config,
)
from kvq.inspection.hf_checkpoint import kv_role, open_safetensors, read_json

RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
LMDEPLOY_FILE = re.compile(r"^layers\.(\d+)\.past_kv_scale\.(\d+)\.weight$")
_TRT_ALGO = {"FP8": "fp8_e4m3", "INT8": "int8"}
_JSON_DTYPE = {"float8_e4m3fn": "fp8_e4m3", "float8_e4m3fnuz": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}


def read_trtllm(folder: Path) -> Found:
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    mapping = config.get("mapping") if isinstance(config.get("mapping"), dict) else {}
    algo = quant.get("kv_cache_quant_algo")
    scheme = None
    if algo is not None:
        scheme = Scheme("config.json quantization.kv_cache_quant_algo", f"TensorRT-LLM kv_cache_quant_algo {algo}",
                        _TRT_ALGO.get(str(algo).upper()), "rank", True)
    ranks = sorted(int(m.group(1)) for p in folder.iterdir() if (m := RANK_FILE.match(p.name)))
    entries: list[ScaleEntry] = []
    for r in ranks:
        file = f"rank{r}.safetensors"

        def read(fh, r=r, file=file):
            return [ScaleEntry(layer=i, role=role, name=n, file=file, values=fh.get_tensor(n).to(torch.float32), rank=r)
                    for n in fh.keys() if (found := kv_role(n)) is not None for i, role in [found]]

        entries += open_safetensors(folder / file, read)
    shape = shape_from_config(config, str(folder / "config.json")) if "num_hidden_layers" in config else UNKNOWN_SHAPE
    found = Found(path=folder, kind=TRTLLM, scheme=scheme, entries=entries, shape=shape, ranks=len(ranks) or None)
    declared_tp = mapping.get("tp_size")
    if isinstance(declared_tp, int) and declared_tp * int(mapping.get("pp_size", 1) or 1) != len(ranks):
        found.conflicts.append(("config.json", f"mapping.tp_size {declared_tp} (pp_size "
                                f"{mapping.get('pp_size', 1)}) but the folder holds {len(ranks)} rank file(s)"))
    if ranks != list(range(len(ranks))):
        found.conflicts.append((f"rank{ranks[-1]}.safetensors", f"rank files {ranks} are not 0..{len(ranks) - 1}"))
    if shape is UNKNOWN_SHAPE:
        found.notes.append("config.json states no num_hidden_layers (a kvq scales-only fragment?): pass --model "
                           "to check layers and heads")
    return found


def read_sglang_json(path: Path) -> Found:
    data = read_json(path)
    kv = data.get("kv_cache")
    if not isinstance(kv, dict) or not isinstance(kv.get("scaling_factor"), dict):
        raise UsageError(f"{path} has no kv_cache.scaling_factor object; it is not a KV-cache scales JSON",
                         hint="pass SGLang's --quantization-param-path file (kvq export-scales --format sglang-json)")
    dtype = kv.get("dtype")
    scheme = Scheme("kv_cache.dtype", f"kv_cache dtype {dtype}", _JSON_DTYPE.get(str(dtype)), "rank", True)
    entries = []
    found = Found(path=path, kind=SGLANG_JSON, scheme=scheme, entries=entries, shape=UNKNOWN_SHAPE)
    model_type = data.get("model_type")
    if model_type is not None:
        found.shape = KVShape(None, None, None, None, str(model_type), f"{path.name} model_type")
    for rank_key, layers in kv["scaling_factor"].items():
        if not (str(rank_key).isdigit() and isinstance(layers, dict)):
            found.conflicts.append((f"scaling_factor[{rank_key!r}]", "is not a rank number holding {layer: value}"))
            continue
        for layer_key, value in layers.items():
            name = f"kv_cache.scaling_factor.{rank_key}.{layer_key}"
            if not str(layer_key).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
                found.conflicts.append((name, "is not a layer number holding a number"))
                continue
            entries.append(ScaleEntry(layer=int(layer_key), role="kv", name=name, file=path.name,
                                      values=torch.tensor(float(value), dtype=torch.float32), rank=int(rank_key)))
    found.ranks = len(kv["scaling_factor"]) or None
    if found.ranks and sorted({e.rank for e in entries}) != list(range(found.ranks)):
        found.conflicts.append(("kv_cache.scaling_factor", f"ranks {sorted(kv['scaling_factor'])} are not "
                                f"0..{found.ranks - 1}"))
    return found


def lmdeploy_files(folder: Path) -> list[tuple[int, int, Path]]:
    """(layer, rank, path) of the TurboMind KV parameter files in ``folder``."""
    return sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir()
                  if (m := LMDEPLOY_FILE.match(p.name)) and p.is_file())


def read_lmdeploy(folder: Path) -> Found:
    files = lmdeploy_files(folder)
    scheme = Scheme("file format (layers.N.past_kv_scale.R.weight)", "TurboMind offline int8 KV parameters "
                    "(quant_policy 4)", "int8", "rank", None)
    found = Found(path=folder, kind=LMDEPLOY, scheme=scheme, entries=[], shape=UNKNOWN_SHAPE)
    found.ranks = max(r for _, r, _ in files) + 1
    found.notes.append("TurboMind parameter files record no model: pass --model to check layers and heads")
    for layer, rank, path in files:
        raw = path.read_bytes()
        if len(raw) not in (8, 16):
            found.conflicts.append((path.name, f"holds {len(raw)} bytes; TurboMind reads 16 ([k_scale, k_zp, "
                                    "v_scale, v_zp], float32) or, before 0.0.4, 8"))
            continue
        # raw little-endian float32, as TurboMind's loadArrayFromBin reads it: (4,) or, before 0.0.4, (2,)
        values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
        if values.numel() == 4:
            k, kz, v, vz = values
            parts = (("k", k, kz), ("v", v, vz))
        else:
            parts = (("k", values[0], None), ("v", values[1], None))
        for role, scale, offset in parts:  # each a 0-d tensor; reshape(()) below keeps it one
            found.entries.append(ScaleEntry(layer=layer, role=role, name=f"{path.name}[{role}_scale]",
                                            file=path.name, values=scale.reshape(()).clone(), rank=rank,
                                            offset=None if offset is None else offset.reshape(()).clone()))
    return found
