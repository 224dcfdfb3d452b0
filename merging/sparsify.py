"""Per-tensor sparsification (TIES trim, Breadcrumbs band, DARE drop), mergekit's semantics.

The masks are the definitions: cut-offs from numpy's partition (a selection, O(n)) instead of a
full sort, so they equal mergekit's argsort masks except among exactly tied magnitudes. `keep_top`,
`keep_band` and `keep_random` return the sparsified (optionally L1-rescaled) tensor: through the
fused kernels when they are on (same masks, three or four passes instead of a full selection),
else through the masks.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
RANDOM_BITS = 24  # DARE keeps entry j when its 24-bit hash is below density · 2²⁴


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the largest-magnitude `density` fraction of `x` (at least one entry)."""
    n = x.numel()
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    k = max(1, int(density * n))
    a = x.detach().abs()  # computed once: the cut is found on a float32 copy, the mask on `a`
    return a >= _order_stats(a, [n - k])[0]


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
    lo, hi = _order_stats(a, [lo_rank, hi_rank])
    return (a >= lo).logical_and_(a <= hi)


def _order_stats(a: torch.Tensor, ranks: list[int]) -> list[float]:
    """The values of the given ascending ranks of `a` (float32): numpy's selection on the CPU, torch's
    kthvalue elsewhere (a GPU: no copy of the tensor to the host)."""
    flat = a.reshape(-1).float()
    if flat.device.type == "cpu":
        part = np.partition(flat.numpy(), ranks)
        return [float(part[r]) for r in ranks]
    return [float(flat.kthvalue(r + 1).values) for r in ranks]


def random_bits(n: int, seed: int) -> np.ndarray:
    """splitmix64 of (seed, j) for j < n, top 24 bits: a counter-based stream, reproducible anywhere."""
    z = np.uint64(seed) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return (z ^ (z >> np.uint64(31))) >> np.uint64(64 - RANDOM_BITS)


def random_threshold(density: float) -> int:
    return int(density * (1 << RANDOM_BITS))


def bernoulli_mask(x: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, from a seeded counter-based hash."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    bits = random_bits(x.numel(), seed)
    return torch.from_numpy(bits < np.uint64(random_threshold(density))).reshape(x.shape).to(x.device)


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


# ----------------------------------------------------------------------------- sparsified tensors

def _fused_ok(x: torch.Tensor) -> bool:
    return (kernels.enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and x.numel() > 0)  # numba: CPU tensors only


def keep_top(x: torch.Tensor, density: float, rescale: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x restricted to its top `density` magnitudes (TIES' trim)."""
    if not _fused_ok(x) or density <= 0 or density >= 1:
        return _into(apply_mask(x, topk_mask(x, density), rescale), out)
    n = x.numel()
    flat = x.reshape(-1).numpy()
    threshold = kernels.abs_order_stat(flat, n - max(1, int(density * n)))
    return _keep_between(x, threshold, np.float32(np.inf), rescale, out)


def keep_band(x: torch.Tensor, density: float, gamma: float, rescale: bool,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """x restricted to a middle band of magnitudes (Breadcrumbs)."""
    n = x.numel()
    target = int(density * n)
    if not _fused_ok(x) or density >= 1 or target <= 0:
        return _into(apply_mask(x, band_mask(x, density, gamma), rescale), out)
    n_top = int(gamma * n)
    lo_rank = max(0, n - target - n_top)
    flat = x.reshape(-1).numpy()
    lo, hi = kernels.abs_order_stats(flat, lo_rank, lo_rank + target - 1)  # one counting pass for both
    return _keep_between(x, lo, hi, rescale, out)


def keep_random(x: torch.Tensor, density: float, seed: int, rescale: bool,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """DARE: x with each entry kept with probability `density` (seeded), optionally L1-rescaled."""
    if not _fused_ok(x) or density >= 1:
        return _into(apply_mask(x, bernoulli_mask(x, density, seed), rescale), out)
    out = torch.empty_like(x) if out is None else out
    kernels.keep_random(x.reshape(-1).numpy(), np.uint64(random_threshold(density)), np.uint64(seed), rescale,
                        out.view(-1).numpy())
    return out


def _keep_between(x, lo, hi, rescale, out):
    out = torch.empty_like(x) if out is None else out
    kernels.keep_between(x.reshape(-1).numpy(), np.float32(lo), np.float32(hi), rescale, out.view(-1).numpy())
    return out


def _into(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return t if out is None else out.copy_(t)


# ----------------------------------------------------------------------------- mergekit's selections, in any dtype
# The exact path (engine.exact_merge) runs these on tensors in the merge's compute dtype. They select
# by mergekit's own ordering (torch's argsort of the float32 magnitudes), so among tied magnitudes
# (common in bfloat16) they keep the same entries mergekit keeps; the fast float32 path above keeps
# all tied entries at the cut instead.


def exact_top(x: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES trim: the `density` fraction of largest magnitudes (at least one entry)."""
    if density >= 1:
        return x
    n = x.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(x)
    k = max(1, int(density * n))
    mask = torch.zeros(n, dtype=x.dtype, device=x.device)
    mask[torch.argsort(x.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return apply_mask(x, mask.reshape_as(x), rescale)


def exact_band(x: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: drop the top `gamma` fraction, then the smallest, keeping `density` (ascending ranks)."""
    if density >= 1:
        return x
    n = x.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(x.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=x.dtype, device=x.device)
    mask[order[n_bot:n_bot + target]] = 1
    return apply_mask(x, mask.reshape_as(x), rescale)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """mergekit draws its random masks in bfloat16 for bfloat16 tensors, else in float32."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float64) else torch.float32


def exact_random(x: torch.Tensor, density: float, seed: int, rescale: bool) -> torch.Tensor:
    """DARE drop with our seeded mask (mergekit's is torch's global RNG), rescaled in mergekit's dtype."""
    if density >= 1:
        return x
    work = _work_dtype(x)
    mask = bernoulli_mask(x, density, seed).to(work)
    return apply_mask(x.to(work), mask, rescale).to(x.dtype)


def uniform(n: int, seed: int) -> torch.Tensor:
    """n uniforms in [0, 1) on a 2⁻²⁴ grid from the same counter-based hash as the DARE mask."""
    return torch.from_numpy(random_bits(n, seed).astype(np.float64) / float(1 << RANDOM_BITS))


def exact_della(x: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the magnitude's rank within each row,
    from density − ε (smallest) to density + ε (largest); then optional L1 rescale."""
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if density + epsilon >= 1 or density - epsilon <= 0:
        from .errors import MergeError

        raise MergeError(f"della: epsilon {epsilon:g} must keep density ± epsilon inside (0, 1) (density {density:g})")
    work = _work_dtype(x)
    rows = x.unsqueeze(0) if x.dim() < 2 else x
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(work) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    keep = uniform(rows.numel(), seed).reshape(rows.shape).to(rows.device) < probs.double()
    out = apply_mask(rows.to(work), keep.to(work), rescale)
    return out.to(x.dtype).reshape(x.shape)
