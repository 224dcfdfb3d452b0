"""The app on the shipped zoo (assets/zoo), for the tests that check what users see: its
fine-tunes solve their tasks, so the scenarios' ✓ cells and scores mean something."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import free_port

ZOO = Path(__file__).resolve().parent.parent / "assets" / "zoo"


@pytest.fixture(scope="module")
def shipped_url():
    """app.build_demo() on the shipped zoo, on a free 127.0.0.1 port, for one test module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDMERGE_ZOO", str(ZOO))
    import app

    demo = app.build_demo()
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    mp.undo()
