"""The shipped zoo does what its README says: every recorded merge is evaluated again on the
shipped models (no tuning: the settings chosen on validation at build time), and every claim of
evaluation.zoo_report.claims holds, or misses, exactly as the README prints it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parent.parent / "assets" / "zoo"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (ZOO / "report.json").exists(), reason="assets/zoo not built")]


@pytest.fixture(scope="module")
def fresh():
    from evaluation.zoo import accuracy_table, folder_mb
    from evaluation.zoo_report import rescore

    recorded = json.loads((ZOO / "report.json").read_text())
    rep = rescore(ZOO, recorded)
    rep["accuracy"] = accuracy_table(ZOO, list(recorded["accuracy"]), recorded["eval_n"])[0]
    rep["size_mb"] = folder_mb(ZOO)
    return recorded, rep


def test_claims_hold_as_the_readme_states(fresh):
    from evaluation.zoo_report import claims

    recorded, rep = fresh
    now = {c["claim"]: c for c in claims(rep)}
    readme = (ZOO / "README.md").read_text()
    for c in recorded["claims"]:
        assert now[c["claim"]]["ok"] == c["ok"], (c, now[c["claim"]])
        row = f"| {c['claim']} | {c['value']} | {'✓' if c['ok'] else '✗ (missed)'} |"
        assert row in readme, row
    # the story the app tells rests on these: they must hold
    assert all(now[k]["ok"] for k in now if k.startswith(("pairwise", "≥ 80% of the pairs", "the pairs below", "conflict ")))


def test_recorded_numbers_are_what_the_models_do(fresh):
    """report.json (and so the README) holds the numbers these models produce, not stale ones."""
    recorded, rep = fresh
    assert rep["accuracy"] == recorded["accuracy"]
    for a, b in zip(recorded["pairs"], rep["pairs"]):
        assert a["test_normalized"] == pytest.approx(b["test_normalized"], abs=1e-9)
    for m in recorded["all"]:
        assert recorded["all"][m]["test_normalized"] == pytest.approx(rep["all"][m]["test_normalized"], abs=1e-9)
    for a, b in zip(recorded["conflict"], rep["conflict"]):
        assert a["cclip"]["interval_vs_task_arithmetic"] == pytest.approx(b["cclip"]["interval_vs_task_arithmetic"])
