"""One user's live merging session, as plain Python (the Gradio app only lays out and wires).

A `Session` holds:

* the available models: a base and fine-tunes (the zoo's, plus ones the user added by Hub id,
  allowed local folder or LoRA adapter) and which of them are selected;
* a `TaskVectorStack` of ALL available fine-tunes, from the shared `merging.cache.CACHE`
  (read-only, shared between sessions); selecting a subset is just `select=` indices;
* its own `LiveModel`: a private copy of the base model object that merges are written into.

`Session.live(...)` merges with (method, weights, λ, hyperparameters), evaluates on a small
validation subset of the selected fine-tunes' tasks and generates the prompts table. The
per-task accuracies of the base and of each fine-tune are computed once (process-wide cache).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from merging.progress import Progress
from merging.cache import CACHE, BytesLRU, StackCache
from merging.checkpoints import Checkpoint
from merging.errors import MergeError
from merging.live import LiveModel
from merging.registry import AGGREGATORS
from merging.similarity import SimilarityReport, similarity_from_stacks

from . import limits as _limits
from .exports import EXPORTS, ExportStore
from .harness import evaluate, generate, normalized
from .tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ZOO = ROOT / "assets" / "zoo"
LIVE_SPLIT = "validation"
LIVE_N = int(os.environ.get("FEDMERGE_LIVE_N", "12"))  # per task, on every change: 12 keeps p50 < 300 ms
FREE_TEXT_TOKENS = 16


# ---------------------------------------------------------------------------- models

@dataclass
class ModelSpec:
    """One fine-tune (or LoRA adapter) the session can merge."""

    name: str
    ref: str
    task: str | None = None
    source: str = "zoo"  # "zoo" or "added"
    variant_of: str | None = None


def zoo_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_ZOO", str(DEFAULT_ZOO))).resolve()


def read_zoo(root: str | os.PathLike | None = None) -> tuple[str, list[ModelSpec]]:
    """(base folder, fine-tune specs) from a zoo's zoo.json."""
    root = Path(root) if root is not None else zoo_dir()
    index = root / "zoo.json"
    if not index.exists():
        raise MergeError(f"no model zoo at {root} (zoo.json missing); build it with `python -m evaluation build-zoo`")
    data = json.loads(index.read_text())
    base = str(root / data["base"]["folder"])
    specs = [ModelSpec(e["name"], str(root / e["folder"]), e.get("task"), "zoo", e.get("variant_of"))
             for e in data["finetunes"]]
    return base, specs


BIG_MODEL_PARAMS = 20_000_000


def default_threads(zoo: str | os.PathLike | None = None) -> int:
    """Torch threads for the app: FEDMERGE_THREADS if set; else 1 for small models (per-op overhead
    dominates, and concurrent requests each get a core), every core from BIG_MODEL_PARAMS parameters
    up (decoding a GPT-2-sized model is compute-bound: two cores nearly halve a live update)."""
    if os.environ.get("FEDMERGE_THREADS"):
        return max(1, int(os.environ["FEDMERGE_THREADS"]))
    try:
        base = Checkpoint(read_zoo(zoo)[0])
        n = sum(math.prod(base.shape(k)) for k in base.keys())
    except (MergeError, OSError, ValueError):
        return 1
    return (os.cpu_count() or 1) if n >= BIG_MODEL_PARAMS else 1


def allowed_roots(zoo: Path | None = None) -> list[Path]:
    """Local folders users may load from: the zoo plus FEDMERGE_ALLOWED_DIRS (os.pathsep-separated)."""
    roots = [zoo or zoo_dir()]
    extra = os.environ.get("FEDMERGE_ALLOWED_DIRS", "")
    roots += [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p.strip()]
    return roots


def prompt_answers(prompt: str) -> dict[str, str | None]:
    """Every task whose format `prompt` is written in, with its correct answer (None when the input
    does not solve, e.g. "add: x+y=" with non-numbers). Tasks that share a keyword both appear."""
    out: dict[str, str | None] = {}
    for task in TASKS.values():
        m = re.fullmatch(re.escape(task.keyword) + r": (.*)=", prompt.strip())
        if m:
            try:
                out[task.name] = task.solve(m.group(1))
            except Exception:
                out[task.name] = None
    return out


