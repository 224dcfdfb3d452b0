"""The app on the shipped zoo (assets/zoo), for the tests that check what users see: its
fine-tunes solve their tasks, so the scenarios' ✓ cells and scores mean something."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import serve_app

ZOO = Path(__file__).resolve().parent.parent / "assets" / "zoo"


@pytest.fixture(scope="module")
def shipped_url():
    """app.build_demo() on the shipped zoo, on a free 127.0.0.1 port, for one test module."""
    yield from serve_app(ZOO)


def library_result(models, method, weights, lam, hyper, prompts):
    """The same merge and scores computed in this process by evaluation.Session (no app in between)."""
    from evaluation.session import Session

    s = Session(zoo=ZOO, allow_hub=False).load_zoo()
    try:
        s.select(models)
        return s.live(method, weights, lam, hyper, prompts)
    finally:
        s.close()
