"""Search on Ray workers (optional dependency): the same scores and choice as the local search."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from merging.cache import StackCache
from tests.conftest import ROOT


def test_compare_ray_without_ray_is_one_line(tmp_path):
    """Without Ray installed, `compare --ray` says how to install it (one line, exit 2) before doing any work.

    Ray is made unimportable in the child (`sys.modules["ray"] = None`), so this runs whether or not it is here."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    no_ray = "import runpy, sys; sys.modules['ray'] = None; runpy.run_module('evaluation', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", no_ray, "compare", "--ray", "--methods", "task_arithmetic",
                        "--quick", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: Ray is not installed: pip install -r requirements-ray.txt"
    assert not (tmp_path / "o").exists()  # refused before any loading, scoring or writing


@pytest.mark.slow
def test_a_cluster_address_that_does_not_answer_is_refused_in_seconds():
    """ray.init retries a dead address for minutes; a port nobody listens on is refused at once."""
    import socket
    import time

    from evaluation.distributed import connect
    from merging.errors import MergeError

    ray = pytest.importorskip("ray")
    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    for addr in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(MergeError, match=f"cannot reach the Ray cluster at {addr}: connection refused"):
            connect(addr)
    assert time.time() - t0 < 10 and not ray.is_initialized()


@pytest.mark.slow  # starts a local Ray: ~20 s
def test_search_on_a_local_ray_equals_the_local_search():
    ray = pytest.importorskip("ray")
    from evaluation.distributed import _ACTORS
    from evaluation.search import search
    from evaluation.session import Session

    s = Session(cache=StackCache(2 ** 30), allow_hub=False).load_zoo()  # the shipped zoo: scores above 0
    kw = dict(lambdas=[0.1, 0.3, 0.6, 1.0, 1.4], grid=[{"rho": 0.2}, {"rho": 0.6}, {"rho": 0.9}], n_val=8, n_test=8)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        local = search(s, "fedgma", **kw)
        remote = search(s, "fedgma", ray=True, **kw)
        again = search(s, "fedgma", ray=True, **kw)  # the workers (and their loaded stacks) are reused
        actors = [a for v in _ACTORS.values() for a in v]
        assert len(actors) == 2
        assert np.nanmax(np.array(local.scores)) > 0.1
        np.testing.assert_array_equal(np.array(remote.scores), np.array(local.scores))
        assert remote.curves == local.curves
        assert (remote.best_lambda, remote.best_hyper, remote.test_accuracy) == (
            local.best_lambda, local.best_hyper, local.test_accuracy)
        np.testing.assert_array_equal(np.array(again.scores), np.array(local.scores))
    finally:
        _ACTORS.clear()
        ray.shutdown()


_LOCK = None  # a lock the forked children take (set by the test below)


def _take_lock(state, item):
    got = _LOCK.acquire(timeout=2)  # a lock inherited locked is never freed in the child
    if got:
        _LOCK.release()
    return got, state, item * 2


def test_forked_map_children_never_inherit_a_lock_held_by_another_thread():
    """forked_map holds the given locks while it forks: a child does not start with a lock that another
    thread of the parent held (and can never release in the child), and results come back by index."""
    import threading
    import time

    from evaluation.distributed import forked_map

    global _LOCK
    _LOCK = threading.Lock()
    holding = threading.Event()

    def hold():
        with _LOCK:
            holding.set()
            time.sleep(0.5)

    for locks, expect in (([_LOCK], True), ((), False)):
        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait()
        out = dict(forked_map(2, _take_lock, [1, 2, 3], "state", locks=locks))
        holder.join()
        holding.clear()
        assert out == {i: (expect, "state", x * 2) for i, x in enumerate([1, 2, 3])}
    assert _LOCK.acquire(blocking=False)  # and the parent's lock is free again
