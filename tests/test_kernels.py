"""The fused numba kernels against the torch definitions they replace (same values, one pass)."""
from __future__ import annotations

import pytest
import torch

from merging import AGGREGATORS, kernels, seeds

FUSED = [name for name, agg in AGGREGATORS.items() if agg.kernel is not None]


def test_kernels_are_on():
    """requirements.txt installs numba: the suite must exercise the fused path, not the fallback."""
    assert kernels.enabled()
    assert {"ties", "dare_ties", "breadcrumbs_ties", "median", "fedgma", "slerp", "dare_linear"} <= set(FUSED)


def _case(k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(k, n, generator=g)
    deltas[:, ::7] = 0  # exact zeros: excluded from TIES' vote, sign 0 for FedGMA
    deltas[:, 1::11] = deltas[0, 1::11]  # exact ties between tasks: the median's sort
    weights = torch.randn(k, generator=g)
    weights[0] = abs(weights[0])
    return deltas, torch.randn(n, generator=g), weights


def _reference(agg, deltas, weights, hp, base, lam):
    """θ₀ + λ·U by the torch definition (kernels off)."""
    return base + lam * agg.update(deltas, weights, **agg.kwargs(hp, "t", base))


@pytest.mark.parametrize("method", FUSED)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_fused_equals_the_torch_definition(method, k):
    agg = AGGREGATORS[method]
    if not agg.accepts(k):
        pytest.skip(f"{method} does not merge {k} models")
    n = 3 * kernels.BLOCK + 17  # several blocks and a ragged last one
    deltas, base, weights = _case(k, n, seed=k)
    for hyper in ({}, {"normalize": True}, {"normalize": False}, {"rho": 0.8}, {"median_kind": "lower"}, {"t": 0.2}):
        hyper = {h: v for h, v in {**hyper, "density": 0.6}.items() if h in {p.name for p in agg.params}}
        hp = agg.check_params(hyper, k)
        got, bad = agg.merge(deltas, weights, base, 0.7, hp, tensor="t")
        assert bad == 0  # the kernel ran (and counted)
        torch.testing.assert_close(got, _reference(agg, deltas, weights, hp, base, 0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", FUSED)
def test_fused_handles_empty_and_single_entry_tensors(method):
    agg = AGGREGATORS[method]
    k = min(3, agg.max_models or 3)
    for n in (0, 1):
        deltas, base, weights = _case(k, n, seed=n)
        hp = agg.check_params({}, k)
        got, bad = agg.merge(deltas, weights, base, 1.0, hp, tensor="t")
        assert got.shape == (n,) and bad == 0
        if n:
            torch.testing.assert_close(got, _reference(agg, deltas, weights, hp, base, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "median", "fedgma", "slerp"])
def test_fused_counts_overflow(method):
    """A merge that overflows float32 is reported by the kernel's count, not by a second pass."""
    agg = AGGREGATORS[method]
    k = 2
    deltas = torch.full((k, 50), 3e38)
    base = torch.zeros(50)
    hp = agg.check_params({}, k)
    got, bad = agg.final_step(deltas, torch.tensor([1.0, 1.0]), base, 1000.0, hp, tensor="t")
    assert bad == int((~torch.isfinite(got)).sum()) > 0


# ----------------------------------------------------------------- sparsification kernels

def _magnitudes(n: int, seed: int, quantized: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return (x * 8).round() / 8 if quantized else x  # quantized: many exact ties at any cut


@pytest.mark.parametrize("n", [1, 5, 1000, kernels.DIRECT + 1, 3 * kernels.DIRECT + 123])
@pytest.mark.parametrize("quantized", [False, True])
def test_order_statistic_is_exact(n, quantized):
    x = _magnitudes(n, n, quantized)
    srt = x.abs().sort().values
    ranks = sorted({0, n // 3, n // 2, n - 1, max(0, n - 7)})
    for rank in ranks:
        assert kernels.abs_order_stat(x.numpy(), rank) == srt[rank]
    for r1, r2 in zip(ranks, ranks[1:]):  # two at once, as Breadcrumbs' band asks
        assert kernels.abs_order_stats(x.numpy(), r1, r2) == (srt[r1], srt[r2])


def test_order_statistic_when_the_sample_misses():
    """An adversarial tensor whose sampled entries are all large: the bracket misses, and the
    fallback (select on everything) still returns the exact value."""
    n = 4 * kernels.DIRECT + 11
    step = max(1, n // min(kernels.SAMPLE, max(1024, n // 256)))
    ns = (n + step - 1) // step
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n, generator=g) * 1e-3
    idx = torch.tensor([min(n - 1, j * step + (j * 7919) % step) for j in range(ns)])
    x[idx] = 1.0 + torch.rand(ns, generator=g)
    srt = x.abs().sort().values
    for rank in (n // 2, n // 10, n - ns - 1):
        assert kernels.abs_order_stat(x.numpy(), rank) == srt[rank]


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_keep_top_and_band_equal_the_masks(density, rescale, quantized):
    from merging import sparsify

    x = _magnitudes(2 * kernels.DIRECT + 77, 3, quantized)
    torch.testing.assert_close(sparsify.keep_top(x, density, rescale),
                               sparsify.apply_mask(x, sparsify.topk_mask(x, density), rescale), rtol=1e-6, atol=0)
    assert torch.equal(sparsify.keep_top(x, density, False) != 0, (x != 0) & sparsify.topk_mask(x, density))
    for gamma in (0.0, 0.05):
        got = sparsify.keep_band(x, density, gamma, rescale)
        mask = sparsify.band_mask(x, density, gamma)
        torch.testing.assert_close(got, sparsify.apply_mask(x, mask, rescale), rtol=1e-6, atol=0)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("rescale", [False, True])
def test_keep_random_equals_the_mask_and_keeps_the_rate(density, rescale):
    """The kernel's hash stream is bit-identical to the numpy one that defines the DARE mask."""
    from merging import sparsify

    x = _magnitudes(100_003, 4, False)
    seed = seeds.task_seed(12345, 2)
    mask = sparsify.bernoulli_mask(x, density, seed)
    got = sparsify.keep_random(x, density, seed, rescale)
    torch.testing.assert_close(got, sparsify.apply_mask(x, mask, rescale), rtol=1e-6, atol=0)
    assert abs(float(mask.float().mean()) - density) < 0.01
    assert not torch.equal(mask, sparsify.bernoulli_mask(x, density, seeds.task_seed(12345, 3)))
