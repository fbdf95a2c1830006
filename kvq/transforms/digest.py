"""``weights_hash``: one digest of a set of named tensors (the weights a transform rewrote)."""

from __future__ import annotations

import hashlib

import torch


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # (n,) -> (n * itemsize,) bytes
    return digest.hexdigest()
