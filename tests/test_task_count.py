"""The task-count curve: which groups it merges, its bounds, and what it measures on the shipped zoo."""
from __future__ import annotations

import itertools
import math

import pytest

from evaluation import task_count as TC
from merging.errors import MergeError


def test_groups_are_every_subset_or_a_fixed_spread_sample():
    assert TC.groups_of_size(4, 2, 6) == list(itertools.combinations(range(4), 2))  # all 6
    picked = TC.groups_of_size(7, 3, 6)
    assert len(picked) == 6 == len(set(picked)) and all(len(g) == 3 and list(g) == sorted(g) for g in picked)
    assert picked == TC.groups_of_size(7, 3, 6)  # the same groups every run
    assert any(0 not in g for g in picked) and len({i for g in picked for i in g}) >= 6  # not the first ones only
    assert TC.groups_of_size(7, 7, 6) == [tuple(range(7))]


@pytest.fixture(scope="module")
def zoo_session():
    from evaluation.session import Session, read_zoo
    from merging.cache import StackCache

    session = Session(cache=StackCache(2 ** 30), allow_hub=False).load_zoo()
    session.select([s.name for s in read_zoo(None)[1] if not s.variant_of])  # one fine-tune per task
    yield session
    session.close()


def test_bad_requests_are_refused_before_any_work(zoo_session):
    before = list(zoo_session.selected)
    with pytest.raises(MergeError, match="slerp: merge"):
        TC.run(zoo_session, ["task_arithmetic", "slerp"])
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        TC.run(zoo_session, ["nope"])
    with pytest.raises(MergeError, match="between 1 and 20, not 0"):
        TC.run(zoo_session, ["task_arithmetic"], per_size=0)
    zoo_session.select(before[:1])
    try:
        with pytest.raises(MergeError, match="at least two"):
            TC.run(zoo_session, ["task_arithmetic"])
    finally:
        zoo_session.select(before)


def test_the_zoo_merges_pairs_well_and_all_seven_badly(zoo_session):
    """What the curve exists to show, on the shipped zoo: pairs keep most of the fine-tunes'
    accuracy, all seven at once keep little (zoo README: pairs 0.885 mean, all seven 0.22)."""
    before = list(zoo_session.selected)
    seen = []
    curve = TC.run(zoo_session, ["task_arithmetic"], per_size=2, n_val=10, n_test=20,
                   progress=lambda f, d: seen.append(d))
    assert zoo_session.selected == before  # restored
    assert [p.k for p in curve.points] == [2, 3, 4, 5, 6, 7]
    assert [len(p.groups) for p in curve.points] == [2, 2, 2, 2, 2, 1]
    assert all(0.0 <= s <= 1.05 for p in curve.points for s in p.scores["task_arithmetic"])
    pairs, seven = curve.points[0], curve.points[-1]
    assert seven.groups == [["reverse", "upper", "sort", "sort_desc", "add", "is_even", "is_odd"]]
    assert pairs.mean("task_arithmetic") - seven.mean("task_arithmetic") >= 0.3
    assert seven.settings["task_arithmetic"][0].lam < 1.0  # seven vectors need a smaller λ than one
    assert any(d.endswith("(11 of 11 groups)") for d in seen)
    text = TC.to_markdown(curve)
    assert "| 7 | 1 |" in text and "reverse + upper + sort + sort_desc + add + is_even + is_odd" in text
    fig = TC.figure(curve)
    means = [t for t in fig.data if t.name == "task_arithmetic"][0]
    assert list(means.x) == [2, 3, 4, 5, 6, 7]
    assert [round(y, 6) for y in means.y] == [round(p.mean("task_arithmetic"), 6) for p in curve.points]
    assert not any(math.isnan(y) for y in means.y)


@pytest.mark.slow
def test_the_documented_curve(zoo_session):
    """evaluation/RESULTS.md and README quote the documented command's curve (the same groups: the
    sample is seeded): Task Arithmetic's means per size, and from five tasks on CCLIP and FedNova
    beating Task Arithmetic in every group, while up to four they do not."""
    from pathlib import Path

    methods = ["task_arithmetic", "cclip", "fednova"]
    curve = TC.run(zoo_session, methods, per_size=6, n_val=20, n_test=60)
    assert [(p.k, len(p.groups)) for p in curve.points] == [(2, 6), (3, 6), (4, 6), (5, 6), (6, 6), (7, 1)]
    assert [round(p.mean("task_arithmetic"), 2) for p in curve.points] == [0.93, 0.79, 0.59, 0.50, 0.31, 0.21]
    for p in curve.points:
        ta = p.scores["task_arithmetic"]
        for m in ("cclip", "fednova"):
            ahead = sum(b > a for a, b in zip(ta, p.scores[m]))
            assert ahead == len(ta) if p.k >= 5 else ahead <= 2, (p.k, m, ta, p.scores[m])
    assert [round(p.mean(m), 2) for p in curve.points[-2:] for m in ("cclip", "fednova")] == [0.45, 0.46, 0.38, 0.40]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "0.93 in pairs,\n  then 0.79, 0.59, 0.50, 0.31 and 0.21" in readme and "0.45–0.46 vs 0.31 at six" in readme


