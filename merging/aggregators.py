"""The aggregators: pure functions over the stacked task vectors of one tensor.

Each takes `deltas` [K, ...] (τᵢ = θᵢ − θ₀ for one tensor, float32) and `weights` [K] (the
per-task coefficients wᵢ) and returns the merged update U; the engine forms θ₀ + λ·U. The math
is in shared/spec/merging-math.md. Linear aggregators are declared by their coefficients cᵢ
(U = Σ cᵢ·τᵢ), which lets the live app update a merge incrementally when one slider moves; the
TIES family by its sparsifier and whether it elects signs (`gta`). Hyperparameter defaults live in
the HyperParams only: the functions here take every hyperparameter without a default.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from . import kernels, sparsify
from .errors import MergeError
from .method import Exact, HyperParam, Sparsifier, weighted_sum
from .registry import aggregator
from .seeds import task_seed


# ----------------------------------------------------------------------------- shared pieces

NORMALIZE_OFF = HyperParam("normalize", bool, False, "Divide the weighted sum by the sum of the weights.")
NORMALIZE_ON = HyperParam("normalize", bool, True, "Divide the weighted sum by the sum of the weights.")
DENSITY = HyperParam(
    "density", float, 1.0, "Fraction of each task vector's entries kept (per tensor).", low=0.0, high=1.0,
    per_model=True,
)
GAMMA = HyperParam(
    "gamma", float, 0.01, "Fraction of the largest-magnitude entries dropped as outliers.", low=0.0, high=1.0,
    per_model=True,
)
RESCALE = HyperParam("rescale", bool, True, "Rescale kept entries so each task vector keeps its L1 norm.")
RESCALE_OFF = HyperParam("rescale", bool, False, "Rescale kept entries so each task vector keeps its L1 norm.")
EPSILON = HyperParam(
    "epsilon", float, 0.15, "DELLA: keep probabilities spread over density ± epsilon by magnitude rank.",
    low=0.0, high=0.5, per_model=True,
)
SEED = HyperParam("seed", int, 0, "Seed of the random drop (mixed with the tensor name).", low=0, high=2**31 - 1)


def _col(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape [K] coefficients to broadcast over a [K, ...] stack."""
    return weights.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _per_model(value, k: int) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.reshape(-1).tolist()] if value.numel() > 1 else [float(value)] * k
    return [float(value)] * k


def _arrays(*tensors: torch.Tensor):
    """numpy views (no copy) of contiguous float32 tensors, for the fused kernels."""
    return [t.detach().numpy() for t in tensors]


def _normalizer(weights: torch.Tensor) -> float:
    total = float(weights.sum())
    return 1.0 if abs(total) < 1e-8 else total


def true_median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor, averaging the two middle values for an even count."""
    s = values.reshape(-1).sort().values
    k = s.numel()
    return float(s[k // 2]) if k % 2 else float((s[k // 2 - 1] + s[k // 2]) / 2)


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES election: mask of entries whose sign agrees with sign(Σ) (a zero sum counts as +)."""
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == elected


def gta_exact(sparsifier: Sparsifier | None, consensus: bool) -> Callable:
    """mergekit's generalized task arithmetic op for op, in the dtype of its inputs: δᵢ = θᵢ − θ₀,
    sparsify, weight, (elect), sum, normalise, scale by λ, add θ₀ — each step rounded as mergekit
    rounds it, so a bfloat16 merge equals mergekit's bit for bit (up to the random masks)."""

    def exact(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], lam: float = 1.0,
              **hp) -> torch.Tensor:
        k = len(models)
        if k == 0:
            return base
        deltas = base.new_empty((k, *base.shape))
        for i, m in enumerate(models):
            d = m - base
            deltas[i] = d if sparsifier is None else sparsifier.exact(d, i, k, hp)
        w = torch.tensor([float(x) for x in weights], dtype=deltas.dtype, device=deltas.device)
        w = w.reshape(-1, *([1] * base.dim()))
        deltas.mul_(w)
        if consensus:
            mask = sign_consensus(deltas)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if hp["normalize"]:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        return (base + mixed).to(base.dtype)

    return exact


# ----------------------------------------------------------------------------- FedAvg family


