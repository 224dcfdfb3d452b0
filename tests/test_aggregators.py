"""Every aggregator against a plain reference computation and against the spec's identities."""
from __future__ import annotations

import math

import pytest
import torch

import merging
from merging import AGGREGATORS, MergeError
from merging.aggregators import slerp_tensors
from merging.sparsify import band_mask, topk_mask

torch.set_default_dtype(torch.float32)


def stack(k=4, shape=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((k, *shape), generator=g), torch.rand(k, generator=g) + 0.5


def call(name, deltas, weights, base=None, norms=None, **hp):
    agg = AGGREGATORS[name]
    kw = agg.check_params(hp, deltas.shape[0])
    if agg.needs_base:
        kw["base"] = torch.zeros(deltas.shape[1:]) if base is None else base
    if agg.needs_update_norms:
        kw["update_norms"] = (deltas.reshape(deltas.shape[0], -1).norm(dim=1) * weights.abs()) if norms is None else norms
    return agg.fn(deltas, weights, **kw)


# ----------------------------------------------------------------- reference computations, elementwise loops

def ref_sum(d, w):
    return sum(w[i] * d[i] for i in range(len(w)))


def test_task_arithmetic_and_linear_match_reference():
    d, w = stack()
    torch.testing.assert_close(call("task_arithmetic", d, w), ref_sum(d, w))
    torch.testing.assert_close(call("task_arithmetic", d, w, normalize=True), ref_sum(d, w) / w.sum())
    torch.testing.assert_close(call("linear", d, w), ref_sum(d, w) / w.sum())


def test_fednova_reference_steps_and_lr_steps():
    d, w = stack(k=3)
    steps, lrs = [100, 200, 400], [1e-3, 5e-4, 1e-3]
    kbar = sum(steps) / 3
    expected = sum(kbar / (3 * steps[i]) * w[i] * d[i] for i in range(3))
    torch.testing.assert_close(call("fednova", d, w, steps=steps), expected)
    eff = [s * l for s, l in zip(steps, lrs)]
    expected = sum((sum(eff) / 3) / (3 * eff[i]) * w[i] * d[i] for i in range(3))
    torch.testing.assert_close(call("fednova", d, w, steps=steps, learning_rates=lrs, fednova_mode="lr_steps"), expected)


def test_fednova_equal_steps_is_the_mean():
    d, w = stack(k=4)
    torch.testing.assert_close(call("fednova", d, w, steps=[50] * 4), ref_sum(d, w) / 4)


def test_fednova_without_steps_names_the_problem():
    d, w = stack(k=2)
    with pytest.raises(MergeError, match="steps"):
        call("fednova", d, w)


def test_fedgma_reference():
    d, w = stack(k=5)
    rho = 0.55
    out = call("fedgma", d, w, rho=rho)
    u = d * w[:, None, None]
    expected = torch.empty_like(d[0])
    for idx in range(d[0].numel()):
        col = u.reshape(5, -1)[:, idx]
        a = abs(float(torch.sign(col).sum())) / 5
        m = 1.0 if a >= rho else a
        expected.view(-1)[idx] = m * col.sum()
    torch.testing.assert_close(out, expected)


def test_fedgma_rho_zero_is_task_arithmetic():
    d, w = stack()
    torch.testing.assert_close(call("fedgma", d, w, rho=0.0), ref_sum(d, w))


def test_median_odd_k_equals_torch_median_and_even_k_kinds():
    d, w = stack(k=5)
    u = d * w[:, None, None]
    torch.testing.assert_close(call("median", d, w), u.median(dim=0).values)
    d, w = stack(k=4)
    u = d * w[:, None, None]
    s = u.sort(dim=0).values
    torch.testing.assert_close(call("median", d, w), (s[1] + s[2]) / 2)
    torch.testing.assert_close(call("median", d, w, median_kind="lower"), u.median(dim=0).values)


@pytest.mark.parametrize("k", [1, 2, 3, 6, 8, 9])
def test_median_any_k_matches_sort(k):
    d, w = stack(k=k)
    u = d * w[:, None, None]
    s = u.sort(dim=0).values
    expected = s[(k - 1) // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    torch.testing.assert_close(call("median", d, w), expected)


def test_cclip_reference_uses_whole_model_norm():
    d, w = stack(k=3)
    norms = torch.tensor([1.0, 5.0, 20.0])  # whole-model norms, deliberately not this tensor's
    out = call("cclip", d, w, norms=norms, rho=4.0)
    coef = [min(1.0, 4.0 / float(n)) for n in norms]
    torch.testing.assert_close(out, sum(coef[i] * w[i] * d[i] for i in range(3)))


def test_cclip_rho_at_least_largest_norm_is_task_arithmetic():
    d, w = stack()
    norms = d.reshape(4, -1).norm(dim=1) * w
    torch.testing.assert_close(call("cclip", d, w, rho=float(norms.max())), ref_sum(d, w))
    torch.testing.assert_close(call("cclip", d, w, rho=float(norms.max()) * 10), ref_sum(d, w))


def ref_ties(d, w, density, normalize=True):
    k = d.shape[0]
    trimmed = []
    for i in range(k):
        n = d[i].numel()
        kk = max(1, int(density * n))
        idx = d[i].abs().reshape(-1).argsort(descending=True)[:kk]
        m = torch.zeros(n)
        m[idx] = 1
        trimmed.append(d[i] * m.reshape(d[i].shape))
    t = torch.stack(trimmed) * w[:, None, None]
    elected = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = t.sign() == elected
    mixed = (t * agree).sum(0)
    if normalize:
        div = (w[:, None, None] * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return mixed


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_reference(density):
    d, w = stack(k=3)
    torch.testing.assert_close(call("ties", d, w, density=density), ref_ties(d, w, density))
    torch.testing.assert_close(call("ties", d, w, density=density, normalize=False), ref_ties(d, w, density, False))


def test_ties_matches_peft():
    from peft.utils.merge_utils import ties as peft_ties

    d, _ = stack(k=4, shape=(32, 16))
    w = torch.ones(4)
    ours = call("ties", d, w, density=0.3)
    theirs = peft_ties(d, w, density=0.3, majority_sign_method="total")
    torch.testing.assert_close(ours, theirs)


def test_magnitude_prune_matches_peft():
    from peft.utils.merge_utils import magnitude_prune as peft_mp

    d, w = stack(k=3, shape=(20, 10))
    torch.testing.assert_close(call("magnitude_prune", d, w, density=0.4), peft_mp(d, w, density=0.4))


def test_topk_mask_and_band_mask_counts():
    x = torch.randn(1000)
    assert int(topk_mask(x, 0.1).sum()) == 100
    m = band_mask(x, 0.5, 0.05)
    order = x.abs().argsort()  # ascending: drop the bottom 450 and the top 50
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[order[450:950]] = True
    assert torch.equal(m, expected)


def test_breadcrumbs_reference():
    d, w = stack(k=3, shape=(40, 5))
    out = call("breadcrumbs", d, w, density=0.6, gamma=0.1)
    kept = torch.stack([d[i] * band_mask(d[i], 0.6, 0.1) for i in range(3)])
    torch.testing.assert_close(out, ref_sum(kept, w))


def test_dare_is_seeded_and_unbiased_in_l1():
    d, w = stack(k=2, shape=(200, 50))
    a = call("dare_linear", d, w, density=0.3, seed=7)
    b = call("dare_linear", d, w, density=0.3, seed=7)
    c = call("dare_linear", d, w, density=0.3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    one = call("dare_linear", d[:1], torch.ones(1), density=0.3, seed=1)
    assert abs(float(one.abs().sum()) - float(d[0].abs().sum())) / float(d[0].abs().sum()) < 1e-5
    kept = float((one != 0).float().mean())
    assert 0.27 < kept < 0.33


def test_dare_density_one_is_task_arithmetic():
    d, w = stack()
    torch.testing.assert_close(call("dare_linear", d, w, density=1.0), ref_sum(d, w))
    torch.testing.assert_close(call("dare_ties", d, w, density=1.0), call("ties", d, w, density=1.0, normalize=False))


def test_slerp_reference_and_limits():
    a, b = torch.randn(10, 3), torch.randn(10, 3)
    d = torch.stack([a, b])
    out = call("slerp", d, torch.ones(2), base=torch.zeros(10, 3), t=0.3)
    an, bn = a / a.norm(), b / b.norm()
    theta = math.acos(float((an * bn).sum()))
    expected = math.sin(0.7 * theta) / math.sin(theta) * a + math.sin(0.3 * theta) / math.sin(theta) * b
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slerp_tensors(0.0, a, b), a)
    torch.testing.assert_close(slerp_tensors(1.0, a, b), b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slerp_tensors(0.25, a, 2 * a), a * 1.25)  # parallel: linear


# ----------------------------------------------------------------- identities of the spec

# mergekit's methods defined on the models (model_methods.py) have their own identities: tested there.
TASK_VECTOR_METHODS = [n for n, a in AGGREGATORS.items() if not a.models_only or n in ("linear", "slerp")]


@pytest.mark.parametrize("name", [n for n in TASK_VECTOR_METHODS if n not in ("fednova",)])
def test_one_task_gives_its_weighted_update(name):
    d, _ = stack(k=1)
    w = torch.tensor([0.7])
    out = call(name, d, w, base=d[0].clone())  # slerp: θ₀ ∥ θ₀ + u, so it interpolates linearly
    if name in ("linear", "ties", "della"):  # normalised by the weight sum
        torch.testing.assert_close(out, d[0])
    elif name == "slerp":  # one model: slerp(θ₀, θ₁, t = 0.5) − θ₀ = τ / 2 here (weights ignored, as mergekit)
        torch.testing.assert_close(out, 0.5 * d[0])
    elif name == "cclip":  # default radius = the only norm
        torch.testing.assert_close(out, 0.7 * d[0])
    else:
        torch.testing.assert_close(out, 0.7 * d[0])


@pytest.mark.parametrize("name", TASK_VECTOR_METHODS)
def test_identical_task_vectors(name):
    k = 2 if name == "slerp" else 4
    tau = torch.randn(5, 6)
    d = tau.expand(k, 5, 6).clone()
    w = torch.ones(k)
    out = call(name, d, w, **({"steps": [10] * k} if name == "fednova" else {}))
    expected = {"linear": tau, "ties": tau, "della": tau, "median": tau, "fednova": tau, "slerp": tau,
                "cclip": k * tau}.get(name, k * tau)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_every_method_declares_typed_params_with_help():
    for agg in AGGREGATORS.values():
        assert agg.summary and callable(agg.fn)
        for p in agg.params:
            assert p.help and p.type in (int, float, bool, str)
            if p.default is not None:
                assert p.check(p.default) == p.default


def test_param_validation_names_the_field():
    with pytest.raises(MergeError, match="rho.*outside"):
        AGGREGATORS["fedgma"].check_params({"rho": 1.5}, 2)
    with pytest.raises(MergeError, match="density.*expected float"):
        AGGREGATORS["ties"].check_params({"density": "lots"}, 2)
    with pytest.raises(MergeError, match="no hyperparameter 'gamma'"):
        AGGREGATORS["ties"].check_params({"gamma": 0.1}, 2)
    with pytest.raises(MergeError, match="rho.*outside"):
        AGGREGATORS["cclip"].check_params({"rho": 0.0}, 2)
    with pytest.raises(MergeError, match="median_kind"):
        AGGREGATORS["median"].check_params({"median_kind": "upper"}, 2)
    with pytest.raises(MergeError, match="unknown merge method 'soup'"):
        AGGREGATORS["soup"]


def test_public_api_names():
    assert merging.AGGREGATORS is AGGREGATORS
    assert callable(merging.merge_state_dicts)
