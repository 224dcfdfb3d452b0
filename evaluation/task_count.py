"""How many tasks does one merge hold? Normalized accuracy against the number of merged fine-tunes.

FedAvg degrades as clients multiply; so does a merge. For each group size k from 2 to the
selection's size this merges up to `per_size` groups of k selected fine-tunes (all of them where
there are that few, else a seeded sample: the same groups every run), tunes λ per aggregator on
validation exactly as the heterogeneity study does, and reports the groups' mean normalized test
accuracy. A curve that falls with k, on tasks that merge well in pairs, says the model runs out of
room for separate changes, not that two tasks conflict.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from merging.errors import MergeError
from merging.progress import Progress
from merging.registry import AGGREGATORS

from .distributed import session_map, with_heartbeat
from .heterogeneity import DEFAULT_METHODS, score_group
from .limits import check_method
from .live_merge import MergeSettings
from .scorer import LIVE_SPLIT

PER_SIZE = 6  # groups merged per size by default
MAX_PER_SIZE = 20


@dataclass
class SizePoint:
    k: int
    groups: list[list[str]]
    scores: dict[str, list[float]]  # method -> mean normalized test accuracy of each group
    settings: dict[str, list[MergeSettings]] = field(default_factory=dict)  # method -> the merge chosen per group

    def _finite(self, method: str) -> list[float]:
        """Scores that exist (a group whose fine-tunes score 0 has no normalized accuracy: NaN)."""
        return [x for x in self.scores[method] if math.isfinite(x)]

    def mean(self, method: str) -> float:
        xs = self._finite(method)
        return float(np.mean(xs)) if xs else math.nan

    def spread(self, method: str) -> tuple[float, float]:
        xs = self._finite(method)
        return (min(xs), max(xs)) if xs else (math.nan, math.nan)

    def weakest(self, method: str) -> list[str] | None:
        scored = [(x, g) for x, g in zip(self.scores[method], self.groups) if math.isfinite(x)]
        return min(scored, key=lambda xg: xg[0])[1] if scored else None


@dataclass
class TaskCountCurve:
    methods: list[str]
    points: list[SizePoint]
    seconds: float = 0.0


def groups_of_size(n: int, k: int, limit: int) -> list[tuple[int, ...]]:
    """Every k-subset of range(n) when there are at most `limit`, else `limit` of them drawn with a
    seed fixed by (n, k): deterministic, and spread over all members rather than the first ones."""
    every = list(itertools.combinations(range(n), k))
    if len(every) <= limit:
        return every
    return sorted(random.Random(f"task-count {n} {k}").sample(every, limit))


def run(session, methods: Sequence[str] = DEFAULT_METHODS, per_size: int = PER_SIZE, n_val: int = 12,
        n_test: int = 30, progress: Progress | None = None, workers: int | None = None,
        sizes: Sequence[int] | None = None) -> TaskCountCurve:
    """The curve on the session's current selection (restored afterwards), over every group size or
    only `sizes`; groups run in forked one-thread processes like the heterogeneity study's, with the
    same results."""
    t0 = time.perf_counter()
    if not 1 <= per_size <= MAX_PER_SIZE:
        raise MergeError(f"groups per size: between 1 and {MAX_PER_SIZE}, not {per_size}")
    selected = list(session.selected)
    if len(selected) < 2:
        raise MergeError("the task-count curve needs at least two selected fine-tunes")
    methods = [check_method(m) for m in methods]
    if not methods:
        raise MergeError("choose at least one aggregator")
    capped = [m for m in methods if (AGGREGATORS[m].max_models or len(selected)) < len(selected)]
    if capped:
        raise MergeError(f"{', '.join(capped)}: merge(s) a fixed number of models; the curve merges up to "
                         f"{len(selected)} at once: leave them out")
    sizes = sorted(set(sizes)) if sizes else list(range(2, len(selected) + 1))
    if not all(isinstance(k, int) and 2 <= k <= len(selected) for k in sizes):
        raise MergeError(f"group sizes: whole numbers from 2 to {len(selected)} (the selected fine-tunes)")
    names = [session.stack.source_names[i] for i in selected]
    plan = [(k, g) for k in sizes for g in groups_of_size(len(selected), k, per_size)]
    jobs = [([selected[i] for i in g], list(methods), n_val, n_test) for _, g in plan]
    scored: dict[int, tuple[dict, dict]] = {}
    progress, beat = with_heartbeat(progress, f"{len(jobs)} groups")
    try:
        for j, result in session_map(session, score_group, jobs, [(LIVE_SPLIT, n_val), ("test", n_test)], workers,
                                      beat):
            scored[j] = result
            if progress:
                k, g = plan[j]
                progress(len(scored) / len(jobs), f"{k} tasks: {' + '.join(names[i] for i in g)} "
                                                  f"({len(scored)} of {len(jobs)} groups)")
    finally:
        session.select(selected)
    points: dict[int, SizePoint] = {}
    for j, (k, g) in enumerate(plan):
        drop, setting = scored[j]
        p = points.setdefault(k, SizePoint(k, [], {m: [] for m in methods}, {m: [] for m in methods}))
        p.groups.append([names[i] for i in g])
        for m in methods:
            p.scores[m].append(1.0 - drop[m])
            p.settings[m].append(setting[m])
    return TaskCountCurve(list(methods), [points[k] for k in sorted(points)], time.perf_counter() - t0)


def to_markdown(curve: TaskCountCurve) -> str:
    """Mean (lowest–highest) normalized test accuracy per group size, and the weakest group of each size."""
    lines = ["| tasks merged | groups | " + " | ".join(curve.methods) + " | weakest group |",
             "|" + "---|" * (3 + len(curve.methods))]
    first = curve.methods[0]
    for p in curve.points:
        cells = []
        for m in curve.methods:
            lo, hi = p.spread(m)
            if math.isnan(p.mean(m)):
                cells.append("n/a")
            else:
                # word joiners keep "(0.70–1.00)" on one line in a narrow (phone) column
                cells.append(f"{p.mean(m):.2f}" + (f" ({lo:.2f}\u2060–\u2060{hi:.2f})" if len(p.groups) > 1 else ""))
        worst = p.weakest(first)
        weakest = " + ".join(worst) if worst else "n/a"
        lines.append(f"| {p.k} | {len(p.groups)} | " + " | ".join(cells) + f" | {weakest} |")
    lines += ["", "Mean normalized test accuracy of the merged groups (lowest–highest in parentheses); λ tuned "
              f"on validation per group and aggregator; the weakest group is {first}'s. Time: {curve.seconds:.0f} s."]
    if any(math.isnan(x) for p in curve.points for m in curve.methods for x in p.scores[m]):
        lines += ["", "n/a: groups whose fine-tunes answer none of their own test prompts have no accuracy to "
                  "normalize by; they are left out of the means."]
    return "\n".join(lines) + "\n"


def figure(curve: TaskCountCurve):
    """Mean normalized accuracy against the number of merged tasks, one line per aggregator, each
    group a faint point behind it."""
    import plotly.graph_objects as go

    from merging.report import PALETTE, legend_below, styled

    fig = go.Figure()
    for c, m in enumerate(curve.methods):
        color = PALETTE[c % len(PALETTE)]
        xs = [p.k for p in curve.points for _ in p.groups]
        fig.add_scatter(x=xs, y=[s for p in curve.points for s in p.scores[m]], mode="markers", legendgroup=m,
                        showlegend=False, marker=dict(color=color, size=6, opacity=0.35),
                        text=[" + ".join(g) for p in curve.points for g in p.groups],
                        hovertemplate="%{text}: %{y:.2f}<extra>" + m + "</extra>")
        fig.add_scatter(x=[p.k for p in curve.points], y=[p.mean(m) for p in curve.points], mode="lines+markers",
                        name=m, legendgroup=m, line=dict(color=color, width=3),
                        hovertemplate="%{x} tasks: mean %{y:.2f}<extra>" + m + "</extra>")
    fig.update_xaxes(title="tasks merged at once", dtick=1)
    fig.update_yaxes(title="normalized accuracy (test)", range=[0, 1.05])
    return legend_below(styled(fig, "How many tasks does one merge hold?"))
