"""Per-tensor sparsification masks (TIES trim, Breadcrumbs band, DARE drop), mergekit's semantics.

Cut-offs are found with numpy's partition (a selection, O(n)) instead of a full sort: the masks
equal mergekit's argsort masks except among exactly tied magnitudes.
"""
from __future__ import annotations

import numpy as np
import torch


def _abs_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().reshape(-1).abs().float().numpy()


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the largest-magnitude `density` fraction of `x` (at least one entry)."""
    n = x.numel()
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    k = max(1, int(density * n))
    a = x.detach().abs()  # computed once: the cut is found on a float32 copy, the mask on `a`
    threshold = np.partition(a.reshape(-1).float().numpy(), n - k)[n - k]
    return a >= float(threshold)


def band_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top `gamma` fraction and the smallest ones, keep `density` in between."""
    n = x.numel()
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    target = int(density * n)
    if target <= 0 or n == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    lo_rank, hi_rank = n_bot, n_bot + target - 1  # ascending ranks kept, inclusive
    a = x.detach().abs()
    part = np.partition(a.reshape(-1).float().numpy(), [lo_rank, hi_rank])
    mask = a >= float(part[lo_rank])
    return mask.logical_and_(a <= float(part[hi_rank]))


def bernoulli_mask(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (seeded)."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=generator) < density


def apply_mask(x: torch.Tensor, mask: torch.Tensor, rescale_l1: bool, eps: float = 1e-7) -> torch.Tensor:
    """Zero the dropped entries; optionally rescale so the L1 norm stays that of `x`."""
    kept = x * mask
    if not rescale_l1:
        return kept
    before = x.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)
