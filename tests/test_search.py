"""Coefficient search (λ × hyperparameters, normalized validation accuracy, test report)."""
from __future__ import annotations

import math

import pytest
import torch

from merging.cache import StackCache
from tests.conftest import build_tiny_zoo


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from evaluation.session import Session

    s = Session(cache=StackCache(2 ** 30), zoo=build_tiny_zoo(tmp_path_factory), allow_hub=False).load_zoo()
    s.select([0, 1, 2])
    return s


def test_paper_grids():
    from evaluation.search import LAMBDAS, hyper_grid

    assert LAMBDAS[0] == 0.05 and LAMBDAS[-1] == 2.0 and len(LAMBDAS) == 40
    assert [g["rho"] for g in hyper_grid("fedgma")] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    rhos = [g["rho"] for g in hyper_grid("cclip", norms=[1.0, 3.0, 2.0])]
    assert rhos[0] == 1.0 and max(rhos) < 3.0
    assert all(0 < g["density"] <= 1 for g in hyper_grid("ties"))
    assert hyper_grid("task_arithmetic") == [{}]


def test_search_picks_the_best_normalized_validation_score(session):
    from evaluation.search import search

    seen = []
    before = {n: p.detach().clone() for n, p in session.live_model.targets.items()}
    r = search(session, "fedgma", lambdas=[0.2, 1.0, 1.8], grid=[{"rho": 0.2}, {"rho": 0.8}], n_val=6, n_test=6,
               progress=lambda f, d: seen.append(f))
    assert len(r.scores) == 2 and all(len(row) == 3 for row in r.scores)
    flat = [(s if not math.isnan(s) else -1, gi, li) for gi, row in enumerate(r.scores) for li, s in enumerate(row)]
    best = max(flat, key=lambda t: (t[0], -t[1] * 10 - t[2]))
    assert r.best_lambda == [0.2, 1.0, 1.8][best[2]] and r.best_hyper == [{"rho": 0.2}, {"rho": 0.8}][best[1]]
    assert set(r.curves) == set(session.tasks) | {"normalized mean"} and all(len(v) == 3 for v in r.curves.values())
    assert set(r.test_accuracy) == set(session.tasks) and r.evaluations == 7
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    # the session's own model is left alone (the search uses a scratch copy)
    assert all(torch.equal(before[n], p) for n, p in session.live_model.targets.items())


def test_lambda_rescaling_equals_a_fresh_merge(session):
    """The search computes U once per setting and writes θ₀ + λ·U: same tensors as the engine at λ."""
    from evaluation.scorer import ScratchModel

    scratch = ScratchModel(session.pool)
    scratch.apply("task_arithmetic", [1.0, 0.5, 2.0], 0.35, session.selected)  # its LiveModel keeps these coefficients
    for method, hyper in (("fedgma", {"rho": 0.4}), ("ties", {"density": 0.5}), ("median", {})):
        u = scratch.update(method, [1.0, 0.5, 2.0], session.selected, hyper)
        scratch.write_update(u, 0.35)
        fresh = dict(session.stack.merged(method, [1.0, 0.5, 2.0], 0.35, session.selected, **hyper))
        for n, t in fresh.items():
            assert torch.allclose(scratch.targets[n], t, atol=1e-6), (method, n)
    # after those direct writes, a merge that changes one coefficient is not added onto them
    scratch.apply("task_arithmetic", [1.0, 0.5, 1.0], 0.35, session.selected)
    fresh = dict(session.stack.merged("task_arithmetic", [1.0, 0.5, 1.0], 0.35, session.selected))
    assert all(torch.allclose(scratch.targets[n], t, atol=1e-6) for n, t in fresh.items())


def test_compare_all_tunes_each_applicable_method(session):
    from evaluation.search import compare_all, comparison_chart, comparison_table

    results = compare_all(session, methods=["task_arithmetic", "cclip", "slerp"], n_val=4, n_test=4)
    assert [r.method for r in results] == ["task_arithmetic", "cclip"]  # slerp takes two models, 3 selected
    headers, rows = comparison_table(results)
    assert len(rows) == 2 and headers[0] == "method"
    assert len(comparison_chart(results).data) == 2


@pytest.fixture(scope="module")
def zoo_session():
    """The shipped zoo: its fine-tunes score well above 0, so equal scores mean something."""
    from evaluation.session import Session

    return Session(cache=StackCache(2 ** 30), allow_hub=False).load_zoo()


