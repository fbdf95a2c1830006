"""Value rotations are orthogonal, and for power-of-two head_dim a normalised Hadamard times signs.

Oracle for the Hadamard matrix: the closed form H[i, j] = (-1)^popcount(i & j) (Walsh/Sylvester),
built here entry by entry, not by kvq's recursive construction.
"""

import math

import pytest
import torch

from kvq.transforms.rotations import orthogonal_matrix, value_rotations


def walsh_hadamard(n: int) -> torch.Tensor:
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                        dtype=torch.float64)


@pytest.mark.parametrize("head_dim", [1, 2, 8, 16, 64, 128, 12, 24, 80, 96])
def test_rotations_are_orthogonal_in_float64(head_dim):
    r = orthogonal_matrix(head_dim, torch.Generator().manual_seed(0))
    assert r.dtype == torch.float64 and r.shape == (head_dim, head_dim)
    torch.testing.assert_close(r.T @ r, torch.eye(head_dim, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_power_of_two_rotation_is_hadamard_times_signs(head_dim):
    r = orthogonal_matrix(head_dim, torch.Generator().manual_seed(5))
    h = walsh_hadamard(head_dim) / math.sqrt(head_dim)
    signs = h.T @ r  # R = H D  =>  D = H^T R
    torch.testing.assert_close(signs, torch.diag(torch.diagonal(signs)), rtol=0, atol=1e-12)
    assert set(torch.diagonal(signs).round().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(torch.diagonal(signs).abs(), torch.ones(head_dim, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert len(set(torch.diagonal(signs).round().tolist())) == 2  # the signs are random, not all +1


def test_rotations_are_seeded_per_layer_and_head():
    a = value_rotations(3, [2, 2, 2], [16, 16, 16], seed=0)
    b = value_rotations(3, [2, 2, 2], [16, 16, 16], seed=0)
    c = value_rotations(3, [2, 2, 2], [16, 16, 16], seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (2, 16, 16) and not torch.equal(a[0][0], a[0][1]) and not torch.equal(a[0][0], a[1][0])
