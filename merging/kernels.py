"""Fused kernels: θ₀ + λ·U written in one pass over the stacked task vectors.

The aggregators in aggregators.py are the definitions: small torch functions, each elementwise
op a full pass over a [K, n] stack. On one CPU core those passes, not memory, bound the
non-linear methods (TIES's consensus alone is ~8 of them). These numba loops compute the same
values block by block in cache, read the stack once and write the output once, and count the
non-finite results on the way so no extra pass checks them.

All take C-contiguous float32 numpy arrays: the stack `t` [K, n], weights `w` [K], the base
`base` [n] and the output `out` [n], and return the number of non-finite outputs. They release
the GIL (live sessions merge on their own threads) and run on the calling thread only.

Set FEDMERGE_KERNELS=0 to use the torch definitions instead (benchmarks, bisecting).
"""
from __future__ import annotations

import importlib.util
import math
import os
import threading

import numpy as np

BLOCK = 4096  # coordinates per block: K rows of it stay in L1/L2


def enabled() -> bool:
    """Whether the fused kernels run (numba installed and not switched off)."""
    return _HAVE_NUMBA and os.environ.get("FEDMERGE_KERNELS", "1") != "0"


_HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_PLAIN: dict[str, tuple] = {}  # kernel name -> (python function, numba options), in definition order
_COMPILE_LOCK = threading.Lock()


def _jit(fn=None, **options):
    """Declare a kernel. numba is imported (0.2 s) and the kernels wrapped at the first call of any
    of them, so a merge that needs none (Task Arithmetic, linear) does not pay for it."""
    if fn is None:
        return lambda f: _jit(f, **options)
    _PLAIN[fn.__name__] = (fn, options)

    def first_call(*args):
        _compile_all()
        return globals()[fn.__name__](*args)

    first_call.__name__, first_call.__doc__ = fn.__name__, fn.__doc__
    return first_call


def _compile_all() -> None:
    with _COMPILE_LOCK:
        if not _HAVE_NUMBA:
            for name, (fn, _) in _PLAIN.items():  # plain Python: correct, very slow (tests only)
                globals()[name] = fn
            return
        import numba

        for name, (fn, options) in _PLAIN.items():  # helpers first: callers resolve them when compiled
            if not isinstance(globals()[name], numba.core.registry.CPUDispatcher):
                globals()[name] = numba.njit(nogil=True, cache=True, error_model="numpy", **options)(fn)


# Inner loops run over 1-D slices (row = t[i, s0:s0 + m]): LLVM vectorizes those, not 2-D indexing.


@_jit
def _weighted(t, w, s0, s):
    """s = Σ wᵢ·t[i, s0:s0 + len(s)]: the weighted sum of one block."""
    m = s.size
    s[:] = 0
    for i in range(t.shape[0]):
        wi, row = w[i], t[i, s0:s0 + m]
        for j in range(m):
            s[j] += wi * row[j]


@_jit
def _emit(x, base, lam, out, s0):
    """out[s0:] = base[s0:] + λ·x for one block; returns how many results are not finite."""
    m = x.size
    o, b = out[s0:s0 + m], base[s0:s0 + m]
    bad = 0
    for j in range(m):
        r = b[j] + lam * x[j]
        o[j] = r
        bad += 0 if math.isfinite(r) else 1
    return bad


@_jit
def consensus(t, w, base, lam, normalize, out):
    """TIES: elect sign(Σ wᵢτᵢ) (0 counts as +), sum the agreeing wᵢτᵢ, divide by their Σ wᵢ."""
    k, n = t.shape
    s_buf = np.empty(BLOCK, np.float32)
    num_buf = np.empty(BLOCK, np.float32)
    den_buf = np.empty(BLOCK, np.float32)
    zero = np.float32(0)
    bad = 0
    for s0 in range(0, n, BLOCK):
        m = min(BLOCK, n - s0)
        s, num, den = s_buf[:m], num_buf[:m], den_buf[:m]
        _weighted(t, w, s0, s)
        num[:] = 0
        den[:] = 0
        for i in range(k):
            wi, row = w[i], t[i, s0:s0 + m]
            for j in range(m):
                v = wi * row[j]
                keep = (v > 0) if s[j] >= 0 else (v < 0)
                num[j] += v if keep else zero
                den[j] += wi if keep else zero
        if normalize:
            for j in range(m):
                num[j] = num[j] / den[j] if den[j] != 0 else num[j]
        bad += _emit(num, base, lam, out, s0)
    return bad


