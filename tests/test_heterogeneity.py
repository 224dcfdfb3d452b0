"""The heterogeneity study: pair enumeration, statistics on known inputs, the figures' data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluation import heterogeneity as H
from merging.similarity import similarity_from_stacks
from tests.conftest import build_tiny_zoo


def test_spearman_and_bootstrap_on_known_inputs():
    assert H.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert H.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert H.spearman([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.8)  # Σd² = 4: 1 − 6·4/(5·24)
    assert math.isnan(H.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(H.spearman([1, 2], [1, 2]))
    assert H.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    lo, hi = H.bootstrap_ci(range(20), [2 * x for x in range(20)])
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    lo, hi = H.bootstrap_ci(list(range(30)), list(np.random.default_rng(1).permutation(30)))
    assert lo < 0 < hi


def test_group_measures_on_known_task_vectors():
    a = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    stacks = [("h.0.w", torch.stack([a, -a, 2 * a])), ("h.1.w", torch.stack([a, a, 2 * a]))]
    rep = similarity_from_stacks(stacks, ["x", "y", "z"], [{"steps": 10, "learning_rate": 1.0},
                                                           {"steps": 40, "learning_rate": 1.0},
                                                           {"steps": 10, "learning_rate": 2.0}])
    m = H.group_measures(rep, [0, 1])
    assert m["cosine"] == pytest.approx(0.0, abs=1e-12) and m["min_layer_cosine"] == pytest.approx(-1.0)
    assert m["sign_conflict"] == pytest.approx(0.5) and m["norm_ratio"] == pytest.approx(1.0)
    assert m["effort_ratio"] == pytest.approx(4.0)
    m = H.group_measures(rep, [0, 2])
    assert m["cosine"] == pytest.approx(1.0) and m["norm_ratio"] == pytest.approx(2.0)
    assert [l for l, *_ in H.layer_conflicts(rep)] == ["h.0", "h.1"]  # h.0 conflicts (cosine −1 for x, y)


def test_study_on_a_tiny_zoo(tmp_path_factory):
    from evaluation.session import Session

    zoo = build_tiny_zoo(tmp_path_factory)
    session = Session(zoo=zoo, allow_hub=False).load_zoo()
    session.select(list(range(3)))
    methods = ["task_arithmetic", "median"]
    session.apply("task_arithmetic", [1.0, 1.0, 1.0], 0.5)
    settings = session.settings
    before = {n: p.detach().clone() for n, p in session.live_model.targets.items()}
    study = H.run(session, methods, n_val=3, n_test=3)
    assert session.selected == [0, 1, 2]  # restored
    # its merges (search, layer ablation) ran on scratch models: the user's merge is untouched
    assert session.settings is settings
    assert all(torch.equal(before[n], p) for n, p in session.live_model.targets.items())
    # the chosen settings are numbers, formatted only for display
    names = [s.name for s in session.specs]
    for g in study.pairs:
        chosen = g.setting["task_arithmetic"]
        assert chosen.lam in H.STUDY_LAMBDAS and chosen.hyper == {} and chosen.describe() == f"λ={chosen.lam:g}"
        assert chosen.select == tuple(names.index(m) for m in g.members)
    if study.ablation:
        worst = max(study.pairs, key=lambda g: g.drop["task_arithmetic"])
        assert study.ablation["lambda"] == worst.setting["task_arithmetic"].lam
    assert [g.kind for g in study.groups] == ["pair"] * 3 + ["leave-one-out"] * 3
    assert {tuple(g.members) for g in study.pairs} == {tuple(p) for p in
                                                      __import__("itertools").combinations(session.stack.similarity([0, 1, 2]).names, 2)}
    assert all(0 <= g.drop[m] <= 1 or math.isnan(g.drop[m]) for g in study.groups for m in methods)
    assert len(study.correlations) == len(H.MEASURES) * len(methods)
    fig = H.scatter_figures(study, methods)
    first = fig.data[0]
    assert list(first.x) == [g.measures["cosine"] for g in study.pairs]
    assert list(first.y) == [g.drop["task_arithmetic"] for g in study.pairs]
    text = H.to_markdown(study, methods)
    assert "Spearman" in text and "drop: median" in text


def test_study_in_forked_processes_equals_one_after_the_other():
    """The study's groups scored in two forked one-thread processes: the same drops and chosen merges as
    the serial loop, on the shipped zoo (its fine-tunes score well above 0, so equal drops mean something)."""
    from evaluation.session import Session
    from merging.cache import StackCache

    session = Session(cache=StackCache(2 ** 30), allow_hub=False).load_zoo()
    try:
        session.select([0, 1, 4])  # reverse, upper, add: three pairs and three leave-one-out pairs
        methods = ["task_arithmetic", "median"]
        serial = H.run(session, methods, n_val=6, n_test=6, workers=1)
        seen = []
        forked = H.run(session, methods, n_val=6, n_test=6, workers=2, progress=lambda f, d: seen.append(d))
        assert session.selected == [0, 1, 4]
        key = lambda st: [(g.members, g.kind, g.drop, g.setting, g.measures) for g in st.groups]  # noqa: E731
        assert key(forked) == key(serial)
        assert min(g.drop["task_arithmetic"] for g in serial.groups) < 0.9  # some merge works: not all-zero
        assert forked.ablation == serial.ablation and forked.recommendation == serial.recommendation
        assert any(d.endswith("(6 of 6 groups)") for d in seen)  # the forked path's progress, one line per group
    finally:
        session.close()


def test_command_line_refuses_bad_options_before_loading_the_zoo(tmp_path, capsys):
    """`python -m evaluation heterogeneity`: bad counts (a traceback or made-up scores before), unknown or
    repeated names and an output folder under a file are one line naming the option, exit 2, before the
    zoo is loaded (`--models reverse` alone would stop once it is)."""
    from evaluation.__main__ import main

    (tmp_path / "file").write_text("x")
    for bad, want in ((["--n-test", "0"], "--n-test: a whole number from 1 to 300"),
                      (["--n-val", "-3"], "--n-val: a whole number from 1 to 300"),
                      (["--n-val", "100000000"], "--n-val: a whole number from 1 to 300"),
                      (["--methods", "nope"], "--methods: no 'nope' merge method"),
                      (["--out", str(tmp_path / "file" / "x")], f"--out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file, not a folder")):
        assert main(["heterogeneity", "--models", "reverse", "--out", str(tmp_path / "no"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err and "Error" not in err, (bad, err)
    assert main(["heterogeneity", "--models", "reverse,upper,upper", "--out", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.strip() == "error: --models: 'upper' named twice"
    assert not (tmp_path / "no").exists()
