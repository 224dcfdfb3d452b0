"""Every scenario of the shipped zoo's scenarios file makes a claim; run each merge and check it."""
from __future__ import annotations

from pathlib import Path

import pytest

from merging.cache import StackCache

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "assets" / "zoo"


def _scenarios():
    from evaluation import scenarios

    return scenarios.load(ZOO / "scenarios.json")


@pytest.fixture(scope="module")
def zoo_session():
    from evaluation.session import Session

    s = Session(cache=StackCache(2 ** 30), zoo=ZOO, allow_hub=False).load_zoo()
    yield s
    s.close()


def test_every_scenario_names_zoo_models_and_fits_its_method():
    from evaluation.session import read_zoo

    names = {s.name for s in read_zoo(ZOO)[1]}
    found = _scenarios()
    assert len(found) >= 4
    for sc in found:
        assert set(sc.models) <= names, sc.id
        assert sc.explain and sc.claim_text()


@pytest.mark.parametrize("scenario", _scenarios(), ids=lambda s: s.id)
def test_scenario_claim_holds_on_the_shipped_zoo(scenario, zoo_session):
    from evaluation.scenarios import check_claim

    result = check_claim(scenario, zoo_session)
    assert result.holds, f"{scenario.id}: {scenario.claim_text()} -- measured {result.text}"


def test_a_false_claim_is_reported_false(zoo_session):
    from dataclasses import replace

    from evaluation.scenarios import check_claim

    sc = _scenarios()[0]
    strict = replace(sc, claim={"kind": "min_normalized", "value": 1.01, "split": "test", "n": 20})
    assert not check_claim(strict, zoo_session).holds
    flipped = replace(sc, claim={"kind": "beats", "method": "task_arithmetic", "over": "task_arithmetic", "by": 0.01})
    res = check_claim(flipped, zoo_session)
    assert not res.holds and "gap +0.00" in res.text
