"""mergekit's merge methods that are defined on the models themselves, not as a sum of task vectors.

Each is written once, as mergekit computes it (op for op, in the dtype of its inputs, so a
bfloat16 merge rounds where mergekit rounds): `core(base, models, weights, **hp) -> θ`, where
`models` are the fine-tuned tensors θᵢ and `base` is θ₀ or None. The registration derives the
task-vector form the app uses (θ₀ + τᵢ in, θ − θ₀ out) and adds the universal λ (θ₀ + λ·(θ − θ₀)).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import MergeError
from .method import Exact, HyperParam, check_defaults_once
from .registry import aggregator


def model_method(name: str, summary: str, params: Sequence[HyperParam] = (), **description):
    """Declare `core` as the method `name`: its exact form for the engine, its task-vector form for the app."""

    def wrap(core: Callable[..., torch.Tensor]):
        def exact(base, models, weights, lam: float = 1.0, **hp) -> torch.Tensor:
            out = core(base, list(models), [float(w) for w in weights], **hp)
            if lam != 1 and base is not None:
                out = (base + lam * (out - base)).to(out.dtype)
            return out

        def step(deltas: torch.Tensor, weights: torch.Tensor, *, base: torch.Tensor, **hp) -> torch.Tensor:
            b = base.float()
            return core(b, [b + d for d in deltas.float().unbind(0)], weights.tolist(), **hp).float() - b

        step.__name__, step.__doc__ = core.__name__, core.__doc__
        check_defaults_once(name, core, tuple(params))
        aggregator(name, summary, params, exact=Exact(exact, always=True), **description)(step)
        return core

    return wrap


# ----------------------------------------------------------------------------- spherical interpolations


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool,
             eps: float = 1e-8) -> torch.Tensor:
    """Slerp along the last axis (rows: the first axis; flatten: the whole tensor), per vector."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@model_method(
    "nuslerp",
    "NuSLERP: slerp of two models (or their task vectors, with a base) at t = w₂/(w₁ + w₂).",
    [HyperParam("nuslerp_flatten", bool, True, "Interpolate the whole tensor as one vector (else row by row)."),
     HyperParam("nuslerp_row_wise", bool, False, "Without flatten: interpolate columns instead of rows.")],
    min_models=2, max_models=2, base_optional=True,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
)
def nuslerp(base, models, weights, nuslerp_flatten: bool, nuslerp_row_wise: bool):
    """The weights set the position; with a base, the task vectors are interpolated."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return _nuslerp(t, models[0], models[1], nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp(t, models[0] - base, models[1] - base, nuslerp_row_wise, nuslerp_flatten)


@model_method(
    "multislerp",
    "Multi-SLERP: barycentric interpolation of any number of models (or task vectors) on the hypersphere.",
    [HyperParam("normalize_weights", bool, True, "Divide the weights by their sum."),
     HyperParam("eps", float, 1e-8, "Small constant for numerical stability.", low=1e-12)],
    base_optional=True,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(base, models, weights, normalize_weights: bool, eps: float):
    """Project to the tangent space at the weighted mean direction, average, map back; keep the mean norm."""
    if len(models) == 1:
        return models[0]
    x = torch.stack(models, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if not any(weights):
        raise MergeError("multislerp: the weights are all zero")
    if normalize_weights:
        if abs(sum(weights)) < 1e-8:
            raise MergeError("multislerp: the weights sum to zero; they cannot be normalized")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps and not norms.any():  # all task vectors zero: the base (mergekit refuses)
        return x[0] if base is None else base.clone()
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise MergeError("multislerp: the weighted mean direction is zero (antipodal inputs, or weights "
                             "that balance out); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base


@model_method(
    "karcher",
    "Karcher mean: the Riemannian (geodesic) mean of the models' directions, scaled by their mean norm.",
    [HyperParam("max_iter", int, 10, "Iterations of the fixed-point update.", low=1, high=1000),
     HyperParam("tol", float, 1e-5, "Convergence tolerance.", low=1e-12)],
    base_optional=True,
    reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
)
def karcher(base, models, weights, max_iter: int, tol: float):
    """Every input counts equally, the base too (mergekit takes it as one more input, listed last)."""
    xs = list(models) + ([base] if base is not None else [])
    if len(xs) == 1:
        return xs[0]
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(xs)] * len(xs)
    norms, units = [], []
    for x in xs:
        n = torch.linalg.vector_norm(x.to(acc))
        norms.append(n)
        units.append(torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in xs)
    a_sum = sum(alphas[i] for i in valid)
    a_norm = [alphas[i] / a_sum for i in valid]
    vunits = [units[i] for i in valid]
    mean = torch.zeros_like(vunits[0])
    for a, u in zip(a_norm, vunits):
        mean += a * u
    mnorm = torch.linalg.vector_norm(mean.to(acc))
    mean = vunits[0].clone() if mnorm.item() < tol else (mean / mnorm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(a_norm, vunits):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent.to(acc))
        if tnorm.item() < tol:
            break
        mean = (torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)).to(mean.dtype)
        unorm = torch.linalg.vector_norm(mean.to(acc))
        if unorm.item() > tol:
            mean = (mean / unorm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


# ----------------------------------------------------------------------------- other model-space methods


@model_method(
    "model_stock",
    "Model Stock: move from the base toward the average fine-tune by a ratio set by the task vectors' angle.",
    [HyperParam("filter_wise", bool, False, "One ratio per row (filter) instead of one per tensor.")],
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
)
def model_stock(base, models, weights, filter_wise: bool):
    """t = K·cos / (1 + (K − 1)·cos) with cos the mean pairwise cosine of the task vectors."""
    shape = base.shape
    if filter_wise:
        w0, ws = (base.unsqueeze(0), [m.unsqueeze(0) for m in models]) if base.dim() == 1 else (base, models)
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [m - w0 for m in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


@model_method(
    "nearswap",
    "NearSwap: take the fine-tune's value where it is within t of the base's, blend toward the base elsewhere.",
    [HyperParam("t", float, 0.5, "Similarity threshold (absolute difference).", low=0.0, low_open=True)],
    min_models=1, max_models=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
def nearswap(base, models, weights, t: float):
    """Per entry: weight = clamp(t / |θ₀ − θ₁|, 0, 1) toward the fine-tune."""
    b = models[0]
    weight = (t / torch.abs(base - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * base


@model_method(
    "arcee_fusion",
    "Arcee Fusion: keep only the fine-tune's changes whose importance (|τ| × KL of row softmaxes) is an outlier.",
    [],
    min_models=1, max_models=1,
    reference="https://arcee.ai",
)
def arcee_fusion(base, models, weights):
    """Threshold = median + 1.5·IQR of the importance (quantiles by index into the sorted values)."""
    other = models[0]
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:  # mergekit samples with replacement (its global RNG); we use a fixed seed
        g = torch.Generator().manual_seed(0)
        flat = flat[torch.randint(flat.numel(), (1_000_000,), generator=g)]
    ordered = torch.sort(flat).values
    q1, med, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75], device=ordered.device) * (ordered.numel() - 1)).long()]
    mask = (importance >= med + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


@model_method(
    "sce",
    "SCE: select the top-variance entries, weight each task vector by its mean square, TIES-elect, average.",
    [HyperParam("select_topk", float, 1.0, "Fraction of entries (by variance across models) kept.",
                low=0.0, high=1.0)],
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(base, models, weights, select_topk: float):
    """The per-model weights are ignored (as in mergekit): SCE derives its own from the task vectors."""
    tvs = torch.stack([m - base for m in models], dim=0)
    if select_topk < 1:
        if select_topk <= 0:
            keep = torch.zeros_like(tvs[0])
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            keep = torch.zeros_like(var)
            if k:
                keep.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * keep.unsqueeze(0)
    total = tvs.sum(dim=0)
    erase = tvs.sign() == torch.where(total >= 0, 1, -1).to(tvs.dtype)
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    w_sum = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(w_sum) < 1e-6 else w / w_sum
    w = w.reshape(-1, *([1] * (tvs.dim() - 1))) * erase
    return base + (tvs * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)


@model_method(
    "passthrough",
    "Passthrough: copy one model's tensors (optionally scaled); with `slices`, stack layers of several models.",
    [HyperParam("scale", float, 1.0, "Multiply the tensor by this factor.", per_model=True)],
    min_models=1, max_models=1, base_optional=True,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
)
def passthrough(base, models, weights, scale):
    """The single input, unchanged unless scaled."""
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    return models[0] if s == 1.0 else models[0] * s