@_jit
def median(t, w, base, lam, lower, out):
    """Coordinate-wise median of wᵢτᵢ (odd-even transposition sort of K rows, in cache)."""
    k, n = t.shape
    rows = np.empty((k, BLOCK), np.float32)
    mid = (k - 1) // 2
    average = k % 2 == 0 and not lower
    bad = 0
    for s0 in range(0, n, BLOCK):
        m = min(BLOCK, n - s0)
        for i in range(k):
            wi, row, u = w[i], t[i, s0:s0 + m], rows[i, :m]
            for j in range(m):
                u[j] = wi * row[j]
        for rnd in range(k):
            for i in range(rnd % 2, k - 1, 2):
                lo, hi = rows[i, :m], rows[i + 1, :m]
                for j in range(m):
                    a, c = lo[j], hi[j]
                    lo[j] = min(a, c)
                    hi[j] = max(a, c)
        lo, hi = rows[mid, :m], rows[min(mid + 1, k - 1), :m]
        if average:
            for j in range(m):
                lo[j] = (lo[j] + hi[j]) * np.float32(0.5)
        bad += _emit(lo, base, lam, out, s0)
    return bad


@_jit
def gradient_masked(t, w, base, lam, rho, out):
    """FedGMA: Σ wᵢτᵢ times A = |Σ sign(wᵢτᵢ)|/K where A < ρ (1 elsewhere)."""
    k, n = t.shape
    s_buf = np.empty(BLOCK, np.float32)
    agree_buf = np.empty(BLOCK, np.float32)
    one, zero = np.float32(1), np.float32(0)
    bad = 0
    for s0 in range(0, n, BLOCK):
        m = min(BLOCK, n - s0)
        s, agree = s_buf[:m], agree_buf[:m]
        s[:] = 0
        agree[:] = 0
        for i in range(k):  # both sums in one read of the block
            wi, row = w[i], t[i, s0:s0 + m]
            sw = one if wi > 0 else (-one if wi < 0 else zero)
            for j in range(m):
                x = row[j]
                s[j] += wi * x
                agree[j] += sw if x > 0 else (-sw if x < 0 else zero)
        for j in range(m):
            a = abs(agree[j]) / np.float32(k)
            s[j] = s[j] if a >= rho else s[j] * a
        bad += _emit(s, base, lam, out, s0)
    return bad


@_jit
def weighted_sum(t, w, base, lam, out):
    """θ₀ + λ·Σ wᵢτᵢ (the live app uses BLAS's addmv; the disk merge of sparsified stacks this)."""
    n = t.shape[1]
    s_buf = np.empty(BLOCK, np.float32)
    bad = 0
    for s0 in range(0, n, BLOCK):
        s = s_buf[:min(BLOCK, n - s0)]
        _weighted(t, w, s0, s)
        bad += _emit(s, base, lam, out, s0)
    return bad


@_jit(fastmath={"reassoc"})  # float64 sums in any order: vectorized
def endpoint_products(t, w, base, with_base):
    """SLERP's float64 sums ‖v0‖², ‖v1‖², v0·v1 for v0 = θ₀ (or θ₀ + w₀τ₀), v1 = θ₀ + w₋₁τ₋₁."""
    k, n = t.shape
    first, last = t[0], t[k - 1]
    w0, w1 = w[0], w[k - 1]
    aa = 0.0
    bb = 0.0
    ab = 0.0
    for j in range(n):
        x = base[j]
        a = x if with_base else x + w0 * first[j]
        c = x + w1 * last[j]
        aa += float(a) * float(a)
        bb += float(c) * float(c)
        ab += float(a) * float(c)
    return aa, bb, ab