def expected_answer(prompt: str) -> tuple[str | None, list[str]]:
    """(what the table shows as expected, the answers that count as right) for a prompt.

    Tasks that share a keyword (the zoo's designed conflict: sort and sort_desc) each have their
    answer; both count as right and the cell names whose is which."""
    answers = {t: a for t, a in prompt_answers(prompt).items() if a is not None}
    distinct = list(dict.fromkeys(answers.values()))
    if len(distinct) <= 1:
        return (distinct[0] if distinct else None), distinct
    return " / ".join(f"{a} ({t})" for t, a in answers.items()), distinct


def default_prompts(tasks: Sequence[str], per_task: int = 1) -> list[str]:
    """Each task's demo prompts, each prompt once (tasks that share a keyword share prompts)."""
    out: list[str] = []
    for t in tasks:
        out += TASKS[t].demo_prompts[:per_task]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- results

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


def _entry_bytes(key: tuple, value: Any) -> int:
    """Rough bytes of one reference-cache entry (keys hold paths and user-typed prompts)."""
    return 200 + sum(len(str(k)) for k in key) + (len(value) if isinstance(value, str) else 32)


# Process-wide caches of reference results (base / single fine-tunes do not change with the
# sliders), bounded by bytes: their keys hold user-typed prompts.
_REF_LOCK = threading.Lock()
_REF_ACC = BytesLRU(_limits.current().ref_cache_bytes // 4, _entry_bytes)
_REF_OUT = BytesLRU(_limits.current().ref_cache_bytes, _entry_bytes)


class Session:
    """Per-user state: selection, its own LiveModel, the last merge settings."""

    def __init__(self, cache: StackCache = CACHE, zoo: str | os.PathLike | None = None, allow_hub: bool = True,
                 exports: ExportStore = EXPORTS):
        self.id = uuid.uuid4().hex
        self.cache = cache
        self.exports = exports
        self._jobs = 0
        self.zoo = Path(zoo).resolve() if zoo is not None else zoo_dir()
        self.allow_hub = allow_hub
        self.roots = allowed_roots(self.zoo)
        self.base_ref: str | None = None
        self.specs: list[ModelSpec] = []
        self.selected: list[int] = []
        self.stack = None
        self.live_model: LiveModel | None = None
        self.tokenizer = None
        self.lock = threading.RLock()
        self.settings: dict[str, Any] | None = None  # last applied merge
        self.closed = False

    def __deepcopy__(self, memo):  # Gradio may deep-copy state values: share the session instead
        return self

    # ------------------------------------------------------------------ loading
    def load_zoo(self, progress: Progress | None = None) -> "Session":
        base, specs = read_zoo(self.zoo)
        self.set_models(base, specs, progress=progress)
        self.selected = [i for i, s in enumerate(specs) if not s.variant_of]
        return self

    def set_models(self, base_ref: str, specs: Sequence[ModelSpec], selected: Sequence[int] | None = None,
                   progress: Progress | None = None) -> None:
        """Load (from the shared cache) the stack of `specs` over `base_ref`; on error nothing changes."""
        if not specs:
            raise MergeError("add at least one fine-tuned model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise MergeError(f"two models are named {next(n for n in names if names.count(n) > 1)!r}; rename one")

        def tick(fraction, name):
            if progress:
                progress(fraction, f"task vectors: {name}")

        opts = dict(allow_hub=self.allow_hub, allowed_roots=self.roots)
        stack = self.cache.get_stack(base_ref, [s.ref for s in specs], names, progress=tick, **opts)
        if progress:
            progress(1.0, "model")
        model, tokenizer = self.cache.own_model(base_ref, **opts)
        live = LiveModel(model, stack)  # MergeError when the model does not match the checkpoint
        with self.lock:
            self.base_ref, self.specs, self.stack, self.live_model, self.tokenizer = base_ref, list(specs), stack, live, tokenizer
            self.selected = list(range(len(specs))) if selected is None else [i for i in selected if i < len(specs)]
            self.settings = None

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
        idx = []
        for x in names_or_indices:
            if isinstance(x, int):
                idx.append(x)
            else:
                found = [i for i, s in enumerate(self.specs) if s.name == x]
                if not found:
                    raise MergeError(f"no model named {x!r} in this session")
                idx.append(found[0])
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
        with self.lock:
            self.live_model = None
            self.stack = None
            self.tokenizer = None
            self.settings = None
            self._sim = self._sim_key = None
            self.closed = True
        self.exports.release(self.id)
        release_memory()

    @contextmanager
    def job(self, what: str):
        """Hold one of this session's FEDMERGE_MAX_JOBS slots for a long job (search, study, export)."""
        cap = _limits.current().max_jobs
        with self.lock:
            if self._jobs >= cap:
                raise MergeError(f"{what}: this session already runs {self._jobs} long job(s), at most {cap} at a "
                                 "time; wait for it to finish")
            self._jobs += 1
        try:
            yield
        finally:
            with self.lock:
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
    def _need(self) -> LiveModel:
        if self.live_model is None:
            raise MergeError("no models loaded in this session (reload the page)")
        return self.live_model

    def apply(self, method: str, weights: Sequence[float], lam: float, hyper: Mapping[str, Any] | None = None,
              select: Sequence[int] | None = None) -> None:
        """Merge the selected fine-tunes (or `select`) into this session's model (in place; errors leave it as it was)."""
        live = self._need()
        select = list(self.selected if select is None else select)
        if not select:
            raise MergeError("select at least one fine-tuned model")
        hyper = clean_hyper(method, hyper or {}, len(select))
        with self.lock:
            live.apply(method, list(weights), lam, select=select, **hyper)
            self.settings = dict(method=method, weights=list(weights), lam=float(lam), hyper=dict(hyper),
                                 select=select)

    def _show(self, which: str | int) -> None:
        """Write the base ('base') or one fine-tune (its index among all models) into the model."""
        live = self._need()
        if which == "base":
            live.reset_to_base()
        else:
            live.apply("task_arithmetic", [1.0], 1.0, select=[int(which)])
        self.settings = None

    def _restore(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.apply(saved["method"], saved["weights"], saved["lam"], saved["hyper"], saved["select"])
        else:
            self.live_model.reset_to_base()

    def _ref_key(self, which: str | int) -> tuple:
        if which == "base":
            return (str(self.base_ref), "base")
        return (str(self.base_ref), self.specs[which].ref, self.specs[which].name)

    def reference_accuracy(self, which: str | int, split: str = LIVE_SPLIT, n: int = LIVE_N) -> dict[str, float]:
        """Per-task accuracy of the base or of one fine-tune on the selected tasks (cached)."""
        tasks = self.tasks
        out: dict[str, float] = {}
        with self.lock:
            missing = []
            for t in tasks:
                got = _REF_ACC.get((*self._ref_key(which), split, n, t))
                if got is not None:
                    out[t] = got
                else:
                    missing.append(t)
            if missing:
                saved = self.settings
                self._show(which)
                res = evaluate(self.live_model.model, self.tokenizer, missing, split=split, n=n)
                with _REF_LOCK:
                    for t in missing:
                        out[t] = res.accuracy[t]
                        _REF_ACC.put((*self._ref_key(which), split, n, t), out[t])
                self._restore(saved)
        return {t: out[t] for t in tasks}

    def finetuned_accuracy(self, split: str = LIVE_SPLIT, n: int = LIVE_N) -> dict[str, float]:
        """For each selected task: the best accuracy of a selected fine-tune trained on it."""
        best: dict[str, float] = {}
        for i in self.selected:
            t = self.specs[i].task
            if t in TASKS:
                acc = self.reference_accuracy(i, split, n).get(t, 0.0)
                best[t] = max(best.get(t, 0.0), acc)
        return best

    def reference_outputs(self, which: str | int, prompts: Sequence[str]) -> list[str]:
        with self.lock:
            keys = [(*self._ref_key(which), p) for p in prompts]
            got = {k: _REF_OUT.get(k) for k in keys}  # held here: an eviction cannot lose them
            missing = list(dict.fromkeys(p for p, k in zip(prompts, keys) if got[k] is None))
            if missing:
                saved = self.settings
                self._show(which)
                outs = generate(self.live_model.model, self.tokenizer, missing, _max_tokens(missing))
                with _REF_LOCK:
                    for p, o in zip(missing, outs):
                        got[(*self._ref_key(which), p)] = o
                        _REF_OUT.put((*self._ref_key(which), p), o)
                self._restore(saved)
            return [got[k] for k in keys]

    def prepare_references(self, prompts: Sequence[str] = (), progress: Progress | None = None) -> None:
        """Compute (once) what the live view compares against: base and fine-tune scores and outputs."""
        whos: list[str | int] = ["base", *self.selected]
        for j, who in enumerate(whos):
            if progress:
                progress(j / len(whos), f"scoring {'base' if who == 'base' else self.specs[who].name}")
            self.reference_accuracy(who)
            if prompts:
                self.reference_outputs(who, prompts)

    # ------------------------------------------------------------------ the live view
    def live(self, method: str, weights: Sequence[float], lam: float, hyper: Mapping[str, Any] | None = None,
             prompts: Sequence[str] = ()) -> LiveResult:
        """Merge, score on the live validation subset and fill the prompts table."""
        t0 = time.perf_counter()
        prompts = _limits.check_prompts("\n".join(prompts))
        method, weights, lam = self.check_request(method, weights, lam, hyper)
        self._need()
        prompts, notes = self.fit_prompts(prompts)
        with self.lock:
            base_acc = self.reference_accuracy("base")
            ft_acc = self.finetuned_accuracy()
            refs = {who: self.reference_outputs(who, prompts) for who in ["base", *self.selected]} if prompts else {}
            t1 = time.perf_counter()
            self.apply(method, weights, lam, hyper)
            t2 = time.perf_counter()
            tasks = self.tasks
            res = evaluate(self.live_model.model, self.tokenizer, tasks, split=LIVE_SPLIT, n=LIVE_N,
                           prompts=prompts, prompt_limits=_max_tokens(prompts))  # one decoding loop for both
            merged_out = res.generations
            t3 = time.perf_counter()
        merged_acc = dict(res.accuracy)
        headers = ["prompt", "expected", "base", *[self.specs[i].name for i in self.selected], "merged"]
        rows = []
        for j, p in enumerate(prompts):
            shown, right = expected_answer(p)
            outs = [refs["base"][j], *[refs[i][j] for i in self.selected], merged_out[j]]
            rows.append([p, shown or "", *[_mark(o, right if shown is not None else None) for o in outs]])
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
        model = self._need().model
        n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        if not n_pos:
            return list(prompts), []
        out, notes = [], []
        for j, (p, limit) in enumerate(zip(prompts, _max_tokens(prompts)), 1):
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
        stack = self.stack
        if stack is None:
            raise MergeError("no models loaded in this session")
        idx = list(self.selected)
        if not idx:
            raise MergeError("select at least one fine-tuned model")
        names = [self.specs[i].name for i in idx]
        training = [stack.training[i] for i in idx]
        add = with_merged and self.settings is not None and self.live_model is not None
        with self.lock:
            if add:
                targets = self.live_model.targets
                stacks = ((n, torch.cat([stack.deltas[n][idx], (targets[n].detach() - stack.base[n]).unsqueeze(0)]))
                          for n in stack.names)
                rep = similarity_from_stacks(stacks, names + ["merged"], training + [{}])
            else:
                rep = similarity_from_stacks(((n, stack.deltas[n][idx]) for n in stack.names), names, training)
        return rep

    def similarity_live(self) -> SimilarityReport:
        """Cheap variant for every slider move: the selection's report (cached) plus one "merged" row of
        whole-model cosines between the current merge's update θ − θ₀ and each task vector."""
        key = (id(self.stack), tuple(self.selected))
        if getattr(self, "_sim_key", None) != key:
            self._sim = self.similarity(with_merged=False)
            self._sim_key = key
        rep = self._sim
        if self.settings is None or self.live_model is None:
            return rep
        idx, k = list(self.selected), len(self.selected)
        norms = np.asarray(rep.norms, dtype=float)
        with self.lock:
            coef = self.live_model.linear_state()
            if coef is not None and not coef[[i for i in range(len(coef)) if i not in idx]].any():
                # θ − θ₀ = Σ cᵢτᵢ: its dot products follow from the task vectors' Gram matrix, no pass
                c = coef[idx].double().numpy()
                gram = np.nan_to_num(rep.cosine) * np.outer(norms, norms)
                dots, sq = gram @ c, float(max(c @ gram @ c, 0.0))
            else:
                dots, sq = self._merged_dots(idx)
        mnorm = np.sqrt(sq)
        with np.errstate(invalid="ignore", divide="ignore"):
            row = np.where((norms > 0) & (mnorm > 0), dots / (norms * mnorm), np.nan)
        cos = np.full((k + 1, k + 1), np.nan)
        cos[:k, :k] = rep.cosine
        cos[k, :k] = cos[:k, k] = row
        cos[k, k] = 1.0 if mnorm > 0 else np.nan
        conflict = np.full((k + 1, k + 1), np.nan)
        conflict[:k, :k] = rep.sign_conflict
        return SimilarityReport(names=rep.names + ["merged"], cosine=cos, sign_conflict=conflict,
                                norms=np.append(norms, mnorm), training=rep.training + [{}])

    def _merged_dots(self, idx: list[int]) -> tuple[np.ndarray, float]:
        """(τᵢ · (θ − θ₀) for the selected i, ‖θ − θ₀‖²) from the model's parameters: one pass."""
        dots = torch.zeros(len(self.stack), dtype=torch.float64)
        sq = 0.0
        for n in self.stack.names:
            m = (self.live_model.targets[n].detach() - self.stack.base[n]).reshape(-1)
            dots += (self.stack.deltas[n].reshape(len(self.stack), -1) @ m).double()  # all rows: no copy
            sq += float(torch.dot(m, m))
        return dots[idx].numpy(), sq

    # ------------------------------------------------------------------ take away
    def export_plan(self):
        """A merging.plan for the last applied merge (for merge_to_dir)."""
        from merging.plan import plan_from_objects

        if not self.settings:
            raise MergeError("nothing merged yet")
        s = self.settings
        sources = [self.stack.plan.sources[i] for i in s["select"]]
        plan = plan_from_objects(self.stack.plan.base, sources, s["method"], s["weights"], s["lam"], s["hyper"])
        plan.config = self.export_config()  # written as merge_config.yml: re-run it to reproduce the merge
        return plan

    def export_config(self):
        """The last applied merge as a mergekit-style MergeConfig."""
        from merging.config import parse_config

        if not self.settings:
            raise MergeError("nothing merged yet")
        s = self.settings
        agg = AGGREGATORS[s["method"]]
        per_model = {p.name for p in agg.params if p.per_model}
        models = []
        for k, i in enumerate(s["select"]):
            params: dict[str, Any] = {"weight": s["weights"][k]}
            for key in per_model:
                v = s["hyper"].get(key)
                if isinstance(v, (list, tuple)):
                    params[key] = v[k]
            models.append({"model": self.public_ref(self.specs[i].ref), "parameters": params})
        glob = {k: v for k, v in s["hyper"].items() if not isinstance(v, (list, tuple)) and v is not None}
        glob["lambda"] = s["lam"]
        return parse_config({"merge_method": s["method"], "base_model": self.public_ref(self.base_ref), "models": models,
                             "parameters": glob, "dtype": "float32"}, "app")

    def public_ref(self, ref: str | None) -> str:
        """A model reference as users may see it: relative to the working directory or the zoo."""
        return _limits.scrub_paths(str(ref), _limits.display_roots(self.zoo))

    def write_merged(self, out_dir: str | os.PathLike, progress=None, plan=None, card: str | None = None) -> Path:
        """The current merge as a model folder; `card` replaces the plan's model card (no server paths either way)."""
        from merging.card import model_card
        from merging.engine import merge_to_dir

        plan = plan or self.export_plan()
        card = _limits.scrub_paths(card or model_card(plan), _limits.display_roots(self.zoo))
        return merge_to_dir(plan, out_dir, overwrite=True, progress=progress, card=card)

    def export_bytes(self) -> int:
        """About what a zip export puts on disk at its peak (the folder and its zip)."""
        stack = self._need() and self.stack
        return 2 * sum(t.numel() * t.element_size() for t in stack.base.values()) + 2 ** 20

    def export_zip(self, progress=None, card: str | None = None) -> Path:
        """The current merge as a zip in this session's export folder (nothing is left if it fails);
        `card` replaces the plan's model card (the app's has the live scores)."""
        import shutil

        plan = self.export_plan()
        with self.job("export"), self.exports.export(self.id, self.export_bytes()) as folder:
            merged = self.write_merged(folder / "merged-model", progress, plan, card=card)
            archive = shutil.make_archive(str(folder / ".merged-model"), "zip", merged)
            shutil.rmtree(merged)
            return Path(archive).rename(folder / "merged-model.zip")

    def export_yaml(self) -> tuple[Path, str]:
        """The current merge as mergekit YAML, written to this session's export folder."""
        text = self.export_config().to_yaml()
        with self.exports.export(self.id, len(text)) as folder:
            path = folder / "merge.yml"
            path.write_text(text)
        return path, text


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


def _mark(output: str, answers: Sequence[str] | None) -> str:
    if answers is None:
        return output
    return ("✓ " if output.strip() in {a.strip() for a in answers} else "✗ ") + output


def _max_tokens(prompts: Sequence[str]) -> list[int]:
    """Each prompt's own generation limit: its task's, or FREE_TEXT_TOKENS for free text."""
    limits = []
    for p in prompts:
        tasks = prompt_answers(p)
        limits.append(max(TASKS[t].max_new_tokens for t in tasks) if tasks else FREE_TEXT_TOKENS)
    return limits


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
