"""Searches spread over worker processes: forked local processes, or Ray workers (optional:
`pip install -r requirements-ray.txt`).

Local (`forked_map`, and `session_map` over a session): independent searches (a search's
settings, compare-all's methods, the heterogeneity study's groups, the zoo report's merges) run in
forked copies of this process with one thread each. On the zoo one search's forward passes already
use two threads well, but its Python dispatch and merge updates do not: two one-thread processes
finish these faster than one process with two threads (bench/RESULTS.md). The children share the
loaded stack copy-on-write and exit with the call, so nothing outlives it.

Ray: each worker is a Ray actor holding its own `Session` on the same base and fine-tunes (loaded once,
then reused by every search of the process); the driver cuts the (setting × λ) grid into pieces,
each worker scores its pieces with `search.score_grid` (the function the local search runs, so the
numbers are the same), and the driver chooses and scores the best candidate on test itself.
Model paths must be readable on every node (a shared folder, or Hub ids with network).
"""
from __future__ import annotations

import multiprocessing
import os
import re
import socket
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from typing import Any, Callable, Iterator, Mapping, Sequence

from merging.errors import MergeError

_ACTORS: dict[tuple, list] = {}
_FORKED: Any = None  # what forked children work on; set in the parent only while forking
_FORK_LOCK = threading.Lock()
_IN_CHILD = False  # set in forked search processes
_HELD: list = []  # locks the forking thread holds while it forks: released again in each child


def _release_held() -> None:
    for lock in reversed(_HELD):
        lock.release()
    _HELD.clear()


os.register_at_fork(after_in_child=_release_held)
FORK_MAX_BYTES = 256 * 2 ** 20  # larger models are searched in this process


def fork_workers(session, jobs: int, requested: int | None = None) -> int:
    """How many forked processes to run `jobs` independent jobs of `session` with (1: in this process).

    `requested` (default FEDMERGE_SEARCH_WORKERS, else torch's thread count) is cut to what helps:
    one job per process at least, a platform that forks, a model of at most FORK_MAX_BYTES (each
    child writes its candidates into a model-size copy), never inside a forked process, and never
    with the models on a GPU (CUDA does not survive a fork; one process keeps the GPU busy)."""
    import torch

    if session.device.type != "cpu":
        return 1
    if requested is None:
        env = os.environ.get("FEDMERGE_SEARCH_WORKERS", "").strip()
        requested = int(env) if env.isdigit() else torch.get_num_threads()
    if _IN_CHILD or requested < 2 or jobs < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return 1 if session.model_bytes() > FORK_MAX_BYTES else min(int(requested), jobs)


def _child_init() -> None:
    import torch

    global _IN_CHILD
    _IN_CHILD = True  # a search inside a forked search runs in its process: no forks of forks
    torch.set_num_threads(1)  # one thread per process (also keeps a forked OpenMP pool unused)


def _forked_call(fn, i: int, item):
    return i, fn(_FORKED, item)


HEARTBEAT_S = 0.25  # while forked children work, the parent calls `heartbeat` this often (a Cancel check)


def with_heartbeat(progress: Callable[[float, str], None] | None, first: str):
    """(report, heartbeat) for a forked map: `report` passes progress on and remembers it; `heartbeat`
    sends the last report (at first `first`, at 0) again, so a Cancel check inside `progress` runs while
    the children work (else it ran only when a job came back: a Cancel of compare-all waited ~30 s)."""
    if progress is None:
        return None, None
    last: list[Any] = [0.0, first]

    def report(frac: float, text: str) -> None:
        last[:] = [frac, text]
        progress(frac, text)
    return report, lambda: progress(*last)


