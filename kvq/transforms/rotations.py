"""Per-KV-head orthogonal matrices for value rotation, exactly orthogonal in float64.

Power-of-two head_dim: a normalised Hadamard matrix (Sylvester's construction) times a seeded
random sign diagonal, R = H D / sqrt(d): it spreads every channel over all channels evenly, which is
what flattens per-channel outliers. Other head_dim: a seeded Haar-random orthogonal matrix from the
QR decomposition of a Gaussian matrix (signs fixed by R's diagonal, so the distribution is uniform).
"""

from __future__ import annotations

import math

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard(n: int) -> torch.Tensor:
    """(n, n) float64 Sylvester Hadamard matrix of +-1, n a power of two.

    Hand-written: torch has none, and four lines do not justify a scipy dependency.
    """
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)  # (m, m) -> (2m, 2m)
    return h


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 of +-1, drawn from ``generator``."""
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1


def orthogonal_matrix(head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(head_dim, head_dim) float64 orthogonal matrix R for one KV head; ``generator`` makes it repeatable."""
    if is_power_of_two(head_dim):
        h = hadamard(head_dim) / math.sqrt(head_dim)  # (d, d)
        return h * random_signs(head_dim, generator)[None, :]  # H @ diag(signs)
    gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]  # Haar: make R's diagonal positive


def value_rotations(num_layers: int, num_kv_heads: list[int], head_dims: list[int], seed: int) -> list[torch.Tensor]:
    """Per layer (kv_heads, head_dim, head_dim) float64, drawn in (layer, head) order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.stack([orthogonal_matrix(head_dims[i], generator) for _ in range(num_kv_heads[i])])
        for i in range(num_layers)
    ]
