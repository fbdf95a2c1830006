"""The defects `kvq inspect` reports, each naming the layer and the tensor.

Checks on a :class:`~kvq.inspection.found.Found` (and the model of ``--model``, when given): scale
values (zero, negative, NaN, inf; exactly 1.0 where a calibrated value is expected), coverage (layers
missing or beyond the model's), shapes against the model's KV heads and head_dim, the split over
``--tp`` ranks, the config against the tensors, and the model the scales were calibrated on.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from kvq.export.model_check import ModelShape
from kvq.inspection.found import (
    COMPRESSED_TENSORS,
    KVQ_ARTIFACT,
    MODELOPT,
    ROLE_NAME,
    DeclaredShape,
    Found,
    ScaleEntry,
)

PER_RANK = "rank"


@dataclass(frozen=True)
class Defect:
    kind: str  # zero, negative, nan, inf, uncalibrated, missing-layer, extra-layer, shape, tp, config,
    # other-model, clipping
    layer: int | None  # None: the whole file or every layer
    tensor: str  # the tensor, JSON entry or file at fault
    message: str


def _positions(mask: torch.Tensor) -> str:
    if mask.numel() <= 1:
        return ""
    idx = [tuple(int(x) for x in row) for row in mask.nonzero()[:4]]
    shown = ", ".join(str(i[0]) if len(i) == 1 else str(i) for i in idx)
    more = " ..." if int(mask.sum()) > 4 else ""
    return f" at index {shown}{more}"


def value_defects(found: Found) -> list[Defect]:
    out = []
    for e in found.entries:
        v = e.values
        for kind, mask in (("nan", torch.isnan(v)), ("inf", torch.isinf(v)), ("zero", v == 0),
                           ("negative", v < 0)):
            if mask.any():
                word = {"nan": "NaN", "inf": "inf", "zero": "zero", "negative": "negative"}[kind]
                count = f"{int(mask.sum())} of {v.numel()} values are" if v.numel() > 1 else "the value is"
                out.append(Defect(kind, e.layer, e.name, f"layer {e.layer} {ROLE_NAME[e.role]} scale {e.name}: "
                                  f"{count} {word}{_positions(mask)}"))
    return out


def _all_one(entries: list[ScaleEntry]) -> bool:
    return bool(entries) and all(bool((e.values == 1.0).all()) for e in entries)


def uncalibrated_defects(found: Found) -> list[Defect]:
    """Every scale of a role exactly 1.0 under a declared scheme; or one layer at 1.0 among calibrated ones."""
    if found.scheme is None or found.scheme.dynamic:
        return []
    out = []
    by_role: dict[str, list[ScaleEntry]] = defaultdict(list)
    for e in found.entries:
        by_role[e.role].append(e)
    for role, entries in sorted(by_role.items()):
        first = entries[0]
        if _all_one(entries):
            more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
            out.append(Defect("uncalibrated", None, first.name, f"every {ROLE_NAME[role]} scale ({first.name}{more}) "
                              f"is exactly 1.0: {found.scheme.text} is declared but not calibrated (engines "
                              "use 1.0 when there is no scale at all)"))
            continue
        if found.kind == MODELOPT:
            continue  # ModelOpt's export raises scales below 1.0 to 1.0: a 1.0 there is its floor
        for e in entries:
            if _all_one([e]):
                out.append(Defect("uncalibrated", e.layer, e.name, f"layer {e.layer} {ROLE_NAME[role]} scale "
                                  f"{e.name} is exactly 1.0 while the other layers are calibrated"))
    return out


def _sibling_name(entry: ScaleEntry, layer: int, rank: int | None) -> str:
    if entry.name.startswith("kv_cache.scaling_factor."):
        return f"kv_cache.scaling_factor.{rank}.{layer}"
    name = re.sub(r"layers\.\d+\.", f"layers.{layer}.", entry.name, count=1)
    return name if rank is None else re.sub(r"past_kv_scale\.\d+\.", f"past_kv_scale.{rank}.", name)


LISTED_RUN = 4  # missing layers in a row named one by one; a longer run is one defect (work bounded by the file)


def _missing_runs(have: set[int], num_layers: int) -> list[tuple[int, int]]:
    """The [first, last] runs of layers in 0..num_layers-1 absent from ``have``, found in O(len(have)) steps."""
    runs, start = [], 0
    for i in sorted(i for i in have if 0 <= i < num_layers) + [num_layers]:
        if i > start:
            runs.append((start, i - 1))
        start = i + 1
    return runs


def coverage_defects(found: Found, shape: DeclaredShape) -> list[Defect]:
    """Every layer (and rank) holds each role the file uses; nothing beyond the model's layers; no duplicates.

    Work is bounded by the number of entries the file holds, never by a layer count or index it states:
    a long run of missing layers is one defect.
    """
    out = []
    slots: dict[tuple[str, int | None], dict[int, ScaleEntry]] = defaultdict(dict)
    for e in found.entries:
        seen = slots[(e.role, e.rank)]
        if e.layer in seen:
            out.append(Defect("config", e.layer, e.name, f"layer {e.layer} {ROLE_NAME[e.role]}: two tensors, "
                              f"{seen[e.layer].name} and {e.name}"))
        seen[e.layer] = e
    if not slots:
        return out
    last = max(found.entries, key=lambda e: e.layer)
    num_layers = shape.num_layers if shape.num_layers is not None else last.layer + 1
    source = (f"{shape.source} {shape.layers_key}".rstrip() if shape.num_layers is not None
              else f"as {last.name} implies")
    roles = {role for role, _ in slots}
    ranks = sorted({rank for _, rank in slots}, key=lambda r: -1 if r is None else r)
    if found.ranks is not None:
        ranks = list(range(found.ranks))  # found.ranks counts the ranks the input holds (readers check it)
    for role in sorted(roles):
        sample = next(e for (r, _), layers in slots.items() if r == role for e in layers.values())
        for rank in ranks:
            have = slots.get((role, rank), {})
            where = f" rank {rank}" if rank is not None else ""
            if shape.cached_layers is not None:  # a hybrid model: only its KV-cache layers hold scales
                for i in (i for i in shape.cached_layers if i not in have):
                    name = _sibling_name(sample, i, rank)
                    out.append(Defect("missing-layer", i, name, f"layer {i}{where} has no {ROLE_NAME[role]} scale "
                                      f"({name} is absent; the model has a KV cache in layers "
                                      f"{', '.join(map(str, shape.cached_layers))}, {source})"))
                if found.kind == COMPRESSED_TENSORS:
                    out += _sharing_defects(found, shape, role, have, sample, rank)
                continue
            for first, end in _missing_runs(set(have), num_layers):
                if end - first < LISTED_RUN:
                    for i in range(first, end + 1):
                        name = _sibling_name(sample, i, rank)
                        out.append(Defect("missing-layer", i, name, f"layer {i}{where} has no {ROLE_NAME[role]} "
                                          f"scale ({name} is absent; the model has {num_layers} layers, {source})"))
                    continue
                name = _sibling_name(sample, first, rank)
                out.append(Defect("missing-layer", first, name, f"layers {first}..{end}{where} ({end - first + 1} "
                                  f"layers) have no {ROLE_NAME[role]} scale ({name} and on are absent; the model "
                                  f"has {num_layers} layers, {source})"))
            for i in sorted(i for i in have if i >= num_layers):
                out.append(Defect("extra-layer", i, have[i].name, f"layer {i} {ROLE_NAME[role]} scale "
                                  f"{have[i].name} is beyond the model's {num_layers} layers ({shape.source})"))
    return out


def _sharing_defects(found: Found, shape: DeclaredShape, role: str, have: dict[int, ScaleEntry], sample: ScaleEntry,
                     rank: int | None) -> list[Defect]:
    """A KV-sharing layer without a scale while the layer it reads has one: vLLM 0.34.0 dequantizes the cache it
    reads with its own attn._k_scale (gemma4.py:495-540, attention.py:816-820), 1.0 when none is loaded
    (quantization/kv_cache.py:118-122)."""
    out = []
    for i, source in sorted((shape.kv_sharing or {}).items()):
        if i not in have and source in have:
            name = _sibling_name(sample, i, rank)
            out.append(Defect("missing-layer", i, name, f"layer {i} reads layer {source}'s KV cache (KV sharing) but "
                              f"has no {ROLE_NAME[role]} scale ({name} is absent): vLLM dequantizes that cache with "
                              "the reading layer's own scale, 1.0 without one"))
    return out


def inferred_granularity(entry: ScaleEntry, shape: DeclaredShape) -> str | None:
    """tensor / head / channel from the number of values (None: matches none of the model's)."""
    n = entry.values.numel()
    kv_heads, head_dim = shape.kv_of(entry.layer, entry.role)
    heads = shape.num_heads if entry.role == "q" else kv_heads
    if n == 1:
        return "tensor"
    if heads is not None and n == heads:
        return "head"
    if entry.role != "q" and heads is not None and head_dim is not None and n == heads * head_dim:
        return "channel"
    return None


_KVQ_SHAPE = {"tensor": lambda h, d: (), "head": lambda h, d: (h,), "channel": lambda h, d: (h, d)}


def shape_defects(found: Found, shape: DeclaredShape) -> list[Defect]:
    out = []
    for e in found.entries:
        number, declared = found.spec(e.role)
        where = f"layer {e.layer} {ROLE_NAME[e.role]} scale {e.name}"
        kv_heads, head_dim = shape.kv_of(e.layer, e.role)
        if found.kind == KVQ_ARTIFACT and declared in _KVQ_SHAPE and kv_heads and head_dim:
            want = _KVQ_SHAPE[declared](kv_heads, head_dim)
            if e.shape != want:
                out.append(Defect("shape", e.layer, e.name, f"{where} has shape {e.shape}; per-{declared} scales of "
                                  f"{kv_heads} KV heads x head_dim {head_dim} have shape {want}"))
            continue
        if declared == PER_RANK:
            if e.values.numel() != 1:
                out.append(Defect("shape", e.layer, e.name, f"{where} holds {e.values.numel()} values; the "
                                  "format holds one per layer and rank"))
            continue
        heads = shape.num_heads if e.role == "q" else kv_heads
        if heads is None:
            continue
        got = inferred_granularity(e, shape)
        if got is None:
            channels = f" nor {heads} x {head_dim} channels" if e.role != "q" and head_dim else ""
            out.append(Defect("shape", e.layer, e.name, f"{where} has shape {e.shape}: neither one value, "
                              f"{heads} {'query' if e.role == 'q' else 'KV'} heads{channels} ({shape.source})"))
        elif e.role != "q" and declared is not None and got != declared and not (heads == 1 and got == "tensor"):
            out.append(Defect("config", e.layer, e.name, f"{where} has shape {e.shape} (per {got}), but "
                              f"{found.scheme.declared_in if found.scheme else 'the scheme'} declares per {declared}"))
    return out


def tp_defects(found: Found, shape: DeclaredShape, tp: int | None) -> list[Defect]:
    if tp is None:
        return []
    out = []
    if found.ranks is not None and found.ranks != tp:
        out.append(Defect("tp", None, found.entries[0].file if found.entries else found.path.name,
                          f"the scales are written for {found.ranks} tensor-parallel rank(s), but --tp is {tp}: "
                          f"an engine running tp {tp} needs one value per rank for {tp} ranks"))
    def unsplit(e: ScaleEntry) -> bool:  # a per-head / per-channel scale of heads tp cannot split
        heads = shape.kv_of(e.layer, e.role)[0]
        return heads is not None and heads % tp != 0 and tp % heads != 0 \
            and inferred_granularity(e, shape) in ("head", "channel")

    split = [e for e in found.entries if e.role != "q" and unsplit(e)]
    if split:
        e = split[0]
        heads = shape.kv_of(e.layer, e.role)[0]
        out.append(Defect("tp", e.layer, e.name, f"layer {e.layer} {ROLE_NAME[e.role]} scale {e.name} (and every "
                          f"per-head scale) holds {heads} KV heads, which --tp {tp} cannot split (neither divides "
                          "the other)"))
    return out


def config_defects(found: Found) -> list[Defect]:
    out = [Defect("config", None, where, f"{where}: {what}") for where, what in found.conflicts]
    kv = [e for e in found.entries if e.role != "q"]
    scheme = found.scheme
    if scheme is not None and not scheme.dynamic and not kv:
        out.append(Defect("config", None, scheme.declared_in, f"{scheme.declared_in} declares {scheme.text}, but "
                          "there are no K/V scale tensors: engines fall back to 1.0"))
    if scheme is None and kv and found.unread_method is None:
        out.append(Defect("config", kv[0].layer, kv[0].name, f"{len(kv)} K/V scale tensors ({kv[0].name}, ...) but no "
                          "KV-cache scheme in the config: engines do not apply them"))
    return out


def model_defects(found: Found, model: ModelShape | None) -> list[Defect]:
    """The scales against the model of --model: recorded shape, model_type and config hash."""
    if model is None:
        return []
    recorded = {"num_layers": found.shape.num_layers, "num_kv_heads": found.shape.num_kv_heads,
                "head_dim": found.shape.head_dim, "model_type": found.shape.model_type,
                "config_hash": found.config_hash}
    actual = {"num_layers": model.num_layers, "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim,
              "model_type": model.model_type, "config_hash": model.config_hash}
    per_layer = found.shape.layers is not None or not model.kv.uniform
    if per_layer:  # layers of different shapes: compared layer by layer
        del recorded["num_kv_heads"], recorded["head_dim"]
    bad = [f"{k} {recorded[k]} ({found.shape.source if k != 'config_hash' else 'recorded'}) vs {actual[k]} "
           f"({model.source})" for k in recorded if recorded[k] is not None and actual[k] is not None
           and recorded[k] != actual[k]]
    if per_layer and found.shape.num_kv_heads is not None:
        bad += [f"layer {i} {w.upper()} heads x dim {found.shape.kv_of(i, w)} vs {model.kv.of(i).of(w)} ({model.source})"
                for i in model.kv_layers for w in ("k", "v") if found.shape.kv_of(i, w) != model.kv.of(i).of(w)][:4]
    if not bad:
        return []
    return [Defect("other-model", None, found.path.name, "the scales are for a different model: " + "; ".join(bad))]


def merged_shape(found: Found, model: ModelShape | None) -> DeclaredShape:
    """The shape the checks use: what the input states, completed from --model."""
    s = found.shape
    if model is None:
        return s
    return DeclaredShape(s.num_layers if s.num_layers is not None else model.num_layers,
                   s.num_kv_heads if s.num_kv_heads is not None else model.num_kv_heads,
                   s.head_dim if s.head_dim is not None else model.head_dim, s.num_heads,
                   s.model_type or model.model_type,
                   s.source if s.num_layers is not None else model.source,
                   s.layers_key if s.num_layers is not None else "num_hidden_layers",
                   s.cached_layers if s.num_layers is not None else model.kv.cached_layers,
                   s.layers if s.layers is not None or model.kv.uniform
                   else {i: model.kv.of(i) for i in model.kv_layers}, s.kv_sharing)


def find_defects(found: Found, tp: int | None = None, model: ModelShape | None = None) -> list[Defect]:
    shape = merged_shape(found, model)
    return (config_defects(found) + model_defects(found, model) + value_defects(found)
            + uncalibrated_defects(found) + coverage_defects(found, shape) + shape_defects(found, shape)
            + tp_defects(found, shape, tp))
