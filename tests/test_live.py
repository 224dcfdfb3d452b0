"""The live engine's fast paths give exactly what the plain per-tensor merge gives."""
from __future__ import annotations

import pytest
import torch

from merging import AGGREGATORS, Checkpoint, LiveModel, MergeError, TaskVectorStack, load_source


@pytest.fixture()
def live(tiny_zoo):
    from transformers import AutoModelForCausalLM

    stack = TaskVectorStack(Checkpoint(tiny_zoo["base"]), [load_source(tiny_zoo[f"ft{i}"]) for i in range(3)])
    return LiveModel(AutoModelForCausalLM.from_pretrained(tiny_zoo["base"]), stack)


def params(live):
    return {n: p.detach().clone() for n, p in live.targets.items()}


def reference(live, method, weights, lam, select=None, **hp):
    """The general path: stack.merged() tensor by tensor, no fast path, no cache."""
    req = live.stack.request(method, weights, lam, select, **hp)
    return {n: req.agg.merge(live.stack._selected(n, req.idx), req.weights, live.stack.base[n], req.lam, req.hyper,
                             tensor=n, update_norms=req.norms)[0] for n in live.stack.names}


@pytest.mark.parametrize("method,hp", [("task_arithmetic", {}), ("linear", {}), ("fednova", {}),
                                       ("cclip", {"rho": 0.5}), ("task_arithmetic", {"normalize": True})])
def test_linear_fast_path_and_increments_match_full_merges(live, method, hp):
    moves = [[1.0, 1.0, 1.0], [0.4, 1.0, 1.0], [0.4, 1.3, 1.0], [0.4, 1.3, -0.2], [0.9, 1.3, -0.2]]
    for w in moves:
        live.apply(method, w, lam=0.7, **hp)
        got = params(live)
        for n, t in reference(live, method, w, 0.7, **hp).items():
            torch.testing.assert_close(got[n], t, atol=1e-6, rtol=1e-5)


def test_selection_subset_on_linear_path(live):
    live.apply("task_arithmetic", [0.5, 2.0], lam=1.0, select=[2, 0])
    got = params(live)
    for n, t in reference(live, "task_arithmetic", [0.5, 2.0], 1.0, select=[2, 0]).items():
        torch.testing.assert_close(got[n], t)


@pytest.mark.parametrize("method", [m for m, a in AGGREGATORS.items() if a.sparsifier is not None])
def test_cached_prepare_step_matches_uncached(live, method):
    for w, density in [([1.0, 0.5, 0.8], 0.5), ([0.3, 0.5, 0.8], 0.5), ([0.3, 0.5, 0.8], 0.3)]:
        live.apply(method, w, lam=1.1, density=density)
        got = params(live)
        for n, t in reference(live, method, w, 1.1, density=density).items():
            torch.testing.assert_close(got[n], t)


def test_a_refused_merge_keeps_the_previous_weights(live):
    live.apply("fedgma", [1.0, 1.0, 1.0], lam=1.0, rho=0.3)
    before = params(live)
    for bad in (dict(method="fedgma", weights=[1.0, 1.0, 1.0], lam=1.0, rho=7.0),
                dict(method="task_arithmetic", weights=[1.0, float("inf"), 1.0]),
                dict(method="slerp", weights=[1.0, 1.0, 1.0]),
                dict(method="task_arithmetic", weights=[1.0, 1.0], select=[0, 5])):
        with pytest.raises(MergeError):
            live.apply(**bad)
        after = params(live)
        assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("method", ["fedgma", "median", "ties", "breadcrumbs_ties", "dare_ties"])
def test_sliced_merge_equals_one_call_across_slice_boundaries(method):
    from merging.method import CHUNK

    agg = AGGREGATORS[method]
    g = torch.Generator().manual_seed(0)
    deltas, base = torch.randn(4, 3 * CHUNK + 5, generator=g), torch.randn(3 * CHUNK + 5, generator=g)
    w = torch.tensor([0.5, 1.0, -0.3, 0.8])
    hp = agg.check_params({"density": 0.4} if agg.sparsifier else {}, 4)
    expected = base + 0.7 * agg.update(deltas, w, **agg.kwargs(hp, "t", base))
    torch.testing.assert_close(agg.merge(deltas, w, base, 0.7, hp, tensor="t")[0], expected)


def test_recycled_prepare_buffers_never_alias_the_task_vectors(live):
    """Moving the density slider evicts old trim settings; their buffers are reused, but the raw
    task vectors (shared by every session) must stay untouched and every merge stay exact."""
    stack = live.stack
    raw = {n: t.clone() for n, t in stack.deltas.items()}
    for density in (0.9, 0.7, 0.5, 0.3, 0.2):
        for method in ("ties", "magnitude_prune"):
            live.apply(method, [1.0, 0.5], lam=1.0, select=[0, 1], density=density)
            got = params(live)
            for n, t in reference(live, method, [1.0, 0.5], 1.0, select=[0, 1], density=density).items():
                torch.testing.assert_close(got[n], t)
    assert stack.reused_buffers > 0  # the eviction path ran and its buffers were written again
    assert all(torch.equal(stack.deltas[n], raw[n]) for n in raw)


@pytest.mark.parametrize("method,select", [("nuslerp", [0, 1]), ("multislerp", None), ("karcher", None),
                                           ("model_stock", None), ("nearswap", [1]), ("arcee_fusion", [0]),
                                           ("sce", None), ("passthrough", [2]), ("della", None)])
def test_mergekit_model_methods_run_live_like_the_engine(live, tiny_zoo, method, select):
    """The app's live path (the task-vector form the registry derives) gives the on-disk merge's tensors."""
    from merging import merge_state_dicts
    from tests.conftest import load_sd

    idx = select if select is not None else [0, 1, 2]
    live.apply(method, [0.6, 0.4, 0.8][:len(idx)], lam=1.0, select=select)
    got = params(live)
    ref = merge_state_dicts(load_sd(tiny_zoo["base"]), [load_sd(tiny_zoo[f"ft{i}"]) for i in idx], method,
                            weights=[0.6, 0.4, 0.8][:len(idx)])
    for n, t in got.items():
        torch.testing.assert_close(t, ref[n].to(t.dtype), atol=2e-5, rtol=1e-4)
