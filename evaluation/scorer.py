"""Reference scores: what the live view compares a merge against (the base and each fine-tune on
their own), computed on a scratch copy of the model, never on the user's merged one, and cached
process-wide under a byte budget (the keys hold user-typed prompts).

`ScratchModel` is that scratch copy; searches, the heterogeneity study and the landscape write
their candidates into one of their own.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from merging.cache import BytesLRU
from merging.errors import MergeError
from merging.live import LiveModel
from merging.progress import Progress

from . import limits as _limits
from .harness import evaluate, generate
from .pool import ModelPool
from .prompts import max_new_tokens
from .tasks import TASKS

LIVE_SPLIT = "validation"
LIVE_N = int(os.environ.get("FEDMERGE_LIVE_N", "12"))  # per task, on every change: 12 keeps p50 < 300 ms


class ScratchModel:
    """A private copy of the pool's base model for candidates: merges through a `LiveModel` of its
    own (incremental like the user's), or tensors written directly (θ₀ + λ·U of a search)."""

    def __init__(self, pool: ModelPool):
        self.stack = pool.stack
        self.tokenizer = pool.tokenizer
        self.live = LiveModel(pool.own_model(), pool.stack)
        self.model = self.live.model
        self._written = False  # tensors were written around the LiveModel: its incremental state is stale

    @property
    def targets(self) -> dict[str, torch.nn.Parameter]:
        return self.live.targets

    def apply(self, method: str, weights: Sequence[float], lam: float = 1.0, select: Sequence[int] | None = None,
              **hyper: Any) -> None:
        if self._written:
            self.live.reset_to_base()
            self._written = False
        self.live.apply(method, list(weights), lam, select=select, **hyper)

    def show(self, which: str | int) -> None:
        """The base ('base') or one fine-tune alone (its index in the pool)."""
        if which == "base":
            self.live.reset_to_base()
            self._written = False
        else:
            self.apply("task_arithmetic", [1.0], 1.0, select=[int(which)])

    @torch.no_grad()
    def write(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Whole tensors by name (e.g. `TaskVectorStack.merged_tensor` of different requests per layer)."""
        self._written = True
        for name, t in tensors:
            self.targets[name].data.copy_(t)

    @torch.no_grad()
    def update(self, method: str, weights: Sequence[float], select: Sequence[int],
               hyper: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The merge's update U (every aggregator merges to θ₀ + λ·U: this is U, from λ = 1)."""
        out = {name: merged - self.stack.base[name]
               for name, merged in self.stack.merged(method, weights, 1.0, select, **hyper)}
        for name, u in out.items():
            if not bool(torch.isfinite(u).all()):
                raise MergeError(f"the merge produced non-finite values in {name}")
        return out

    @torch.no_grad()
    def write_update(self, update: Mapping[str, torch.Tensor], lam: float) -> None:
        """θ₀ + λ·U into the parameters."""
        self._written = True
        for name, u in update.items():
            torch.add(self.stack.base[name], u, alpha=lam, out=self.targets[name].data)


def _entry_bytes(key: tuple, value: Any) -> int:
    """Rough bytes of one reference-cache entry (keys hold paths and user-typed prompts)."""
    return 200 + sum(len(str(k)) for k in key) + (len(value) if isinstance(value, str) else 32)


# Process-wide: the base and single fine-tunes do not change with the sliders, nor between users.
REF_ACCURACY = BytesLRU(_limits.current().ref_cache_bytes // 4, _entry_bytes)
REF_OUTPUTS = BytesLRU(_limits.current().ref_cache_bytes, _entry_bytes)


class Scorer:
    """The base's and each fine-tune's accuracy and answers, for one pool."""

    def __init__(self, pool: ModelPool, accuracies: BytesLRU = REF_ACCURACY, outputs: BytesLRU = REF_OUTPUTS):
        self.pool = pool
        self.accuracies, self.outputs_cache = accuracies, outputs
        self._lock = threading.RLock()
        self._scratch: ScratchModel | None = None
        self._depth = 0

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Share one scratch model between the references computed inside: made when the first one
        misses the cache, dropped after the outermost batch (references are computed rarely: no
        second model is kept per session between them)."""
        with self._lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._scratch = None

    @contextmanager
    def _showing(self, which: str | int) -> Iterator[ScratchModel]:
        with self.batch():
            if self._scratch is None:
                self._scratch = ScratchModel(self.pool)
            self._scratch.show(which)
            yield self._scratch

    def _key(self, which: str | int) -> tuple:
        where = str(self.pool.stack.device)  # a GPU's rounding may flip an argmax: its scores are its own
        if which == "base":
            return (where, str(self.pool.base_ref), "base")
        spec = self.pool.specs[int(which)]
        return (where, str(self.pool.base_ref), spec.ref, spec.name)

    def accuracy(self, which: str | int, tasks: Sequence[str], split: str = LIVE_SPLIT, n: int = LIVE_N
                 ) -> dict[str, float]:
        """Per-task accuracy of the base ('base') or of one fine-tune (pool index) on `tasks`."""
        keys = {t: (*self._key(which), split, n, t) for t in tasks}
        out = {t: self.accuracies.get(k) for t, k in keys.items()}
        missing = [t for t in tasks if out[t] is None]
        if missing:
            with self._showing(which) as scratch:
                res = evaluate(scratch.model, scratch.tokenizer, missing, split=split, n=n)
            for t in missing:
                out[t] = res.accuracy[t]
                self.accuracies.put(keys[t], out[t])
        return {t: out[t] for t in tasks}

    def finetuned(self, selected: Sequence[int], tasks: Sequence[str], split: str = LIVE_SPLIT, n: int = LIVE_N
                  ) -> dict[str, float]:
        """For each task: the best accuracy of a selected fine-tune trained on it."""
        best: dict[str, float] = {}
        for i in selected:
            t = self.pool.specs[i].task
            if t in TASKS:
                acc = self.accuracy(i, tasks, split, n).get(t, 0.0)
                best[t] = max(best.get(t, 0.0), acc)
        return best

    def outputs(self, which: str | int, prompts: Sequence[str]) -> list[str]:
        """The base's or one fine-tune's answers to `prompts` (greedy, each prompt's own limit)."""
        keys = [(*self._key(which), p) for p in prompts]
        got = {k: self.outputs_cache.get(k) for k in keys}  # held here: an eviction cannot lose them
        missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if got[k] is None))
        if missing:
            with self._showing(which) as scratch:
                outs = generate(scratch.model, scratch.tokenizer, missing, max_new_tokens(missing))
            for p, o in zip(missing, outs):
                key = (*self._key(which), p)
                got[key] = o
                self.outputs_cache.put(key, o)
        return [got[k] for k in keys]

    def prepare(self, whos: Sequence[str | int], tasks: Sequence[str], prompts: Sequence[str] = (),
                progress: Progress | None = None) -> None:
        """Compute (once) the scores and answers of `whos` (one scratch model for all of them)."""
        with self.batch():
            for j, who in enumerate(whos):
                if progress:
                    progress(j / len(whos), f"scoring {self.pool.name(who)}")
                self.accuracy(who, tasks)
                if prompts:
                    self.outputs(who, prompts)