def test_compare_all_in_forked_processes_equals_one_after_the_other(zoo_session):
    """compare-all's methods in two forked one-thread processes: the same results as the serial loop
    (lock safety of the fork: tests/test_distributed.py)."""
    from evaluation.search import compare_all

    kw = dict(methods=["task_arithmetic", "fedgma", "ties", "slerp", "median"], n_val=6, n_test=6)
    serial = compare_all(zoo_session, workers=1, **kw)
    seen = []
    forked = compare_all(zoo_session, workers=2, progress=lambda f, d: seen.append(d), **kw)
    assert max(max(r.scores[0]) for r in serial) > 0.1  # not a degenerate all-zero comparison
    key = lambda rs: [(r.method, r.scores, r.best_lambda, r.best_hyper, r.test_accuracy) for r in rs]  # noqa: E731
    assert key(forked) == key(serial)
    assert [r.method for r in serial] == ["task_arithmetic", "fedgma", "ties", "median"]  # slerp: two models only
    assert seen[-1].endswith("(4 of 4 methods)")  # the forked path's progress: one line per finished method


def test_a_cancel_stops_forked_searches_without_waiting_for_them(zoo_session):
    """The progress callback is where a Cancel is raised. In forked compare-all it ran only when a method
    came back, and the running ones were then waited for (~30 s on the zoo): now it is called while the
    children work, and what it raises stops them at once."""
    import multiprocessing

    from evaluation.search import compare_all

    class Stop(Exception):
        pass

    calls = []

    def cancel(frac, text):
        calls.append((frac, text))
        raise Stop

    with pytest.raises(Stop):
        compare_all(zoo_session, methods=["fedgma", "ties", "cclip"], quick=False, n_val=20, workers=2,
                    progress=cancel)
    assert calls == [(0.0, "tuning 3 methods")]  # before any method was done (was: after the first one)
    assert multiprocessing.active_children() == []  # the workers were stopped, and reaped


def test_search_with_its_settings_in_forked_processes_equals_one_process(zoo_session):
    """One search's hyperparameter settings scored in two forked processes (auto-tune's grid): every
    score, curve and the choice equal the one-process search."""
    import numpy as np

    from evaluation.search import search

    kw = dict(lambdas=[0.2, 0.6, 1.0, 1.4], grid=[{"rho": 0.1}, {"rho": 0.5}, {"rho": 0.9}], n_val=6, n_test=6)
    one = search(zoo_session, "fedgma", workers=1, **kw)
    seen = []
    two = search(zoo_session, "fedgma", workers=2, progress=lambda f, d: seen.append((f, d)), **kw)
    assert np.nanmax(np.array(one.scores)) > 0.1  # not a degenerate all-zero comparison
    np.testing.assert_array_equal(np.array(two.scores), np.array(one.scores))
    assert (two.curves, two.val_accuracy, two.best_lambda, two.best_hyper, two.test_accuracy) == (
        one.curves, one.val_accuracy, one.best_lambda, one.best_hyper, one.test_accuracy)
    assert [d for _, d in seen if "settings)" in d][-1].endswith("(3 of 3 settings)")
    assert all(0 <= f <= 1 for f, _ in seen)  # 0: the heartbeat before the first setting is back


def test_batched_search_gives_the_same_scores_and_choice(zoo_session, session):
    """Many λ per grouped forward (evaluation.grouped) = one λ at a time: every score and the choice."""
    import numpy as np

    from evaluation.grouped import GroupedModel, supports
    from evaluation.scorer import ScratchModel
    from evaluation.search import search

    assert supports(ScratchModel(zoo_session.pool).model)
    kw = dict(lambdas=[0.1, 0.3, 0.5, 0.7, 1.0, 1.3, 1.9], grid=[{"rho": 0.2}, {"rho": 0.7}], n_val=8, n_test=8)
    one = search(zoo_session, "fedgma", batched=False, **kw)
    many = search(zoo_session, "fedgma", batched=True, **kw)
    assert np.nanmax(np.array(one.scores)) > 0.1  # not a degenerate all-zero comparison
    np.testing.assert_array_equal(np.array(many.scores), np.array(one.scores))
    assert many.curves == one.curves and many.val_accuracy == one.val_accuracy
    assert (many.best_lambda, many.best_hyper, many.test_accuracy) == (one.best_lambda, one.best_hyper,
                                                                        one.test_accuracy)
    # the grouped copy really holds different candidates in its blocks
    g = GroupedModel(ScratchModel(session.pool).model, 3)
    u = ScratchModel(session.pool).update("task_arithmetic", [1.0] * 3, session.selected, {})
    for i, lam in enumerate((0.0, 1.0, 2.0)):
        g.write(i, session.stack.base, u, lam)
    name = next(iter(u))
    assert torch.equal(g.target(name)[0], session.stack.base[name])
    assert not torch.equal(g.target(name)[1], g.target(name)[2])
