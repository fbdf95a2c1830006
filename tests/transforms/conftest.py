"""Tiny random float32 models for the transforms tests, with norm weights and biases made non-trivial.

Random init leaves norm weights at 1 (0 for Gemma's 1 + weight) and biases at 0, where a fold that
forgot them, or scaled them the wrong way, would go unnoticed; here they are drawn at random.
"""

import pytest
import tiny_models
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from kvq.data import batches


def _roughen(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def build_model(arch: str | PretrainedConfig, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 model of ``arch`` in tests/tiny_models.py (or of a config), fields overridden, in eval mode."""
    config = tiny_models.CONFIGS[arch]() if isinstance(arch, str) else arch
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _roughen(model, seed)
    return model


@pytest.fixture
def tiny():
    return build_model


@pytest.fixture
def ids() -> torch.Tensor:
    """(2, 24) random token ids."""
    return torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calibration(ids):
    """kvq's own right-padded batches over ``ids`` rows, one shortened so padding is present (a fresh
    iterator on every call)."""
    rows = [row.tolist() for row in ids]
    rows[-1] = rows[-1][: len(rows[-1]) // 2]
    return lambda: batches(rows, batch_size=len(rows), pad_id=0)
