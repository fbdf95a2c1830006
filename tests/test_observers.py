"""Clipping observers: percentile within a bin of numpy's quantile; mse never worse than min/max on its own
objective, and on the raw data (an independent numpy quantizer) close to a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernels.test_reference import oracle_qdq

from kvq.artifacts.stats import KVStats
from kvq.calibration.consumer import StatsConsumer
from kvq.capture import CapturedKV
from kvq.errors import UsageError
from kvq.quant.histogram import BINS_PER_OCTAVE
from kvq.quant.qparams import choose_qparams
from kvq.recipe.schema import QuantSpec
from kvq.solving.observers import observed_range


def heavy_tailed(seed: int, heads: int = 3, n: int = 400, dim: int = 16) -> torch.Tensor:
    """(1, heads, n, dim): Student-t (3 degrees of freedom) values, an offset per channel, a wider head."""
    gen = np.random.default_rng(seed)
    x = gen.standard_t(3, size=(1, heads, n, dim)) + gen.normal(0, 2, size=(1, heads, 1, dim))
    x[:, -1] *= 5
    return torch.tensor(x, dtype=torch.float32)


def stats_of(x: torch.Tensor, level: str) -> KVStats:
    stats = KVStats()
    StatsConsumer(stats, level).kv(CapturedKV(layer_idx=0, key=x, value=x, token_mask=None))
    return stats


def groups_of(x: torch.Tensor, granularity: str) -> list[np.ndarray]:
    """The values each scale of a granularity covers, as flat numpy arrays (shape order of the scales)."""
    a = x[0].numpy().astype(np.float32)  # (heads, n, dim)
    if granularity == "tensor":
        return [a.reshape(-1)]
    if granularity == "head":
        return [a[h].reshape(-1) for h in range(a.shape[0])]
    return [a[h, :, c] for h in range(a.shape[0]) for c in range(a.shape[2])]


def empirical_error(values: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> float:
    """Squared round-trip error of the values with the scales of range [lo, hi], by the numpy oracle."""
    scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    s = np.full(values.shape, scale.item(), dtype=np.float32)
    z = None if zp is None else np.full(values.shape, zp.item(), dtype=np.float32)
    back, _ = oracle_qdq(values, s, z, spec.format)
    return float(((back.astype(np.float64) - values.astype(np.float64)) ** 2).sum())


CASES = [
    QuantSpec(format="int4", symmetric=False, granularity="head", observer="mse"),
    QuantSpec(format="int4", symmetric=True, granularity="head", observer="mse"),
    QuantSpec(format="int8", symmetric=False, granularity="head", observer="mse"),
    QuantSpec(format="fp8_e4m3", symmetric=True, granularity="tensor", observer="mse"),
    QuantSpec(format="int4", symmetric=False, granularity="channel", observer="mse"),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.format}-{'sym' if s.symmetric else 'asym'}-{s.granularity}")
def test_mse_is_no_worse_than_minmax_and_near_brute_force(spec):
    x = heavy_tailed(0)
    level = "channel" if spec.granularity == "channel" else "head"
    ts = stats_of(x, level).layers[0].k
    lo, hi = observed_range(ts, spec)
    mm_lo, mm_hi = observed_range(ts, spec.model_copy(update={"observer": "minmax"}))
    better = 0
    for g, values in enumerate(groups_of(x, spec.granularity)):
        a, b = lo.reshape(-1)[g].item(), hi.reshape(-1)[g].item()
        a0, b0 = mm_lo.reshape(-1)[g].item(), mm_hi.reshape(-1)[g].item()
        if spec.symmetric:  # a symmetric range is +-absmax
            a0, b0 = -max(-a0, b0), max(-a0, b0)
        assert a0 <= a <= b <= b0  # inside the observed range
        mse, minmax = empirical_error(values, a, b, spec), empirical_error(values, a0, b0, spec)
        # brute force on the raw data: every symmetric shrink in 0.5% steps (and each end alone when asymmetric)
        fractions = np.arange(1.0, 0.02, -0.005)
        best = min(empirical_error(values, a0 * t, b0 * t, spec) for t in fractions)
        if not spec.symmetric:
            best = min(best, *(empirical_error(values, a0 * t, b0, spec) for t in fractions),
                       *(empirical_error(values, a0, b0 * t, spec) for t in fractions))
        assert mse <= minmax * 1.02  # never worse beyond the histogram's estimate
        assert mse <= best * 1.10  # and close to the optimum the raw data shows
        better += mse < minmax * 0.97
    if spec.format == "int4":
        assert better > 0  # on heavy tails int4 clipping pays


def test_percentile_is_within_a_bin_of_numpys_quantile():
    x = heavy_tailed(1)
    ts = stats_of(x, "head").layers[0].v
    spec = QuantSpec(format="int8", symmetric=True, granularity="head", observer="percentile", percentile=99.0)
    lo, hi = observed_range(ts, spec)
    exact = np.quantile(np.abs(x[0].numpy().astype(np.float64)).reshape(3, -1), 0.99, axis=1, method="inverted_cdf")
    assert torch.equal(lo, -hi)
    assert np.all(hi.numpy() >= exact * (1 - 1e-6)) and np.all(hi.numpy() <= exact * 2 ** (1 / BINS_PER_OCTAVE) * 1.0001)
    asym = spec.model_copy(update={"symmetric": False})
    lo, hi = observed_range(ts, asym)
    values = x[0].numpy().astype(np.float64).reshape(3, -1)
    top, bottom = np.quantile(values, 0.99, axis=1), np.quantile(values, 0.01, axis=1)
    assert np.all(hi.numpy() >= top * (1 - 1e-3) - 1e-6) and np.all(lo.numpy() <= bottom * (1 - 1e-3) + 1e-6)


def test_percentile_never_widens_the_observed_range():
    x = torch.full((1, 1, 10, 4), 3.0)
    ts = stats_of(x, "head").layers[0].k
    spec = QuantSpec(format="int8", symmetric=True, granularity="head", observer="percentile")
    lo, hi = observed_range(ts, spec)
    assert hi.item() == 3.0 and lo.item() == -3.0  # the bin's upper edge (3.06) is cut back to the max


def test_clipping_observers_need_histograms():
    stats = KVStats()
    StatsConsumer(stats).kv(CapturedKV(layer_idx=0, key=heavy_tailed(2), value=heavy_tailed(3), token_mask=None))
    ts = stats.layers[0].k
    with pytest.raises(UsageError, match="hold no histograms"):
        observed_range(ts, QuantSpec(format="int4", symmetric=False, granularity="head", observer="mse"))
    per_head = stats_of(heavy_tailed(2), "head").layers[0].k
    with pytest.raises(UsageError, match="per-channel clipping observer needs per-channel"):
        observed_range(per_head, QuantSpec(format="int4", symmetric=False, granularity="channel", observer="mse"))


def test_kvq_solve_runs_clipping_observers_without_the_model(tiny_llama, tmp_path):
    """calibrate --histograms channel once; the model is gone; solve with mse / percentile per channel, per head."""
    import shutil

    from kvq.artifacts.scales import KVScales
    from kvq.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(model), "--dataset", "pydoc", "--samples", "4", "--seqlen", "64",
                 "--device", "cpu", "--recipe", "int4-asym-per-channel", "--histograms", "channel",
                 "--out", str(out)]) == 0
    shutil.rmtree(model)
    minmax = KVScales.load(out)
    for granularity in ("channel", "head"):
        for observer in ("mse", "percentile"):
            recipe = tmp_path / f"{observer}-{granularity}.yaml"
            recipe.write_text(f"format: int4\nsymmetric: false\ngranularity: {granularity}\nobserver: {observer}\n")
            solved = tmp_path / f"{observer}-{granularity}"
            assert main(["solve", str(out), "--recipe", str(recipe), "--out", str(solved)]) == 0
            scales = KVScales.load(solved)
            if granularity == "channel":  # clipping only narrows the range: scales no larger than min/max's
                for i, layer in scales.layers.items():
                    assert bool((layer.k_scale <= minmax.layers[i].k_scale * (1 + 1e-6)).all())
                    assert bool((layer.v_scale <= minmax.layers[i].v_scale * (1 + 1e-6)).all())
