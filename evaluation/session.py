"""One user's live merging session, as plain Python (the Gradio app only lays out and wires).

A `Session` composes three parts and the user's selection:

* `pool`: the available models, loaded and validated: a base and fine-tunes (the zoo's, plus ones
  the user added by Hub id, allowed local folder or LoRA adapter) and their task-vector stack,
  shared read-only between sessions (`evaluation.pool.ModelPool`);
* `merge`: the user's own merged model and the settings it holds (`evaluation.live_merge.LiveMerge`);
* `scorer`: the base's and each fine-tune's scores, on a scratch model (`evaluation.scorer.Scorer`).

`Session.live(...)` merges with (method, weights, λ, hyperparameters), evaluates on a small
validation subset of the selected fine-tunes' tasks and fills the prompts table.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from merging.cache import CACHE, StackCache
from merging.errors import MergeError
from merging.live import LiveModel
from merging.progress import Progress
from merging.registry import AGGREGATORS
from merging.similarity import SimilarityReport

from . import limits as _limits
from .exports import EXPORTS, ExportStore
from .harness import evaluate, normalized
from .live_merge import LiveMerge, MergeSettings
from .pool import ModelPool, ModelSpec, allowed_roots, default_threads, read_zoo, zoo_dir
from .prompts import default_prompts, expected_answer, mark, max_new_tokens
from .scorer import LIVE_N, LIVE_SPLIT, Scorer
from .tasks import TASKS

# what app.py, bench/ and the other evaluation modules import from here
__all__ = ["LIVE_N", "LIVE_SPLIT", "SESSIONS", "LiveResult", "ModelSpec", "Session", "SessionLimit", "clean_hyper",
           "default_prompts", "default_threads", "push_to_hub", "read_zoo", "release_memory", "zoo_dir"]

CLOSED = "this session has ended; reload the page to start a new one"


@dataclass
class LiveResult:
    tasks: list[str]
    accuracy: dict[str, dict[str, float]]  # series ("base", "fine-tuned", "merged") -> task -> acc
    normalized: dict[str, float]  # merged / own fine-tune, per task and "mean"
    headers: list[str]
    rows: list[list[str]]  # prompt, expected, base, each fine-tune, merged
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. prompts cut to the model's context


class Session:
    """Per-user state: the selection and the three parts (None until models are loaded)."""

    _running_everywhere = 0  # serial long jobs running in this process, every session's (jobs_running)
    _running_lock = threading.Lock()

    def __init__(self, cache: StackCache = CACHE, zoo: str | os.PathLike | None = None, allow_hub: bool = True,
                 exports: ExportStore = EXPORTS):
        self.id = uuid.uuid4().hex
        self.cache = cache
        self.exports = exports
        self._jobs = 0  # long jobs running
        self._queued = 0  # long jobs asked for (reserve_job) that have not started yet
        self._dropped = 0  # of those, cancelled while they waited: their handlers still leave the queue, and do nothing
        self._slots = threading.Lock()  # the three counts above (never held during work, unlike self.lock)
        self.zoo = Path(zoo).resolve() if zoo is not None else zoo_dir()
        self.allow_hub = allow_hub
        self.roots = allowed_roots(self.zoo)
        self.pool: ModelPool | None = None
        self.merge: LiveMerge | None = None
        self.scorer: Scorer | None = None
        self.selected: list[int] = []
        self.lock = threading.RLock()
        self.closed = False
        self.closed_why = CLOSED  # the one line a request on this session reads once it is closed
        self._users = 0  # requests working on this session now (use())
        self.last_used = time.monotonic()

    def __deepcopy__(self, memo):  # Gradio may deep-copy state values: share the session instead
        return self

    # ------------------------------------------------------------------ the parts' contents
    def loaded(self) -> ModelPool:
        """The pool, or the message a user sees when there is none."""
        if self.pool is None or self.merge is None:
            raise MergeError("no models loaded in this session (reload the page)")
        return self.pool

    @property
    def base_ref(self) -> str | None:
        return self.pool.base_ref if self.pool else None

    @property
    def specs(self) -> list[ModelSpec]:
        return self.pool.specs if self.pool else []

    @property
    def stack(self):
        return self.pool.stack if self.pool else None

    @property
    def tokenizer(self):
        return self.pool.tokenizer if self.pool else None

    @property
    def live_model(self) -> LiveModel | None:
        """The user's merged model (merging's LiveModel)."""
        return self.merge.live if self.merge else None

    @property
    def settings(self) -> MergeSettings | None:
        """The merge the user's model holds (None: the base, or nothing loaded)."""
        return self.merge.settings if self.merge else None

    # ------------------------------------------------------------------ loading
    def load_zoo(self, progress: Progress | None = None) -> "Session":
        base, specs = read_zoo(self.zoo)
        self.set_models(base, specs, progress=progress)
        self.selected = [i for i, s in enumerate(specs) if not s.variant_of]
        return self

    def set_models(self, base_ref: str, specs: Sequence[ModelSpec], selected: Sequence[int] | None = None,
                   progress: Progress | None = None) -> None:
        """Load (from the shared cache) the stack of `specs` over `base_ref`; on error nothing changes."""
        pool = ModelPool.load(self.cache, base_ref, specs, allow_hub=self.allow_hub, allowed_roots=self.roots,
                              progress=progress)
        merge = LiveMerge(pool, self.lock)  # MergeError when the model does not match the checkpoint
        with self.lock:
            self.pool, self.merge, self.scorer = pool, merge, Scorer(pool)
            self.selected = list(range(len(specs))) if selected is None else [i for i in selected if i < len(specs)]

    def add_model(self, ref: str, name: str | None = None, task: str | None = None,
                  progress: Progress | None = None) -> ModelSpec:
        """Add a fine-tune or LoRA adapter (Hub id or allowed local folder) and select it."""
        ref = _limits.check_text("model", ref)
        name = _limits.check_text("name", name, 64) or None
        if not ref:
            raise MergeError("model: enter a Hub id or a local folder")
        if task is not None and task not in TASKS:
            raise MergeError(f"task: {str(task)[:40]!r} is not one of {', '.join(TASKS)}")
        cap = _limits.current().max_models
        if len(self.specs) >= cap:
            raise MergeError(f"model: this session already has {len(self.specs)} models, at most {cap}; "
                             "reload the page to start over")
        name = name or Path(ref).name or ref
        taken = {s.name for s in self.specs}
        base_name, k = name, 2
        while name in taken:
            name, k = f"{base_name}-{k}", k + 1
        spec = ModelSpec(name, ref, task, "added")
        # the allow-list is checked (lexically, then on disk) before anything of `ref` is read
        self.set_models(self.base_ref, self.specs + [spec], self.selected + [len(self.specs)], progress)
        if task is None:  # the task recorded in its training metadata, read with the model
            recorded = self.stack.training[-1].get("task")
            spec.task = recorded if recorded in TASKS else None
        return spec

    def set_base(self, ref: str, progress: Progress | None = None) -> None:
        """Switch the base model (keeps the fine-tunes; they must fit the new base)."""
        ref = _limits.check_text("base model", ref)
        if not ref:
            raise MergeError("base model: enter a Hub id or a local folder")
        self.set_models(ref, self.specs, self.selected, progress)

    def select(self, names_or_indices: Sequence[str | int]) -> None:
        idx = [x if isinstance(x, int) else self.loaded().index(x) for x in names_or_indices]
        self.selected = sorted(set(idx))

    @property
    def selected_specs(self) -> list[ModelSpec]:
        return [self.specs[i] for i in self.selected]

    @property
    def tasks(self) -> list[str]:
        """Tasks of the selected fine-tunes, registry order, each once."""
        have = {s.task for s in self.selected_specs}
        return [t for t in TASKS if t in have]

    def training(self) -> list[dict[str, Any]]:
        return [self.stack.training[i] for i in self.selected]

    def close(self) -> None:
        """Free this session's own model and its exports (the shared stack stays in the cache)."""
        with self._slots:  # no request or job starts on it from now on (use(), reserve_job(), job())
            self.closed = True
        with self.lock:
            self.pool = self.merge = self.scorer = None
        self.exports.release(self.id)
        release_memory()

    def reserve_job(self, what: str) -> int:
        """A long job was asked for; it may wait in the server's queue behind other sessions' jobs. Its slot
        is taken now, so that a second request of this session is refused at once, not run after the first.
        Returns how many other sessions' searches run now."""
        cap = _limits.current().max_jobs
        with self._slots:
            self._check_open()
            if self._jobs + self._queued >= cap:
                raise MergeError(f"{what}: this session already has a long job running or waiting (at most {cap} at "
                                 "a time); wait for it to finish or press Cancel")
            self._queued += 1
            return self.jobs_running() - self._jobs

    def leave_queue(self) -> bool:
        """The job asked for with reserve_job is out of the queue: True, it runs now (job()); False, it was
        cancelled while it waited (cancel_queued gave its slot back then) and must not run."""
        with self._slots:
            if self._dropped:  # requests leave the queue in the order they joined it: the cancelled ones first
                self._dropped -= 1
                return False
            self._queued = max(0, self._queued - 1)
            return True

    def cancel_queued(self) -> tuple[int, int]:
        """Cancel pressed: the jobs still waiting in the server's queue give their slots back now (a new request
        of this session is accepted at once, not after other visitors' jobs end); when the queue reaches them,
        leave_queue says they were cancelled. Returns (how many were dropped, how many run now)."""
        with self._slots:
            n, self._queued = self._queued, 0
            self._dropped += n
            return n, self._jobs

    @property
    def busy(self) -> bool:
        """A long job of this session runs or waits in the queue."""
        return self._jobs + self._queued > 0

    def _check_open(self) -> None:
        if self.closed:
            raise MergeError(self.closed_why)

    @contextmanager
    def use(self):
        """One request works on this session: refused (with why) once it is closed; while any runs, the session
        is not idle, and its end makes it the most recently used."""
        with self._slots:
            self._check_open()
            self._users += 1
            self.last_used = time.monotonic()
        try:
            yield self
        finally:
            with self._slots:
                self._users -= 1
                self.last_used = time.monotonic()

    def retire(self, why: str) -> bool:
        """Mark this session closed (`why`: what its next request reads) unless a request or a running long job is at
        work on it; True when it was idle and is now closed to new work (close() then frees its memory). A job only
        asked for (reserve_job) does not count: a client that reserves jobs it never runs would keep its sessions
        forever; the job, when its turn comes, reads `why`."""
        with self._slots:
            if self.closed or self._users or self._jobs:
                return False
            self.closed, self.closed_why = True, why
            return True

    @classmethod
    def jobs_running(cls) -> int:
        """Searches running now in this process (every session's), which a new one waits for."""
        return cls._running_everywhere

    @classmethod
    def _count_running(cls, n: int) -> None:
        with cls._running_lock:
            cls._running_everywhere += n

    @contextmanager
    def job(self, what: str, serial: bool = False):
        """Hold one of this session's FEDMERGE_MAX_JOBS slots for a long job (search, study, export);
        `serial`: one of the searches the server runs one at a time (counted by jobs_running)."""
        cap = _limits.current().max_jobs
        with self._slots:
            self._check_open()
            if self._jobs >= cap:
                raise MergeError(f"{what}: this session already runs {self._jobs} long job(s), at most {cap} at a "
                                 "time; wait for it to finish")
            self._jobs += 1
        self._count_running(int(serial))
        try:
            yield
        finally:
            self._count_running(-int(serial))
            with self._slots:
                self._jobs -= 1

    def check_request(self, method: Any, weights: Sequence[Any], lam: Any,
                      hyper: Mapping[str, Any] | None = None) -> tuple[str, list[float], float]:
        """Validate a merge request before any work: aggregator, one weight per selected model, λ,
        the hyperparameters (registry checks); returns (method, weights, λ) as numbers."""
        method = _limits.check_method(method)
        if not self.selected:
            raise MergeError("models: select at least one fine-tuned model")
        names = [self.specs[i].name for i in self.selected]
        values = list(weights)
        if len(values) < len(names):
            raise MergeError(f"weights: {len(values)} given for {len(names)} selected models")
        w = _limits.check_weights(names, values[:len(names)])
        lam = _limits.check_number("λ", lam, *_limits.LAMBDA_RANGE)
        _limits.check_hyper(method, clean_hyper(method, hyper or {}, len(names)), len(names))
        return method, w, lam

    # ------------------------------------------------------------------ merging
    def apply(self, method: str, weights: Sequence[float], lam: float, hyper: Mapping[str, Any] | None = None,
              select: Sequence[int] | None = None) -> None:
        """Merge the selected fine-tunes (or `select`) into this session's model (in place; errors leave it as it was)."""
        self.loaded()
        select = list(self.selected if select is None else select)
        if not select:
            raise MergeError("select at least one fine-tuned model")
        self.merge.apply(method, weights, lam, clean_hyper(method, hyper or {}, len(select)), select)

    def fork_locks(self) -> list:
        """Every lock a search on this session may take, outermost first (`distributed.forked_map`
        holds them while it forks, so no child inherits one locked by another thread)."""
        from merging import kernels

        from .scorer import REF_ACCURACY, REF_OUTPUTS

        pool = self.loaded()
        return [self.lock, self.scorer._lock, self.cache._lock, pool.stack._prepare_lock, REF_ACCURACY._lock,
                REF_OUTPUTS._lock, kernels._COMPILE_LOCK]

    @property
    def device(self):
        """Where this session's models are merged and decoded (the cache's: FEDMERGE_DEVICE, default auto)."""
        return self.cache.device

    def model_bytes(self) -> int:
        """Bytes of one copy of the base model (what each forked search process writes its candidates into)."""
        return sum(t.numel() * t.element_size() for t in self.loaded().stack.base.values())

    def finetuned_accuracy(self, split: str = LIVE_SPLIT, n: int = LIVE_N) -> dict[str, float]:
        """For each selected task: the best accuracy of a selected fine-tune trained on it."""
        self.loaded()
        return self.scorer.finetuned(self.selected, self.tasks, split, n)

    def prepare_references(self, prompts: Sequence[str] = (), progress: Progress | None = None) -> None:
        """Compute (once) what the live view compares against: base and fine-tune scores and outputs."""
        self.loaded()
        self.scorer.prepare(["base", *self.selected], self.tasks, prompts, progress)

    # ------------------------------------------------------------------ the live view
    def live(self, method: str, weights: Sequence[float], lam: float, hyper: Mapping[str, Any] | None = None,
             prompts: Sequence[str] = ()) -> LiveResult:
        """Merge, score on the live validation subset and fill the prompts table."""
        t0 = time.perf_counter()
        prompts = _limits.check_prompts("\n".join(prompts))
        method, weights, lam = self.check_request(method, weights, lam, hyper)
        self.loaded()
        prompts, notes = self.fit_prompts(prompts)
        with self.lock:
            scorer, tasks, selected = self.scorer, self.tasks, list(self.selected)
            with scorer.batch():
                base_acc = scorer.accuracy("base", tasks)
                ft_acc = scorer.finetuned(selected, tasks)
                refs = {who: scorer.outputs(who, prompts) for who in ["base", *selected]} if prompts else {}
            t1 = time.perf_counter()
            self.apply(method, weights, lam, hyper)
            t2 = time.perf_counter()
            res = evaluate(self.merge.model, self.tokenizer, tasks, split=LIVE_SPLIT, n=LIVE_N,
                           prompts=prompts, prompt_limits=max_new_tokens(prompts))  # one decoding loop for both
            merged_out = res.generations
            t3 = time.perf_counter()
        merged_acc = dict(res.accuracy)
        headers = ["prompt", "expected", "base", *[self.specs[i].name for i in selected], "merged"]
        rows = []
        for j, p in enumerate(prompts):
            shown, right = expected_answer(p)
            outs = [refs["base"][j], *[refs[i][j] for i in selected], merged_out[j]]
            rows.append([p, shown or "", *[mark(o, right if shown is not None else None) for o in outs]])
        return LiveResult(
            tasks=tasks,
            accuracy={"base": base_acc, "fine-tuned (own task)": ft_acc, "merged": merged_acc},
            normalized=normalized(merged_acc, ft_acc),
            headers=headers, rows=rows, seconds=time.perf_counter() - t0,
            timings={"references": t1 - t0, "merge": t2 - t1, "evaluate + generate": t3 - t2}, notes=notes,
        )

    def fit_prompts(self, prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        """Prompts cut to what the model's context holds with room for the answer (the start is cut:
        the end says what to continue), and one note per cut prompt."""
        self.loaded()
        config = self.merge.model.config
        n_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if not n_pos:
            return list(prompts), []
        out, notes = [], []
        for j, (p, limit) in enumerate(zip(prompts, max_new_tokens(prompts)), 1):
            room = n_pos - min(limit, max(1, n_pos // 4))
            if len(self.tokenizer(p)["input_ids"]) <= room:
                out.append(p)
                continue
            lo, hi = 0, len(p)  # the longest tail of p that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(self.tokenizer(p[-mid:])["input_ids"]) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            out.append(p[-lo:] if lo else "")
            notes.append(f"prompt {j} cut to its last {lo} characters: this model reads at most {n_pos} tokens")
        return out, notes

    # ------------------------------------------------------------------ heterogeneity
    def similarity(self, with_merged: bool = True) -> SimilarityReport:
        """Cosine / sign conflicts / norms of the selected task vectors, plus the current merge's
        update θ − θ₀ as a last row ("merged") when a merge is applied."""
        self.loaded()
        return self.merge.similarity(self.selected, with_merged)

    def similarity_live(self) -> SimilarityReport:
        """The selection's report plus a "merged" row, cheap enough for every slider move."""
        self.loaded()
        return self.merge.similarity_live(self.selected)

    # ------------------------------------------------------------------ take away
    def export_plan(self):
        """A merging.plan for the last applied merge (for merge_to_dir)."""
        from merging.plan import plan_from_objects

        if not self.settings:
            raise MergeError("nothing merged yet")
        s = self.settings
        sources = [self.stack.plan.sources[i] for i in s.select]
        plan = plan_from_objects(self.stack.plan.base, sources, s.method, list(s.weights), s.lam, s.hyper)
        plan.config = self.export_config()  # written as merge_config.yml: re-run it to reproduce the merge
        return plan

    def export_config(self):
        """The last applied merge as a mergekit-style MergeConfig."""
        from merging.config import parse_config

        if not self.settings:
            raise MergeError("nothing merged yet")
        s = self.settings
        agg = AGGREGATORS[s.method]
        per_model = {p.name for p in agg.params if p.per_model}
        models = []
        for k, i in enumerate(s.select):
            params: dict[str, Any] = {"weight": s.weights[k]}
            for key in per_model:
                v = s.hyper.get(key)
                if isinstance(v, (list, tuple)):
                    params[key] = v[k]
            models.append({"model": self.public_ref(self.specs[i].ref), "parameters": params})
        glob = {k: v for k, v in s.hyper.items() if not isinstance(v, (list, tuple)) and v is not None}
        glob["lambda"] = s.lam
        return parse_config({"merge_method": s.method, "base_model": self.public_ref(self.base_ref), "models": models,
                             "parameters": glob, "dtype": "float32"}, "app")

    def public_ref(self, ref: str | None) -> str:
        """A model reference as users may see it: relative to the working directory or the zoo."""
        return _limits.scrub_paths(str(ref), _limits.display_roots(self.zoo))

    def write_merged(self, out_dir: str | os.PathLike, progress=None, plan=None, card: str | None = None) -> Path:
        """The current merge as a model folder (merged on the session's device, like the CLI's --device);
        `card` replaces the plan's model card (no server paths either way)."""
        from merging.card import model_card
        from merging.engine import merge_to_dir

        plan = plan or self.export_plan()
        card = _limits.scrub_paths(card or model_card(plan), _limits.display_roots(self.zoo))
        return merge_to_dir(plan, out_dir, overwrite=True, progress=progress, card=card, device=self.device)

    def export_bytes(self) -> int:
        """About what a zip export puts on disk at its peak (the folder and its zip)."""
        stack = self.loaded().stack
        return 2 * sum(t.numel() * t.element_size() for t in stack.base.values()) + 2 ** 20

    def export_zip(self, progress=None, card: str | None = None) -> Path:
        """The current merge as a zip in this session's export folder (nothing is left if it fails);
        `card` replaces the plan's model card (the app's has the live scores)."""
        import shutil

        plan = self.export_plan()
        with self.job("export"), self.exports.export(self.id, self.export_bytes(), kind="zip") as folder:
            merged = self.write_merged(folder / "merged-model", progress, plan, card=card)
            archive = shutil.make_archive(str(folder / ".merged-model"), "zip", merged)
            shutil.rmtree(merged)
            return Path(archive).rename(folder / "merged-model.zip")

    def export_yaml(self) -> tuple[Path, str]:
        """The current merge as mergekit YAML, written to this session's export folder."""
        text = self.export_config().to_yaml()
        with self.exports.export(self.id, len(text), kind="yaml") as folder:
            path = folder / "merge.yml"
            path.write_text(text)
        return path, text


class SessionLimit:
    """The app's open sessions, at most `Limits.max_sessions` (FEDMERGE_MAX_SESSIONS) at once: each holds a model of
    its own, and a script opening sessions without end would exhaust the server's memory. Room for a new one is made
    by closing the least recently used idle sessions (no request or running long job at work on them); when every
    session is at work, the new one is refused. A closed session's next request reads why (Session.use)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: list[Session] = []
        self._loading = 0  # places taken by new sessions whose models are still loading

    def sessions(self) -> list[Session]:
        """The open sessions, least recently used first."""
        with self._lock:
            return self._prune()

    def _prune(self) -> list[Session]:
        self._open = sorted((s for s in self._open if not s.closed), key=lambda s: s.last_used)
        return list(self._open)

    @contextmanager
    def place(self):
        """A place for one new session, made before its models load; yields `add(session)` to register it."""
        cap = _limits.current().max_sessions
        freed: list[Session] = []
        with self._lock:
            for s in self._prune():
                if len(self._open) - len(freed) + self._loading < cap:
                    break
                if s.retire(f"this session was closed to make room for other visitors (this server holds at most "
                            f"{cap}); reload the page to start a new one"):
                    freed.append(s)
            self._open = [s for s in self._open if s not in freed]
            at_work = len(self._open) + self._loading
            if at_work < cap:
                self._loading += 1
        for s in freed:  # their memory, outside the lock
            s.close()
        if at_work >= cap:
            raise MergeError(f"the server is full: every open session is at work (at most {cap} at once); "
                             "try again in a minute")
        added = False

        def add(session: Session) -> None:
            nonlocal added
            with self._lock:
                self._open.append(session)
                self._loading -= 0 if added else 1
                added = True
        try:
            yield add
        finally:
            if not added:  # its models failed to load: the place is free again
                with self._lock:
                    self._loading -= 1


SESSIONS = SessionLimit()  # the app's (one per process: the memory it bounds is the process's)


# ---------------------------------------------------------------------------- helpers

_TRIM = threading.Event()


def release_memory() -> None:
    """Hand freed heap pages back to the OS soon after a session's model is dropped (glibc keeps
    them in its per-thread arenas otherwise, and a server's RSS would only ever grow). One daemon
    thread does it, at most once a second, never on the caller's thread (Gradio's event loop)."""
    if not _TRIM.is_set():
        _TRIM.set()
        if not any(t.name == "fedmerge-trim" for t in threading.enumerate()):
            threading.Thread(target=_trim_loop, name="fedmerge-trim", daemon=True).start()


def _trim_loop() -> None:
    import ctypes
    import gc

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        trim = None
    while True:
        _TRIM.wait()
        time.sleep(1.0)  # sessions ending together: one pass
        _TRIM.clear()
        gc.collect()
        if trim is not None:
            trim(0)
        _empty_gpu_cache()


def _empty_gpu_cache() -> None:
    """Give a dropped session's GPU memory back to the device (torch keeps freed blocks cached)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def clean_hyper(method: str, hyper: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Keep only `method`'s hyperparameters; per-model lists cut/padded to the K selected models."""
    agg = AGGREGATORS[method]
    out: dict[str, Any] = {}
    for p in agg.params:
        if p.name not in hyper:
            continue
        v = hyper[p.name]
        if p.per_model and isinstance(v, (list, tuple)):
            v = list(v)[:k]
            if len(v) < k:
                raise MergeError(f"{p.name}: needs one value per selected model ({k})")
        out[p.name] = v
    return out


def push_to_hub(session: Session, repo_id: str, token: str, private: bool = True, progress=None) -> str:
    """Write the current merge and upload it; the token is only handed to huggingface_hub, never kept."""
    import tempfile

    repo_id = (repo_id or "").strip()
    if not repo_id or "/" not in repo_id:
        raise MergeError("give a Hub repository id as owner/name")
    if not (token or "").strip():
        raise MergeError("give a Hugging Face token with write access to push")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise MergeError("cannot reach the Hugging Face Hub: this app runs offline (HF_HUB_OFFLINE=1); "
                         "download the merged model instead")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="fedmerge-push-") as tmp:
        folder = session.write_merged(Path(tmp) / "merged")
        try:
            api = HfApi(token=token.strip())
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="FedMerge Playground merge")
        except Exception as exc:  # never echo the token: report the error type and first line only
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if token.strip() in text:
                text = text.replace(token.strip(), "***")
            if any(w in text.lower() for w in ("connect", "resolve", "offline", "timed out", "network")):
                raise MergeError("cannot reach the Hugging Face Hub from this machine") from None
            raise MergeError(f"push to the Hub failed: {type(exc).__name__}: {text[:200]}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