def forked_map(n: int, fn: Callable[[Any, Any], Any], items: Sequence[Any], state: Any,
               locks: Sequence[Any] = (), heartbeat: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(index, fn(state, item)) for every item, in the order `n` forked one-thread processes finish them.

    `state` (the session, say) reaches the children through fork, not pickling; `fn` must be a
    module-level function and its results picklable. `locks` (outermost first) are every lock the
    children may take: a lock another thread held at the fork would stay locked forever in a child,
    so the forking thread holds them all while it forks and each child releases them. `heartbeat`
    is called every HEARTBEAT_S while waiting: what it raises (a Cancel) ends the map at once. The
    processes exit when this generator ends; if it ends early (an error, a Cancel, the caller
    stopped), the children still working are stopped, not waited for (a search takes tens of seconds)."""
    global _FORKED
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_child_init)
    finished = False
    try:
        with _FORK_LOCK:  # the children copy _FORKED when they are forked, at the first submit
            _FORKED = state
            try:
                for lock in locks:
                    lock.acquire()
                    _HELD.append(lock)
                futures = [pool.submit(_forked_call, fn, i, item) for i, item in enumerate(items)]
            finally:
                _FORKED = None
                _release_held()  # in the parent too: the children are forked by now
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=HEARTBEAT_S if heartbeat else None, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
            if pending and heartbeat:
                heartbeat()
        finished = True
    except BrokenProcessPool:
        raise MergeError("a search worker process died (out of memory?): "
                         "set FEDMERGE_SEARCH_WORKERS=1 to search in one process") from None
    finally:
        if not finished:
            _stop_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's processes now: they hold nothing but a forked copy and their current job."""
    stop = getattr(pool, "terminate_workers", None)  # Python 3.14
    if stop is not None:
        stop()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def session_map(session, fn: Callable[[Any, Any], Any], jobs: Sequence[Any],
                references: Sequence[tuple[str, int]] = (), workers: int | None = None,
                heartbeat: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(index, fn(session, job)) for every job: in forked one-thread processes where `fork_workers`
    says it helps, else one after the other in this process. The selected fine-tunes' reference
    scores (`references`: (split, n) pairs) are computed first, once, so every child inherits them.
    `heartbeat`: see `forked_map` (in this process the jobs' own progress callbacks do that)."""
    n = fork_workers(session, len(jobs), workers)
    if n < 2:
        yield from ((i, fn(session, job)) for i, job in enumerate(jobs))
        return
    for split, k in references:
        session.finetuned_accuracy(split, k)
    yield from forked_map(n, fn, jobs, session, session.fork_locks(), heartbeat)


def require_ray():
    """The ray module, or the one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MergeError("Ray is not installed: pip install -r requirements-ray.txt") from None
    return ray


def connect(address: str | bool | None) -> Any:
    """ray.init once: `True`/"local" starts a local Ray, anything else is a cluster address ("auto", "ray://…")."""
    ray = require_ray()
    if not ray.is_initialized():
        addr = None if address in (True, "local", "", None) else str(address)
        _check_reachable(addr)
        try:
            ray.init(address=addr, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MergeError(f"cannot reach the Ray cluster at {addr}: {str(exc).splitlines()[0]}") from None
    return ray


def _check_reachable(addr: str | None, timeout: float = 5.0) -> None:
    """A `host:port` (or `ray://host:port`) that does not answer is refused in seconds: ray.init would
    retry for minutes."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\s/\[\]]+?)\]?:(\d{1,5})", addr or "")
    if m is None:  # "auto", a local Ray, or a form Ray checks itself
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or "unreachable")
        raise MergeError(f"cannot reach the Ray cluster at {addr}: {reason.lower()}") from None


def _worker_class(ray):
    @ray.remote(num_cpus=1)
    class SearchWorker:
        def __init__(self, zoo: str, base_ref: str, specs: list[dict], allow_hub: bool):
            import torch

            from .session import ModelSpec, Session

            torch.set_num_threads(1)
            self.session = Session(zoo=zoo, allow_hub=allow_hub)
            self.session.set_models(base_ref, [ModelSpec(**s) for s in specs])

        def score(self, select, method, weights, lambdas, settings, n_val, ft_val, batched):
            from .search import score_grid

            self.session.selected = list(select)
            return score_grid(self.session, method, weights, select, lambdas, settings, n_val, ft_val, batched)

    return SearchWorker


def workers(session, address: str | bool) -> list:
    """The actors for this session's models (created on first use: one per CPU of the cluster)."""
    ray = connect(address)
    key = (str(address), session.base_ref, tuple((s.name, s.ref) for s in session.specs))
    if key not in _ACTORS:
        n = max(1, int(ray.cluster_resources().get("CPU", 1)))
        cls = _worker_class(ray)
        specs = [asdict(s) for s in session.specs]
        _ACTORS[key] = [cls.remote(str(session.zoo), session.base_ref, specs, session.allow_hub) for _ in range(n)]
    return _ACTORS[key]


def score_grid_on_ray(address, session, method: str, weights: Sequence[float], select: Sequence[int],
                      lambdas: Sequence[float], settings: Sequence[Mapping[str, Any]], n_val: int,
                      ft_val: Mapping[str, float], batched: bool, progress=None, total: int | None = None):
    """`search.score_grid`, its (setting, λ-slice) pieces spread round-robin over the workers."""
    ray = require_ray()
    pool = workers(session, address)
    lambdas = [float(x) for x in lambdas]
    parts = max(1, min(len(lambdas), -(-len(pool) // max(1, len(settings)))))  # λ slices per setting
    size = -(-len(lambdas) // parts)
    pieces = [(gi, c) for gi in range(len(settings)) for c in range(0, len(lambdas), size)]
    futures = [pool[j % len(pool)].score.remote(list(select), method, list(weights), lambdas[c:c + size],
                                                [dict(settings[gi])], n_val, dict(ft_val), batched)
               for j, (gi, c) in enumerate(pieces)]
    scores = [[None] * len(lambdas) for _ in settings]
    per_task = [[None] * len(lambdas) for _ in settings]
    skipped: dict[int, str] = {}
    done, pending = 0, dict(zip(futures, pieces))
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        gi, c = pending.pop(ready[0])
        try:
            (row,), (accs,), why = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            raise MergeError(f"a Ray worker failed: {str(exc).splitlines()[0]}") from None
        if why:
            skipped[gi] = why[0]
        scores[gi][c:c + len(row)] = row
        per_task[gi][c:c + len(accs)] = accs
        done += len(row)
        if progress:
            progress(done / (total or done), f"{method}: {done} candidates scored on Ray")
    return scores, per_task, [skipped[gi] for gi in sorted(skipped)]
