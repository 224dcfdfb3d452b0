"""Every aggregator against a plain reference computation and against the spec's identities."""
from __future__ import annotations

import math

import pytest
import torch

import merging
from merging import AGGREGATORS, HyperParam, MergeError
from merging.aggregators import slerp_tensors
from merging.sparsify import band_mask, topk_mask

torch.set_default_dtype(torch.float32)


def stack(k=4, shape=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((k, *shape), generator=g), torch.rand(k, generator=g) + 0.5


def call(name, deltas, weights, base=None, norms=None, **hp):
    """U by the method's torch definition, its arguments filled in as the engine fills them."""
    agg = AGGREGATORS[name]
    if base is None:
        base = torch.zeros(deltas.shape[1:])
    if norms is None:
        norms = deltas.reshape(deltas.shape[0], -1).norm(dim=1) * weights.abs()
    kw = agg.kwargs(agg.check_params(hp, deltas.shape[0]), "t", base, norms)
    return agg.update(deltas, weights, **kw)


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
TASK_VECTOR_METHODS = [n for n, a in AGGREGATORS.items()
                       if a.exact is None or not a.exact.always or n in ("linear", "slerp")]


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
        assert agg.summary and callable(agg.step)
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
    # a huge whole number is out of range, not "expected int" (float(10**30) != 10**30 refused it as not whole);
    # 1e30 was taken as a step count
    for huge in (10**30, 1e30):
        with pytest.raises(MergeError, match=r"steps.*is outside \[1, 1e\+12\]"):
            AGGREGATORS["fednova"].check_params({"steps": [huge, 10]}, 2)
    assert AGGREGATORS["fednova"].check_params({"steps": [10**12, 7.0]}, 2)["steps"] == [10**12, 7]


def test_public_api_names():
    assert merging.AGGREGATORS is AGGREGATORS
    assert callable(merging.merge_state_dicts)


# ----------------------------------------------------------------- adding a method = one declaration

@pytest.fixture()
def toy_methods():
    """Two methods declared here and nowhere else: a plain function, and a linear one after a
    weight-independent sparsifier (cached by the live app, like DARE's masks)."""
    from merging.method import Sparsifier, weighted_sum
    from merging.registry import aggregator

    @aggregator("toy_scaled", "scale · Σ wᵢτᵢ.", [HyperParam("scale", float, 0.5, "Factor on the sum.", low=0.0)])
    def toy_scaled(deltas, weights, scale):
        return weighted_sum(deltas, weights) * scale

    cut = Sparsifier("cut", keep=lambda d, i, k, hp, o: o.copy_(d * (d.abs() >= hp["cut"])),
                     exact=lambda d, i, k, hp: d * (d.abs() >= hp["cut"]), reads=("cut",))

    @aggregator("toy_cut", "Σ wᵢτᵢ over the entries with |τ| ≥ cut.",
                [HyperParam("cut", float, 0.01, "Smallest magnitude kept.", low=0.0)], linear=True, sparsifier=cut)
    def toy_cut(weights, cut):
        return weights.clone()

    yield
    AGGREGATORS.remove("toy_scaled")
    AGGREGATORS.remove("toy_cut")


def _toy_expected(method, base, deltas, weights, lam, **hp):
    if method == "toy_scaled":
        u = sum(w * d for w, d in zip(weights, deltas)) * hp.get("scale", 0.5)
    else:
        u = sum(w * d * (d.abs() >= hp.get("cut", 0.01)) for w, d in zip(weights, deltas))
    return base + lam * u


@pytest.mark.parametrize("method,hp", [("toy_scaled", {}), ("toy_scaled", {"scale": 2.0}), ("toy_cut", {}),
                                       ("toy_cut", {"cut": 0.03})])
def test_a_method_declared_once_runs_through_the_engine_and_the_live_model(toy_methods, tiny_zoo, method, hp):
    from transformers import AutoModelForCausalLM

    from merging import Checkpoint, LiveModel, TaskVectorStack, load_source, merge_state_dicts
    from tests.conftest import load_sd

    base = {k: v.float() for k, v in load_sd(tiny_zoo["base"]).items()}
    fts = [{k: v.float() for k, v in load_sd(tiny_zoo[f"ft{i}"]).items()} for i in range(3)]
    weights = [0.6, -0.4, 1.2]
    expected = {n: _toy_expected(method, base[n], [f[n] - base[n] for f in fts], weights, 0.7, **hp) for n in base
                if base[n].is_floating_point()}

    merged = merge_state_dicts(base, fts, method, weights=weights, lam=0.7, **hp)  # the engine's streaming path
    for n, t in expected.items():
        torch.testing.assert_close(merged[n], t, atol=1e-6, rtol=1e-5)

    stack = TaskVectorStack(Checkpoint(tiny_zoo["base"]), [load_source(tiny_zoo[f"ft{i}"]) for i in range(3)])
    live = LiveModel(AutoModelForCausalLM.from_pretrained(tiny_zoo["base"]), stack)
    for w in (weights, [0.6, 0.1, 1.2]):  # the second move changes one weight: the incremental path if linear
        live.apply(method, w, lam=0.7, **hp)
        for n, p in live.targets.items():
            want = _toy_expected(method, stack.base[n], [stack.deltas[n][i] for i in range(3)], w, 0.7, **hp)
            torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5)
    assert AGGREGATORS[method].check_params(hp, 3)  # the UI / YAML description comes from the same declaration


def test_a_default_is_written_once():
    """A hyperparameter's default lives in its HyperParam; a signature repeating it is refused."""
    from merging.registry import aggregator

    with pytest.raises(ValueError, match="default of 'scale'"):
        @aggregator("toy_twice", "Refused.", [HyperParam("scale", float, 0.5, "Factor.")])
        def toy_twice(deltas, weights, scale=0.5):
            return deltas.sum(0) * scale
    assert "toy_twice" not in AGGREGATORS