@_jit
def interpolate(t, w, base, lam, with_base, c0, c1, out):
    """θ₀ + λ·(c0·v0 + c1·v1 − θ₀) with v0, v1 as in endpoint_products."""
    k, n = t.shape
    first, last = t[0], t[k - 1]
    w0, w1 = w[0], w[k - 1]
    bad = 0
    for j in range(n):
        x = base[j]
        a = x if with_base else x + w0 * first[j]
        c = x + w1 * last[j]
        r = x + lam * (c0 * a + c1 * c - x)
        out[j] = r
        if not math.isfinite(r):
            bad += 1
    return bad


# ----------------------------------------------------------------------------- sparsification
# The weight-independent step of TIES / Breadcrumbs / DARE: exact order statistics of |τ| found
# from a sample bracket (one counting pass, one gathering pass and numpy's selection on the ~1%
# inside, instead of a selection on everything), then the kept entries written with their L1
# rescale (one pass to sum, one to write).

SAMPLE = 1 << 14  # at most this many entries sampled to bracket an order statistic (sorting it: ~1 ms)
DIRECT = 1 << 16  # tensors up to this size: numpy's selection on |x| directly


@_jit
def _sorted_sample(x):
    """A sorted sample of |x|: jittered stride (no aliasing with row lengths), up to SAMPLE entries."""
    n = x.size
    step = max(1, n // min(SAMPLE, max(1024, n // 256)))
    ns = (n + step - 1) // step
    sample = np.empty(ns, np.float32)
    for j in range(ns):
        sample[j] = abs(x[min(n - 1, j * step + (j * 7919) % step)])
    sample.sort()
    return sample


@_jit
def _ends(sample, n, rank):
    """[lo, hi] holding the `rank`-th smallest |x| with overwhelming probability (6 sigma)."""
    ns = sample.size
    f = rank / n
    margin = 6.0 * math.sqrt(ns * f * (1.0 - f)) + 16.0
    a = int(f * ns - margin)
    b = int(f * ns + margin) + 1
    return (sample[a] if a > 0 else np.float32(0)), (sample[b] if b < ns else np.float32(np.inf))


@_jit
def _where(rank, below, at_lo, upto, at_hi):
    """0: the value is lo, 1: hi, 2: strictly inside (lo, hi), 3: outside (the sample missed)."""
    if below <= rank < below + at_lo:
        return 0
    if upto <= rank < upto + at_hi:
        return 1
    if below + at_lo <= rank < upto:
        return 2
    return 3


@_jit
def _gather(x, lo, hi, m):
    """The m entries with lo < |x| < hi (branch-free compaction: 6x faster than an `if` here)."""
    inside = np.empty(m + 1, np.float32)
    c = 0
    for j in range(x.size):
        v = abs(x[j])
        inside[min(c, m)] = v
        c += 1 if (v > lo) & (v < hi) else 0
    return inside[:m]


@_jit
def _brackets(x, r1, r2):
    """Locate the r1-th and r2-th smallest |x| with one sample and one counting pass.

    For each: (value, empty, 0) when it sits at a bracket end (the zeros of a sparse task vector
    cost nothing), else (nan, the |x| strictly inside the bracket, its rank among them). When the
    sample misses, that bracket widens to everything.
    """
    n = x.size
    sample = _sorted_sample(x)
    lo1, hi1 = _ends(sample, n, r1)
    lo2, hi2 = _ends(sample, n, r2)
    for attempt in range(2):
        b1 = a1 = u1 = h1 = 0
        b2 = a2 = u2 = h2 = 0
        for j in range(n):
            v = abs(x[j])
            b1 += 1 if v < lo1 else 0
            a1 += 1 if v == lo1 else 0
            u1 += 1 if v < hi1 else 0
            h1 += 1 if v == hi1 else 0
            b2 += 1 if v < lo2 else 0
            a2 += 1 if v == lo2 else 0
            u2 += 1 if v < hi2 else 0
            h2 += 1 if v == hi2 else 0
        w1 = _where(r1, b1, a1, u1, h1)
        w2 = _where(r2, b2, a2, u2, h2)
        if w1 != 3 and w2 != 3:
            break
        if w1 == 3:
            lo1, hi1 = np.float32(0), np.float32(np.inf)
        if w2 == 3:
            lo2, hi2 = np.float32(0), np.float32(np.inf)
    empty = np.empty(0, np.float32)
    nan = np.float32(np.nan)
    v1, in1, k1 = (lo1 if w1 == 0 else hi1), empty, 0
    if w1 == 2:
        v1, in1, k1 = nan, _gather(x, lo1, hi1, u1 - b1 - a1), r1 - b1 - a1
    v2, in2, k2 = (lo2 if w2 == 0 else hi2), empty, 0
    if w2 == 2:
        if r2 == r1:
            v2, in2, k2 = v1, in1, k1
        else:
            v2, in2, k2 = nan, _gather(x, lo2, hi2, u2 - b2 - a2), r2 - b2 - a2
    return v1, in1, k1, v2, in2, k2


def abs_order_stats(x, r1, r2):
    """The r1-th and r2-th smallest |x| (0-based), exactly, for a 1-D float32 array."""
    if x.size <= DIRECT:
        part = np.partition(np.abs(x), [r1, r2])
        return part[r1], part[r2]
    v1, in1, k1, v2, in2, k2 = _brackets(x, r1, r2)
    v1 = v1 if in1.size == 0 else np.partition(in1, k1)[k1]  # numpy's SIMD selection on ~1%
    v2 = v2 if in2.size == 0 else np.partition(in2, k2)[k2]
    return v1, v2


def abs_order_stat(x, rank):
    """The `rank`-th smallest |x| (0-based), exactly, for a 1-D float32 array."""
    return abs_order_stats(x, rank, rank)[0]


@_jit(fastmath={"reassoc"})
def keep_between(x, lo, hi, rescale, out):
    """out = x where lo ≤ |x| ≤ hi, else 0; with `rescale`, times Σ|x| / Σ|kept| (L1 kept)."""
    n = x.size
    before = 0.0
    after = 0.0
    for j in range(n):
        v = abs(x[j])
        before += v
        after += v if lo <= v <= hi else 0.0
    scale = np.float32(before / after) if rescale and before >= 1e-7 and after >= 1e-7 else np.float32(1)
    zero = np.float32(0)
    for j in range(n):
        v = x[j]
        out[j] = v * scale if lo <= abs(v) <= hi else zero
    return scale


@_jit
def _mix(seed, j):
    """splitmix64 of (seed, index): 24 uniform bits per entry, the same in the numpy fallback."""
    z = seed + (np.uint64(j) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) >> np.uint64(40)


@_jit(fastmath={"reassoc"})
def keep_random(x, threshold, seed, rescale, out):
    """DARE: keep entry j when mix(seed, j) < threshold (of 2²⁴); with `rescale`, keep the L1 norm."""
    n = x.size
    before = 0.0
    after = 0.0
    for j in range(n):
        v = abs(x[j])
        before += v
        after += v if _mix(seed, j) < threshold else 0.0
    scale = np.float32(before / after) if rescale and before >= 1e-7 and after >= 1e-7 else np.float32(1)
    zero = np.float32(0)
    for j in range(n):
        out[j] = x[j] * scale if _mix(seed, j) < threshold else zero
    return scale


@_jit(fastmath={"reassoc", "nnan"})  # inputs are finite (checked at load); max in any order
def row_abs_max(t):
    """max |t[i, :]| per row, float64 (a third of torch's abs().amax(): no [K, n] temporary)."""
    k, n = t.shape
    out = np.zeros(k, np.float64)
    for i in range(k):
        row = t[i]
        m = np.float32(0)
        for j in range(n):
            m = max(m, abs(row[j]))
        out[i] = m
    return out