def test_command_line_writes_the_table_and_figure(tmp_path, capsys):
    """`python -m evaluation task-count`: the report files, and a one-line error with exit 2 on bad input."""
    from evaluation.__main__ import main

    code = main(["task-count", "--models", "reverse,upper,is_even", "--methods", "task_arithmetic",
                 "--per-size", "1", "--n-val", "6", "--n-test", "6", "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    text = (tmp_path / "task-count.md").read_text()
    assert "| 3 | 1 |" in text and "reverse + upper + is_even" in text
    assert "plotly" in (tmp_path / "task-count.html").read_text()
    assert text in capsys.readouterr().out
    for bad, want in ((["--sizes", "2,x"], "--sizes: comma-separated whole numbers"),
                      (["--sizes", "9"], "--sizes: whole numbers from 2 to 7"),
                      (["--methods", "slerp"], "--methods: slerp merges 1 to 2 models"), (["--device", "tpu"], "unknown device 'tpu'")):
        assert main(["task-count", "--out", str(tmp_path / "no"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err, err
    assert not (tmp_path / "no").exists()


def test_command_line_refuses_bad_counts_names_and_folders_before_any_work(tmp_path, capsys):
    """Every option is checked before the zoo is loaded: one line naming it, exit 2, nothing written.
    (`--models reverse` would stop the run with another error once loaded: the check must come first.)"""
    from evaluation.__main__ import main

    (tmp_path / "file").write_text("x")
    cases = ((["--n-val", "-3"], "--n-val: a whole number from 1 to 300"),
             (["--n-val", "0"], "--n-val: a whole number from 1 to 300"),
             (["--n-val", "100000000"], "--n-val: a whole number from 1 to 300"),
             (["--n-test", "0"], "--n-test: a whole number from 1 to 300"),
             (["--n-test", "301"], "--n-test: a whole number from 1 to 300"),
             (["--per-size", "0"], "--per-size: a whole number from 1 to 20"),
             (["--per-size", "21"], "--per-size: a whole number from 1 to 20"),
             (["--methods", "nope"], "--methods: no 'nope' merge method"),
             (["--methods", "task_arithmetic,,median"], "--methods: comma-separated names"),
             (["--methods", "median,median"], "--methods: 'median' named twice"),
             (["--out", str(tmp_path / "file" / "x")], f"--out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file, not a folder"),
             (["--out", str(tmp_path / "file")], "--out "),
             (["--out", "/"], "--out /: the file system's root"))
    for bad, want in cases:
        assert main(["task-count", "--models", "reverse", "--out", str(tmp_path / "no"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err and "Error" not in err, (bad, err)
    for sizes, want in (("1,9", "2 to 7"), ("2,4", "2 to 3")):  # was: refused only after loading the zoo's models
        models = ["--models", "reverse,upper,sort"] if want == "2 to 3" else []
        assert main(["task-count", "--sizes", sizes, *models, "--out", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err
        assert f"--sizes: whole numbers from {want}" in err and "Loading" not in err, err
    for bad, want in ((["--models", "reverse,nope"], "--models: no 'nope' in the zoo"),
                      (["--models", "reverse,reverse"], "--models: 'reverse' named twice")):
        assert main(["task-count", "--n-val", "0", "--out", str(tmp_path / "no"), *bad]) == 2
        assert "--n-val" in capsys.readouterr().err  # the counts first: nothing read
        assert main(["task-count", "--out", str(tmp_path / "no"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err, (bad, err)
    with pytest.raises(SystemExit) as stop:  # argparse's own errors: one line too, no usage block
        main(["task-count", "--n-val", "abc"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err
    assert err.startswith("error: argument --n-val: invalid int value: 'abc'")
    assert not (tmp_path / "no").exists() and (tmp_path / "file").read_text() == "x"
