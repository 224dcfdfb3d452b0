"""Coefficient search as in the paper: λ ∈ {0.05, 0.10, …, 2.00} × the method's hyperparameters,
chosen by the best average NORMALIZED accuracy on validation, reported on test.

It reuses the session's in-memory task vectors: for each hyperparameter setting the merged
update U is computed once (θ₀ + U at λ = 1, since every aggregator forms θ₀ + λ·U), and every λ
only rewrites θ₀ + λ·U into a scratch copy of the model (`evaluation.scorer.ScratchModel`: no
reload, no re-aggregation per λ).
The session's own model is not touched, so the live view stays usable during a search.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from merging.progress import Progress
from merging.errors import MergeError
from merging.registry import AGGREGATORS

from .distributed import fork_workers, forked_map, session_map, with_heartbeat
from .grouped import GroupedModel, group_size, supports
from .harness import evaluate, evaluate_grouped, normalized
from .live_merge import describe
from .scorer import LIVE_SPLIT, ScratchModel

LAMBDAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 41))  # 0.05 … 2.00
SEARCH_N = 20  # validation examples per task when tuning (the live view scores fewer)
QUICK_LAMBDAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))  # 0.1 … 2.0
# Aggregators whose update U averages the task vectors instead of summing them: at λ = 1 each task
# gets a 1/K share (FedNova's K̄/(K·Kᵢ) weights sum to 1; a median is one update's size). Their λ grid
# is stretched by K so that, like Task Arithmetic's, it reaches every task vector at full strength
# (on the zoo Task Arithmetic's best λ is near 1, beyond an unstretched grid's 2/K).
AVERAGING = frozenset({"fednova", "median"})


def method_lambdas(method: str, k: int, lambdas: Sequence[float]) -> list[float]:
    """The λ values searched for `method` on `k` models (see AVERAGING)."""
    return [round(l * k, 6) for l in lambdas] if method in AVERAGING else list(lambdas)


@dataclass
class SearchResult:
    method: str
    lambdas: list[float]
    grid: list[dict[str, Any]]  # hyperparameter settings tried (besides λ)
    tasks: list[str]
    scores: list[list[float]]  # [setting][λ] mean normalized validation accuracy
    curves: dict[str, list[float]]  # at the best setting: task -> validation accuracy per λ, plus "normalized mean"
    best_lambda: float
    best_hyper: dict[str, Any]
    best_score: float  # mean normalized validation accuracy
    val_accuracy: dict[str, float]
    test_accuracy: dict[str, float]
    test_normalized: dict[str, float]
    evaluations: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return describe(self.best_lambda, self.best_hyper)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def hyper_grid(method: str, norms: Sequence[float] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """The hyperparameter settings searched besides λ (the paper's grids where it gives them)."""
    names = {p.name for p in AGGREGATORS[method].params}
    if method in ("fedgma",):
        rhos = [0.1, 0.3, 0.5, 0.7, 0.9] if quick else [round(0.1 * i, 1) for i in range(1, 10)]
        return [{"rho": r} for r in rhos]
    if method == "cclip":
        norms = [float(n) for n in (norms or []) if n > 0 and np.isfinite(n)]  # ρ = 0 is no radius
        if not norms:
            return [{}]
        lo, hi = min(norms), max(norms)
        if hi <= lo:
            return [{"rho": hi}]
        steps = 4 if quick else 8
        return [{"rho": float(x)} for x in np.linspace(lo, hi, steps, endpoint=False)]  # [min‖u‖, max‖u‖)
    if "density" in names:
        dens = [0.2, 0.5, 0.8] if quick else [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
        return [{"density": d} for d in dens]
    if method == "slerp":
        return [{"t": t} for t in ([0.25, 0.5, 0.75] if quick else [0.1, 0.3, 0.5, 0.7, 0.9])]
    return [{}]


def search(session, method: str, weights: Sequence[float] | None = None, *, lambdas: Sequence[float] = LAMBDAS,
           grid: Sequence[Mapping[str, Any]] | None = None, fixed: Mapping[str, Any] | None = None,
           n_val: int | None = None, n_test: int = 100, quick: bool = False,
           progress: Progress | None = None, batched: bool | None = None, ray: str | bool | None = None,
           workers: int | None = None) -> SearchResult:
    """Tune λ and `method`'s hyperparameters for the session's selection.

    `weights` are the per-model coefficients (default 1); `fixed` hyperparameters are held
    (e.g. fednova's steps); `grid` overrides `hyper_grid(method)`. `batched` (default off; on with
    FEDMERGE_SEARCH_BATCH=1, where the model qualifies) scores a chunk of λ values per forward pass
    (`evaluation.grouped`): the same scores as one λ at a time, faster only on a contended CPU now
    that candidates are scored by teacher forcing (bench/RESULTS.md). `ray` (True for a local Ray,
    or a cluster address) spreads the grid over Ray workers (`evaluation.distributed`): same result.
    Otherwise a grid of several settings is scored in `workers` forked one-thread processes, a
    setting each (default FEDMERGE_SEARCH_WORKERS, else torch's thread count): same result.
    """
    if batched is None:
        batched = os.environ.get("FEDMERGE_SEARCH_BATCH", "0") == "1"
    lambdas = [float(x) for x in lambdas]
    t0 = time.perf_counter()
    n_val = n_val or SEARCH_N
    select = list(session.selected)
    k = len(select)
    if not k:
        raise MergeError("select at least one fine-tuned model")
    agg = AGGREGATORS[method]
    agg.check_model_count(k)
    lambdas = method_lambdas(method, k, lambdas)
    weights = [1.0] * k if weights is None else [float(w) for w in weights]
    if len(weights) != k or not all(np.isfinite(weights)):  # before any work, not after the first merge
        raise MergeError(f"weights: need {k} finite numbers, one per selected model")
    tasks = session.tasks
    if not tasks:
        raise MergeError("the selected models have no known task to score (add models with a task)")
    ft_val = session.finetuned_accuracy(LIVE_SPLIT, n_val)
    ft_test = session.finetuned_accuracy("test", n_test)
    norms = session.stack.update_norms(torch.tensor(weights), select).tolist()
    grid = list(grid) if grid is not None else hyper_grid(method, norms, quick=quick)
    fixed = dict(fixed or {})
    scratch = ScratchModel(session.loaded())
    total = len(grid) * len(lambdas) + 1
    settings = [{**fixed, **g} for g in grid]
    if ray:
        from .distributed import score_grid_on_ray

        scores, per_task, skipped = score_grid_on_ray(ray, session, method, weights, select, lambdas, settings,
                                                      n_val, ft_val, batched, progress=progress, total=total)
    elif (n := fork_workers(session, len(settings), workers)) > 1:
        scores, per_task, skipped = _score_settings_forked(n, session, method, weights, select, lambdas, settings,
                                                           n_val, ft_val, batched, progress, total)
    else:
        scores, per_task, skipped = score_grid(session, method, weights, select, lambdas, settings, n_val, ft_val,
                                               batched, progress=progress, total=total, scratch=scratch)
    done = len(grid) * len(lambdas)
    if len(skipped) == len(grid):
        raise MergeError(f"{method}: no setting could be merged ({skipped[0]})")
    arr = np.nan_to_num(np.array(scores, dtype=float), nan=-1.0)
    arr[[i for i, r in enumerate(scores) if all(np.isnan(r))]] = -2.0  # a skipped setting never wins
    gi, li = np.unravel_index(int(arr.argmax()), arr.shape)  # first best: smallest λ / first setting on ties
    best_hyper, best_lambda = {**fixed, **grid[gi]}, float(lambdas[li])
    scratch.write_update(scratch.update(method, weights, select, best_hyper), best_lambda)
    test = evaluate(scratch.model, session.tokenizer, tasks, split="test", n=n_test, scores_only=_scores_only())
    if progress:
        progress(1.0, f"{method}: best {best_lambda:g} {_desc(grid[gi])}")
    curves = {t: [a[t] for a in per_task[gi]] for t in tasks}
    curves["normalized mean"] = list(scores[gi])
    return SearchResult(
        method=method, lambdas=list(lambdas), grid=[dict(g) for g in grid], tasks=tasks, scores=scores,
        curves=curves, best_lambda=best_lambda, best_hyper=dict(grid[gi]), best_score=float(scores[gi][li]),
        val_accuracy=dict(per_task[gi][li]), test_accuracy=dict(test.accuracy),
        test_normalized=normalized(test.accuracy, ft_test), evaluations=done + 1,
        seconds=time.perf_counter() - t0, extra={"skipped": skipped} if skipped else {},
    )


def score_grid(session, method: str, weights: Sequence[float], select: Sequence[int], lambdas: Sequence[float],
               settings: Sequence[Mapping[str, Any]], n_val: int, ft_val: Mapping[str, float], batched: bool,
               progress: Progress | None = None, total: int | None = None, scratch: ScratchModel | None = None
               ) -> tuple[list[list[float]], list[list[dict[str, float]]], list[str]]:
    """Validation scores [setting][λ] (mean normalized accuracy), per-task accuracies of each candidate,
    and the settings the data does not allow (scored NaN, with the reason).

    The unit of work a Ray worker runs too (`evaluation.distributed`), so both give the same numbers.
    """
    tasks = session.tasks
    lambdas = [float(x) for x in lambdas]
    scratch = scratch or ScratchModel(session.loaded())
    total = total or len(settings) * len(lambdas)
    done = 0
    scores: list[list[float]] = []
    per_task: list[list[dict[str, float]]] = []
    groups = _group_size(scratch.model, len(lambdas)) if batched else 1
    pool = GroupedModel(scratch.model, groups) if groups > 1 else None
    skipped: list[str] = []
    fast = _scores_only()
    for hyper in settings:
        try:
            update = scratch.update(method, weights, select, dict(hyper))
        except MergeError as exc:  # one setting the data does not allow: report it, try the others
            skipped.append(f"{_desc(hyper) or method}: {exc}")
            scores.append([float("nan")] * len(lambdas))
            per_task.append([{t: float("nan") for t in tasks} for _ in lambdas])
            done += len(lambdas)
            continue
        row, accs = [], []
        for c in range(0, len(lambdas), groups):
            chunk = lambdas[c:c + groups]
            if pool is None:
                scratch.write_update(update, chunk[0])
                results = [evaluate(scratch.model, session.tokenizer, tasks, split=LIVE_SPLIT, n=n_val,
                                    scores_only=fast)]
            else:
                for i, lam in enumerate(chunk + [chunk[-1]] * (groups - len(chunk))):
                    pool.write(i, scratch.stack.base, update, lam)
                results = evaluate_grouped(pool, session.tokenizer, tasks, split=LIVE_SPLIT, n=n_val, scores_only=fast)
            for lam, res in zip(chunk, results):
                row.append(normalized(res.accuracy, ft_val).get("mean", float("nan")))
                accs.append(res.accuracy)
                done += 1
                if progress:
                    progress(done / total, f"{method} {_desc(hyper)} λ={lam:g}: {row[-1]:.2f}")
        scores.append(row)
        per_task.append(accs)
    return scores, per_task, skipped


def _score_settings_forked(n: int, session, method: str, weights: Sequence[float], select: Sequence[int],
                           lambdas: Sequence[float], settings: Sequence[Mapping[str, Any]], n_val: int,
                           ft_val: Mapping[str, float], batched: bool, progress: Progress | None, total: int
                           ) -> tuple[list[list[float]], list[list[dict[str, float]]], list[str]]:
    """score_grid with each setting in one of `n` forked processes: the same rows, in the settings' order."""
    jobs = [(method, weights, select, lambdas, [s], n_val, ft_val, batched) for s in settings]
    rows: dict[int, tuple] = {}
    progress, beat = with_heartbeat(progress, f"{method}: {len(settings)} settings")
    for i, r in forked_map(n, _score_one_setting, jobs, session, session.fork_locks(), beat):
        rows[i] = r
        if progress:
            progress(len(rows) * len(lambdas) / total,
                     f"{method} {_desc(settings[i])}: best {max(r[0][0], default=float('nan')):.2f} "
                     f"({len(rows)} of {len(settings)} settings)")
    out = [rows[i] for i in range(len(settings))]
    return ([r[0][0] for r in out], [r[1][0] for r in out], [why for r in out for why in r[2]])


def _score_one_setting(session, job: tuple) -> tuple:
    return score_grid(session, *job)


# What a search candidate's scoring costs against the full decode the live view times (README,
# Performance: scores-only scoring takes 0.45–0.51× the time of full decoding); for the app's estimates.
SCORES_ONLY_COST = 0.5


def eval_cost_ratio() -> float:
    """A search candidate's scoring time over the live view's full decode of the same prompts."""
    return SCORES_ONLY_COST if _scores_only() else 1.0


def _scores_only() -> bool:
    """Decode for scores only (harness.evaluate's `scores_only`: shared keyword prefill, wrong outputs
    stopped at their first wrong character); FEDMERGE_SEARCH_EARLY_STOP=0 decodes every output in full."""
    return os.environ.get("FEDMERGE_SEARCH_EARLY_STOP", "1") != "0"


def _group_size(model, n: int) -> int:
    """Candidates per grouped forward: the memory budget's count, spread evenly over the λ grid."""
    if n < 2 or not supports(model):
        return 1
    cap = group_size(model)
    chunks = -(-n // cap)
    return -(-n // chunks)


def _desc(g: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in g.items())


def sweep(session, method: str, weights: Sequence[float] | None = None, hyper: Mapping[str, Any] | None = None,
          lambdas: Sequence[float] = QUICK_LAMBDAS, progress: Progress | None = None, n_val: int | None = None,
          n_test: int = 50) -> SearchResult:
    """λ sweep at fixed hyperparameters (the current widgets): one curve per task and the mean."""
    return search(session, method, weights, lambdas=lambdas, grid=[dict(hyper or {})], n_val=n_val,
                  n_test=n_test, progress=progress)


def compare_all(session, methods: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                quick: bool = True, progress: Progress | None = None, n_val: int | None = None,
                n_test: int = 50, failed: list[tuple[str, str]] | None = None,
                workers: int | None = None) -> list[SearchResult]:
    """Tune every applicable aggregator (coarser grids when `quick`) and return their results.

    The methods' searches run in `workers` forked one-thread processes (default
    FEDMERGE_SEARCH_WORKERS, else torch's thread count; `evaluation.distributed.forked_map`): the
    same results as one after the other. A method that cannot run on this selection is skipped,
    with its reason appended to `failed`."""
    k = len(session.selected)
    methods = [m for m in (methods or list(AGGREGATORS)) if AGGREGATORS[m].accepts(k)]
    kw = dict(weights=weights, lambdas=QUICK_LAMBDAS if quick else LAMBDAS, quick=quick, n_val=n_val, n_test=n_test)
    n = fork_workers(session, len(methods), workers)
    if n > 1:
        # Longest grids first, so no process is left with a long search after the others are done.
        norms = session.stack.update_norms(torch.ones(k) if weights is None else torch.tensor(weights),
                                           list(session.selected)).tolist()
        order = sorted(range(len(methods)), key=lambda i: -len(hyper_grid(methods[i], norms, quick)))
        found: dict[int, SearchResult | str] = {}
        refs = [(LIVE_SPLIT, n_val or SEARCH_N), ("test", n_test)]
        progress, beat = with_heartbeat(progress, f"tuning {len(methods)} methods")
        for j, r in session_map(session, _search_or_reason, [(methods[i], kw) for i in order], refs, n, beat):
            found[order[j]] = r
            if progress:
                progress(len(found) / len(methods), f"{methods[order[j]]} tuned ({len(found)} of {len(methods)} methods)")
        outcomes = [found[i] for i in range(len(methods))]
    else:
        outcomes = []
        for j, m in enumerate(methods):
            def sub(frac, text, j=j):
                if progress:
                    progress((j + frac) / len(methods), text)
            outcomes.append(_search_or_reason(session, (m, {**kw, "progress": sub, "workers": workers})))
    out = [r for r in outcomes if isinstance(r, SearchResult)]
    if failed is not None:
        failed.extend((m, r) for m, r in zip(methods, outcomes) if isinstance(r, str))
    if not out:
        why = next(((m, r) for m, r in zip(methods, outcomes) if isinstance(r, str)), None)
        raise MergeError("no aggregator could be run on this selection" + (f" ({why[0]}: {why[1]})" if why else ""))
    return out


def _search_or_reason(session, job: tuple[str, dict]) -> SearchResult | str:
    """search() of one method, or the reason it cannot run on this selection."""
    method, kw = job
    try:
        return search(session, method, **kw)
    except MergeError as exc:
        return str(exc)


def comparison_table(results: Sequence[SearchResult]) -> tuple[list[str], list[list[Any]]]:
    headers = ["method", "family", "best setting", "val normalized", "test normalized", "test accuracy (mean)",
               "seconds"]
    rows = []
    for r in sorted(results, key=lambda r: -r.test_normalized.get("mean", 0.0)):
        acc = r.test_accuracy
        rows.append([r.method, AGGREGATORS[r.method].family, r.describe(), round(r.best_score, 3),
                     round(r.test_normalized.get("mean", float("nan")), 3),
                     round(sum(acc.values()) / max(1, len(acc)), 3), round(r.seconds, 1)])
    return headers, rows


def comparison_chart(results: Sequence[SearchResult]):
    """Bars: mean normalized accuracy of each tuned aggregator, validation and test."""
    from . import plots

    ordered = sorted(results, key=lambda r: -r.test_normalized.get("mean", 0.0))
    names = [r.method for r in ordered]
    fig = plots.accuracy_bars(names, {
        "validation (normalized, tuned on it)": {r.method: r.best_score for r in ordered},
        "test (normalized)": {r.method: r.test_normalized.get("mean", float("nan")) for r in ordered},
    })
    fig.update_layout(title=dict(text="Aggregators tuned on validation: mean normalized accuracy"))
    fig.update_yaxes(title="merged ÷ own fine-tune", range=None)
    return fig