@aggregator(
    "task_arithmetic",
    "θ₀ + λ·Σ wᵢτᵢ: Task Arithmetic, i.e. one round of FedAvg.",
    [NORMALIZE_OFF],
    linear=True,
    family="federated",
    inert=("density", "rescale"),  # mergekit takes them on every task-arithmetic method; no effect here
    exact=Exact(gta_exact(None, False)),
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """FedAvg: the weighted sum of the updates."""
    return weights / _normalizer(weights) if normalize else weights.clone()


def linear_exact(base, models, weights, lam: float, normalize: bool, **_) -> torch.Tensor:
    """mergekit's linear: Σ wᵢθᵢ (/ Σ wᵢ) accumulated in float32 (float64 for float64 models), in the
    models' order, rounded once to the compute dtype. Reads no base; λ ≠ 1 scales the step from it."""
    first = models[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor([float(x) for x in weights], dtype=acc)  # CPU scalars: addcmul_ takes them on any device
    out = torch.zeros(first.shape, dtype=acc, device=first.device)
    for m, c in zip(models, w.unbind(0)):
        out.addcmul_(m, c)
    if normalize:
        out.div_(_linear_total(w))
    if lam != 1 and base is not None:
        out = base.to(acc) + lam * (out - base.to(acc))
    return out.to(first.dtype)


@aggregator(
    "linear",
    "Model soup: Σ wᵢθᵢ / Σ wᵢ (needs no base model).",
    [NORMALIZE_ON],
    linear=True,
    exact=Exact(linear_exact, always=True, reads_base=False),
    base_optional=True,
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Weighted average of the models; with a base it is θ₀ + Σ wᵢτᵢ / Σ wᵢ (Task Arithmetic, normalised)."""
    return weights / _linear_total(weights) if normalize else weights.clone()


def _linear_total(weights: torch.Tensor) -> torch.Tensor:
    """Σ wᵢ, which normalize divides by: zero would write all zeros or θa − θb, not an average."""
    total = weights.sum()
    if abs(float(total)) < 1e-8:
        raise MergeError("linear: the weights sum to zero; they cannot be normalized (or set normalize: false)")
    return total


@aggregator(
    "fednova",
    "FedNova: rescale each update by K̄/(K·Kᵢ) so long-trained fine-tunes do not dominate.",
    [
        HyperParam("steps", int, None, "Fine-tuning steps Kᵢ of each model (read from its training metadata).",
                   low=1, high=10**12, per_model=True, optional=True),
        HyperParam("learning_rates", float, None, "Learning rate ηᵢ of each model (for the lr × steps mode).",
                   low=0.0, low_open=True, per_model=True, optional=True),
        HyperParam("fednova_mode", str, "steps", "Normalise by the steps Kᵢ, or by ηᵢ·Kᵢ.",
                   choices=("steps", "lr_steps")),
    ],
    linear=True,
    family="federated",
    reference="https://arxiv.org/abs/2007.07481",
)
def fednova(weights: torch.Tensor, steps, learning_rates, fednova_mode: str) -> torch.Tensor:
    """Normalised averaging: an update's size grows with local steps, so divide it back out."""
    k = weights.shape[0]
    if steps is None:
        raise MergeError("fednova needs the fine-tuning steps of every model (give `steps`, "
                         "or use checkpoints whose training metadata records them)")
    effort = torch.tensor(_per_model(steps, k), dtype=torch.float64)
    if fednova_mode == "lr_steps":
        if learning_rates is None:
            raise MergeError("fednova in lr_steps mode needs `learning_rates` for every model")
        effort = effort * torch.tensor(_per_model(learning_rates, k), dtype=torch.float64)
    if (effort <= 0).any():
        raise MergeError("fednova: steps and learning rates must be positive")
    scale = effort.mean() / (k * effort)
    return weights * scale.to(weights.device, weights.dtype)


@aggregator(
    "cclip",
    "Centered clipping: shrink each whole task vector to L2 norm at most ρ, then sum.",
    [HyperParam("rho", float, None, "Clipping radius ρ for the whole-model norm ‖wᵢτᵢ‖ (default: the median norm).",
                low=0.0, low_open=True, optional=True)],
    linear=True,
    family="federated",
    reference="https://arxiv.org/abs/2012.10333",
)
def cclip(weights: torch.Tensor, rho, *, update_norms: torch.Tensor) -> torch.Tensor:
    """Robust aggregation: an update larger than ρ (over ALL tensors) counts only up to ρ."""
    norms = update_norms.to(torch.float64)
    if rho is None:
        rho = true_median(norms)
    scale = torch.where(norms > 0, (rho / norms.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(norms))
    return weights * scale.to(weights.device, weights.dtype)


def _fedgma_kernel(t, w, theta0, lam, out, rho, **_) -> int:
    return kernels.gradient_masked(*_arrays(t, w, theta0), np.float32(lam), np.float32(rho), out.numpy())


@aggregator(
    "fedgma",
    "FedGMA: damp coordinates whose update signs disagree (agreement below ρ).",
    [HyperParam("rho", float, 0.5, "Sign-agreement threshold ρ: coordinates at or above it pass unchanged.",
                low=0.0, high=1.0)],
    family="federated",
    elementwise=True,
    kernel=_fedgma_kernel,
    reference="https://arxiv.org/abs/2202.10143",
)
def fedgma(deltas: torch.Tensor, weights: torch.Tensor, rho: float) -> torch.Tensor:
    """Gradient-masked averaging: A = |Σ sign(uᵢ)|/K; mask 1 where A ≥ ρ, else A.

    sign(wᵢτᵢ) = sign(wᵢ)·sign(τᵢ), so both sums are matrix-vector products over the stack.
    """
    agreement = weighted_sum(deltas.sign(), weights.sign()).abs_().div_(deltas.shape[0])
    mask = torch.where(agreement >= rho, torch.ones_like(agreement), agreement)
    return weighted_sum(deltas, weights).mul_(mask)


def _sorted_stack(u: torch.Tensor) -> list[torch.Tensor]:
    """Sort K tensors elementwise with a min/max network (faster than torch.sort over dim 0)."""
    rows = list(u.unbind(0))
    k = len(rows)
    for rnd in range(k):
        for i in range(rnd % 2, k - 1, 2):
            lo = torch.minimum(rows[i], rows[i + 1])
            rows[i + 1] = torch.maximum(rows[i], rows[i + 1])
            rows[i] = lo
    return rows


def _median_kernel(t, w, theta0, lam, out, median_kind, **_) -> int:
    return kernels.median(*_arrays(t, w, theta0), np.float32(lam), median_kind == "lower", out.numpy())


@aggregator(
    "median",
    "Coordinate-wise median of the updates: robust to one outlying task.",
    [HyperParam("median_kind", str, "true", "For even K: 'true' averages the two middle values; 'lower' takes "
                "the lower one (torch.median, as the paper's code).", choices=("true", "lower"))],
    family="federated",
    elementwise=True,
    kernel=_median_kernel,
    reference="https://arxiv.org/abs/1803.01498",
)
def median(deltas: torch.Tensor, weights: torch.Tensor, median_kind: str) -> torch.Tensor:
    """Median per coordinate of uᵢ = wᵢτᵢ."""
    u = deltas * _col(weights, deltas)
    k = u.shape[0]
    if k == 1:
        return u[0]
    rows = _sorted_stack(u) if k <= 8 else list(u.sort(dim=0).values.unbind(0))
    if k % 2 or median_kind == "lower":
        return rows[(k - 1) // 2]
    return (rows[k // 2 - 1] + rows[k // 2]) * 0.5


# ----------------------------------------------------------------------------- the TIES family
# mergekit's generalized task arithmetic: sparsify each task vector (weight-independent), then
# weight, optionally elect signs (TIES), sum and normalise. A member is its sparsifier and a flag.


def combine(deltas: torch.Tensor, weights: torch.Tensor, consensus: bool, normalize: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification: weight, elect, sum, normalise."""
    if not consensus:  # linear in the weights: one matrix-vector product, no [K, ...] temporary
        mixed = weighted_sum(deltas, weights)
        return mixed / _normalizer(weights) if normalize else mixed
    w = _col(weights, deltas)
    weighted = deltas * w
    mask = sign_consensus(weighted)
    mixed = (weighted * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


def _density(hp, i: int, k: int, key: str = "density") -> float:
    return _per_model(hp[key], k)[i]


# Each selection twice: float32 through the fused kernels (fast path), and mergekit's own ordering
# in the compute dtype (exact path). A method without a `rescale` knob does not rescale.
MAGNITUDE = Sparsifier(
    "magnitude",
    keep=lambda d, i, k, hp, o: sparsify.keep_top(d, _density(hp, i, k), bool(hp.get("rescale")), o),
    exact=lambda d, i, k, hp: sparsify.exact_top(d, _density(hp, i, k), bool(hp.get("rescale"))),
    reads=("density", "rescale"),
)
BAND = Sparsifier(
    "band",
    keep=lambda d, i, k, hp, o: sparsify.keep_band(d, _density(hp, i, k), _density(hp, i, k, "gamma"),
                                                   bool(hp.get("rescale")), o),
    exact=lambda d, i, k, hp: sparsify.exact_band(d, _density(hp, i, k), _density(hp, i, k, "gamma"),
                                                  bool(hp.get("rescale"))),
    reads=("density", "gamma", "rescale"),
)
RANDOM = Sparsifier(
    "random",
    keep=lambda d, i, k, hp, o: sparsify.keep_random(d, _density(hp, i, k), task_seed(int(hp["seed"]), i),
                                                     bool(hp["rescale"]), o),
    exact=lambda d, i, k, hp: sparsify.exact_random(d, _density(hp, i, k), task_seed(int(hp["seed"]), i),
                                                    bool(hp["rescale"])),
    reads=("density", "rescale", "seed"),
)


def _della_exact(d, i, k, hp):
    return sparsify.exact_della(d, _density(hp, i, k), _density(hp, i, k, "epsilon"), task_seed(int(hp["seed"]), i),
                                bool(hp["rescale"]))


DELLA = Sparsifier("della", keep=lambda d, i, k, hp, o: o.copy_(_della_exact(d, i, k, hp)), exact=_della_exact,
                   reads=("density", "epsilon", "rescale", "seed"))


def _gta_coefficients(weights: torch.Tensor, normalize: bool, **_) -> torch.Tensor:
    return weights / _normalizer(weights) if normalize else weights.clone()


def _consensus_kernel(t, w, theta0, lam, out, normalize, **_) -> int:
    return kernels.consensus(*_arrays(t, w, theta0), np.float32(lam), bool(normalize), out.numpy())


def _weighted_sum_kernel(t, w, theta0, lam, out, normalize, **_) -> int:
    c = _gta_coefficients(w.to(torch.float32), normalize)
    return kernels.weighted_sum(*_arrays(t, c, theta0), np.float32(lam), out.numpy())


def gta(name: str, summary: str, params: Sequence[HyperParam], sparsifier: Sparsifier, consensus: bool,
        reference: str) -> None:
    """Declare one member of the TIES family: `sparsifier`, then combine (electing signs if `consensus`).

    Without the sign consensus the combine step is linear in the weights (coefficients over the
    sparsified stack), so the live app treats it like Task Arithmetic once the masks are cached.
    """

    def step(deltas: torch.Tensor, weights: torch.Tensor, **hp) -> torch.Tensor:
        return combine(deltas, weights, consensus, hp["normalize"])

    step.__name__, step.__doc__ = name, summary
    aggregator(name, summary, params, sparsifier=sparsifier, reference=reference,
               coefficients=None if consensus else _gta_coefficients,
               kernel=_consensus_kernel if consensus else _weighted_sum_kernel,
               exact=Exact(gta_exact(sparsifier, consensus)))(step)


gta("ties", "TIES: trim each task vector to its top `density`, elect signs, average the agreeing entries.",
    [DENSITY, NORMALIZE_ON, RESCALE_OFF], MAGNITUDE, True, "https://arxiv.org/abs/2306.01708")
gta("dare_linear", "DARE: randomly drop 1 − density of each task vector, rescale, then sum.",
    [DENSITY, RESCALE, NORMALIZE_OFF, SEED], RANDOM, False, "https://arxiv.org/abs/2311.03099")
gta("dare_ties", "DARE drop and rescale, then TIES sign consensus.",
    [DENSITY, RESCALE, NORMALIZE_OFF, SEED], RANDOM, True, "https://arxiv.org/abs/2311.03099")
gta("breadcrumbs", "Model Breadcrumbs: keep a middle band of magnitudes (drop outliers and the smallest).",
    [DENSITY, GAMMA, NORMALIZE_OFF, RESCALE_OFF], BAND, False, "https://arxiv.org/abs/2312.06795")
gta("breadcrumbs_ties", "Breadcrumbs band, then TIES sign consensus.",
    [DENSITY, GAMMA, NORMALIZE_OFF, RESCALE_OFF], BAND, True, "https://arxiv.org/abs/2312.06795")
gta("magnitude_prune", "Keep each task vector's top `density` magnitudes, then a weighted sum (PEFT).",
    [DENSITY, NORMALIZE_OFF], MAGNITUDE, False, "https://arxiv.org/abs/2306.01708")
gta("della", "DELLA: drop entries at random, less likely the larger their magnitude rank; rescale; TIES consensus.",
    [DENSITY, EPSILON, RESCALE, NORMALIZE_ON, SEED], DELLA, True, "https://arxiv.org/abs/2406.11617")
gta("della_linear", "DELLA's magnitude-ranked random drop and rescale, then a weighted sum.",
    [DENSITY, EPSILON, RESCALE, NORMALIZE_OFF, SEED], DELLA, False, "https://arxiv.org/abs/2406.11617")


# ----------------------------------------------------------------------------- SLERP


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[float, float]:
    """c0, c1 of slerp = c0·v0 + c1·v1 from ‖v0‖, ‖v1‖ and v0·v1; linear when nearly (anti)parallel."""
    norm0 = norm0 if norm0 > eps else 1.0
    norm1 = norm1 if norm1 > eps else 1.0
    cos = min(1.0, max(-1.0, dot / (norm0 * norm1)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors (norms and the dot product in float64)."""
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    c0, c1 = slerp_coefficients(t, float(a.norm()), float(b.norm()), float(a @ b), dot_threshold, eps)
    return (c0 * v0.float() + c1 * v1.float()).reshape(v0.shape)


SLERP_CHUNK = 1 << 20  # elements per pass, as mergekit: the chunked norms round as mergekit's do


def slerp_exact(base, models, weights, lam: float, t: float, weighted: bool, **_):
    """mergekit's slerp(t, θ₀, θ₁) op for op: norms, dot and coefficients in float32 (float64 for
    float64 inputs), the result stored in the inputs' dtype. Per-model weights are ignored, as in
    mergekit, unless `weighted` (ours: θᵢ becomes θ₀ + wᵢτᵢ first). With two fine-tunes and no
    role for the base (ours), it interpolates between them."""
    ends = list(models)
    if weighted:
        ends = [base + float(w) * (m - base) for m, w in zip(ends, weights)]
    v0, v1 = (base, ends[0]) if len(ends) == 1 else (ends[0], ends[1])
    acc = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([float(t)], device=a.device).reshape(-1, 1).to(acc)
    n = a.shape[1]
    if not n:
        return v0
    chunks = [(s, s + SLERP_CHUNK) for s in range(0, n, SLERP_CHUNK)]
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, i:j].to(acc), dim=1, keepdim=True)
                                               for i, j in chunks]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, i:j].to(acc), dim=1, keepdim=True)
                                               for i, j in chunks]), dim=0)
    na, nb = torch.where(na > 1e-8, na, 1), torch.where(nb > 1e-8, nb, 1)
    dot = torch.stack([((a[:, i:j].to(acc) / na) * (b[:, i:j].to(acc) / nb)).sum(dim=1, keepdim=True)
                       for i, j in chunks]).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > 0.9995
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for i, j in chunks:
        out[:, i:j] = ca * a[:, i:j].to(acc) + cb * b[:, i:j].to(acc)
    out = out.reshape(v0.shape)
    if lam != 1:
        out = (base + lam * (out - base)).to(v0.dtype)
    return out


