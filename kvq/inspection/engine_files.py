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
    DeclaredShape,
    Found,
    ScaleEntry,
    Scheme,
    shape_from_config,
)
from kvq.inspection.hf_checkpoint import kv_role, open_safetensors, read_json

RANK_FILE = re.compile(r"^rank([0-9]{1,18})\.safetensors$")
LMDEPLOY_FILE = re.compile(r"^layers\.([0-9]{1,18})\.past_kv_scale\.([0-9]{1,18})\.weight$")
_NUMBER = re.compile(r"[0-9]{1,18}")  # a layer or rank number as a JSON key (ASCII digits; int() of it is cheap)
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
        found.conflicts.append((f"rank{ranks[-1]}.safetensors", f"rank files {_listed(ranks)} are not "
                                f"0..{len(ranks) - 1}"))
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
        found.shape = DeclaredShape(None, None, None, None, str(model_type), f"{path.name} model_type")
    for rank_key, layers in kv["scaling_factor"].items():
        if not (_NUMBER.fullmatch(str(rank_key)) and isinstance(layers, dict)):
            found.conflicts.append((f"scaling_factor[{rank_key!r}]", "is not a rank number holding {layer: value}"))
            continue
        for layer_key, value in layers.items():
            name = f"kv_cache.scaling_factor.{rank_key}.{layer_key}"
            if not _NUMBER.fullmatch(str(layer_key)) or isinstance(value, bool) or not isinstance(value, (int, float)):
                found.conflicts.append((name, "is not a layer number holding a number"))
                continue
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float: JSON integers have no size limit
                found.conflicts.append((name, "holds a number beyond the float range"))
                continue
            entries.append(ScaleEntry(layer=int(layer_key), role="kv", name=name, file=path.name,
                                      values=torch.tensor(number, dtype=torch.float32), rank=int(rank_key)))
    found.ranks = len(kv["scaling_factor"]) or None
    held = sorted({e.rank for e in entries})
    if found.ranks and held != list(range(found.ranks)):
        found.conflicts.append(("kv_cache.scaling_factor", f"ranks {_listed(held)} are not 0..{found.ranks - 1} "
                                f"(the file holds {found.ranks} rank(s))"))
    return found


def _listed(numbers: list[int], shown: int = 8) -> str:
    """At most ``shown`` numbers of a list, for a message whose length must not grow with the input."""
    return str(numbers) if len(numbers) <= shown else f"[{', '.join(map(str, numbers[:shown]))}, ... ({len(numbers)})]"


def lmdeploy_files(folder: Path) -> list[tuple[int, int, Path]]:
    """(layer, rank, path) of the TurboMind KV parameter files in ``folder``."""
    return sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir()
                  if (m := LMDEPLOY_FILE.match(p.name)) and p.is_file())


def read_lmdeploy(folder: Path) -> Found:
    files = lmdeploy_files(folder)
    scheme = Scheme("file format (layers.N.past_kv_scale.R.weight)", "TurboMind offline int8 KV parameters "
                    "(quant_policy 4)", "int8", "rank", None)
    found = Found(path=folder, kind=LMDEPLOY, scheme=scheme, entries=[], shape=UNKNOWN_SHAPE)
    ranks = sorted({r for _, r, _ in files})
    found.ranks = len(ranks)  # what the folder holds: a rank number in a file name is checked against it
    if ranks != list(range(len(ranks))):
        bad = next(p for _, r, p in files if r == ranks[-1])
        found.conflicts.append((bad.name, f"rank {ranks[-1]}: the folder holds files of {len(ranks)} rank(s), "
                                f"numbered {_listed(ranks)} instead of 0..{len(ranks) - 1}"))
    found.notes.append("TurboMind parameter files record no model: pass --model to check layers and heads")
    for layer, rank, path in files:
        size = path.stat().st_size
        if size not in (8, 16):  # checked before reading: a file of any size is never read whole
            found.conflicts.append((path.name, f"holds {size} bytes; TurboMind reads 16 ([k_scale, k_zp, "
                                    "v_scale, v_zp], float32) or, before 0.0.4, 8"))
            continue
        raw = path.read_bytes()
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
