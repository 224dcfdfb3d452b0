"""Property-based tests: every aggregator on any K, shape, dtype and coefficients; the config parser."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merging import AGGREGATORS, MergeError, merge_state_dicts, parse_config

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
coef = st.floats(-3, 3, allow_nan=False, allow_infinity=False)


def _hyper(name, k, draw):
    hp = {}
    for p in AGGREGATORS[name].params:
        if p.name == "steps":
            hp["steps"] = [draw(st.integers(1, 1000)) for _ in range(k)]
        elif p.name == "learning_rates":
            hp["learning_rates"] = [draw(st.floats(1e-6, 1.0)) for _ in range(k)]
        elif p.type is float and p.low is not None and p.high is not None:
            hp[p.name] = draw(st.floats(p.low, p.high, exclude_min=p.low_open))
        elif p.choices:
            hp[p.name] = draw(st.sampled_from(p.choices))
        elif p.type is bool:
            hp[p.name] = draw(st.booleans())
        elif p.name == "rho":
            hp[p.name] = draw(st.floats(1e-3, 100))
    if "epsilon" in hp:  # DELLA: density ± epsilon must stay inside (0, 1), else it is refused
        d = hp["density"]
        eps = 0.0 if d in (0.0, 1.0) else draw(st.floats(0.0, 0.99 * min(d, 1 - d)))
        hp["epsilon"] = eps if d - eps > 0 and d + eps < 1 else 0.0  # 0.99·d rounds to d when d is subnormal
    return hp


@st.composite
def merges(draw):
    name = draw(st.sampled_from(list(AGGREGATORS)))
    agg = AGGREGATORS[name]
    k = draw(st.integers(agg.min_models, agg.max_models or 8))
    shape = draw(shapes)
    dtype = draw(dtypes)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(shape, generator=g).to(dtype), "b": torch.randn(shape[-1:], generator=g).to(dtype)}
    fts = [{k_: v + 0.1 * torch.randn(v.shape, generator=g).to(dtype) for k_, v in base.items()} for _ in range(k)]
    weights = [draw(coef) for _ in range(k)]
    return name, base, fts, weights, draw(st.floats(0.05, 2.0)), _hyper(name, k, draw)


@SETTINGS
@given(merges())
def test_any_merge_is_finite_with_the_base_shape_and_dtype(case):
    name, base, fts, weights, lam, hp = case
    try:
        out = merge_state_dicts(base, fts, name, weights=weights, lam=lam, **hp)
    except MergeError as exc:  # the only refusals allowed here: weights that cancel out (multislerp)
        if name == "multislerp" and "weights" in str(exc):
            return
        pytest.fail(f"{name} refused valid input: {exc}")
    for key, t in base.items():
        assert out[key].shape == t.shape and out[key].dtype == t.dtype
        assert torch.isfinite(out[key].float()).all()


@SETTINGS
@given(st.sampled_from(list(AGGREGATORS)), shapes, st.integers(1, 8))
def test_zero_task_vectors_leave_the_base_unchanged(name, shape, k):
    agg = AGGREGATORS[name]
    k = min(max(k, agg.min_models), agg.max_models or 8)
    base = {"w": torch.randn(shape)}
    hp = {"steps": [10] * k} if name == "fednova" else {}
    out = merge_state_dicts(base, [dict(base) for _ in range(k)], name, **hp)
    torch.testing.assert_close(out["w"], base["w"])


@SETTINGS
@given(st.integers(1, 8), shapes, st.lists(coef, min_size=8, max_size=8))
def test_fedgma_rho_zero_and_cclip_large_rho_equal_task_arithmetic(k, shape, ws):
    g = torch.Generator().manual_seed(k)
    base = {"w": torch.randn(shape, generator=g)}
    fts = [{"w": base["w"] + torch.randn(shape, generator=g)} for _ in range(k)]
    ta = merge_state_dicts(base, fts, "task_arithmetic", weights=ws[:k])
    for name, hp in (("fedgma", {"rho": 0.0}), ("cclip", {"rho": 1e6})):
        torch.testing.assert_close(merge_state_dicts(base, fts, name, weights=ws[:k], **hp)["w"], ta["w"],
                                   atol=1e-5, rtol=1e-5)


@SETTINGS
@given(st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5) | st.none())
def test_bad_coefficients_are_refused_by_name(value):
    """NaN, inf, huge (beyond ±1000), missing or non-numeric coefficients: a MergeError naming them."""
    base = {"w": torch.zeros(3)}
    fts = [{"w": torch.ones(3)}]
    try:
        fine = value is not None and math.isfinite(float(value)) and abs(float(value)) <= 1000
    except (TypeError, ValueError):
        fine = False
    if fine:
        merge_state_dicts(base, fts, "task_arithmetic", weights=[value], lam=1.0)
        return
    with pytest.raises(MergeError, match="weight"):
        merge_state_dicts(base, fts, "task_arithmetic", weights=[value])
    with pytest.raises(MergeError, match="lambda"):
        merge_state_dicts(base, fts, "task_arithmetic", lam=value)


@st.composite
def hyper_out_of_range(draw):
    def bounded(p):
        return p.high is not None and p.low is not None

    name = draw(st.sampled_from([n for n, a in AGGREGATORS.items() if any(bounded(p) for p in a.params)]))
    p = draw(st.sampled_from([p for p in AGGREGATORS[name].params if bounded(p)]))
    value = draw(st.floats(p.high + 1e-3, p.high + 1e6) | st.floats(p.low - 1e6, p.low - 1e-3))
    if p.type is int:
        value = math.floor(value) if value < p.low else math.ceil(value)
    return name, p.name, value


@SETTINGS
@given(hyper_out_of_range())
def test_every_out_of_range_hyperparameter_is_refused_by_name(case):
    name, key, value = case
    with pytest.raises(MergeError, match=key):
        parse_config({"merge_method": name, "base_model": "b", "models": [{"model": "m"}], "parameters": {key: value}})
    with pytest.raises(MergeError, match=key):
        merge_state_dicts({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], name, **{key: value})


config_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["merge_method", "models", "base_model", "parameters", "dtype", "junk"]),
                       config_values, max_size=5))
def test_config_parser_never_crashes(data):
    try:
        cfg = parse_config(data)
    except MergeError as exc:
        assert str(exc).startswith("config: ") and len(str(exc).splitlines()) == 1
    else:
        assert cfg.merge_method in AGGREGATORS