def _slerp_kernel(st, w, theta0, lam, out, t: float, weighted: bool, **_) -> int:
    """One pass for the two norms and the dot product, one to write θ₀ + λ·(slerp − θ₀)."""
    if not weighted:
        w = torch.ones_like(w)
    st, w, theta0 = _arrays(st, w, theta0)
    with_base = st.shape[0] == 1
    aa, bb, ab = kernels.endpoint_products(st, w, theta0, with_base)
    c0, c1 = slerp_coefficients(t, math.sqrt(aa), math.sqrt(bb), ab)
    return kernels.interpolate(st, w, theta0, np.float32(lam), with_base, np.float32(c0), np.float32(c1), out.numpy())


@aggregator(
    "slerp",
    "SLERP between two models (or the base and one model) at position t.",
    [HyperParam("t", float, 0.5, "Interpolation position: 0 is the first model (or the base), 1 the second.",
                low=0.0, high=1.0),
     HyperParam("weighted", bool, False, "Apply the per-model weights first (θ₀ + wᵢτᵢ; FedMerge's option). "
                "Off, as in mergekit, the weights are ignored.")],
    max_models=2,
    exact=Exact(slerp_exact, always=True),
    kernel=_slerp_kernel,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(deltas: torch.Tensor, weights: torch.Tensor, t: float, weighted: bool, *,
          base: torch.Tensor) -> torch.Tensor:
    """With one fine-tune: slerp(θ₀, θ₁); with two: slerp(θ₁, θ₂). Returns it − θ₀. With `weighted`,
    θᵢ is θ₀ + wᵢτᵢ."""
    u = deltas * _col(weights, deltas) if weighted else deltas
    base = base.float()
    v0, v1 = (base, base + u[0]) if deltas.shape[0] == 1 else (base + u[0], base + u[1])
    return slerp_tensors(t, v0, v1) - base


from . import model_methods  # noqa: E402,F401  (registers mergekit's methods defined on the models)
