"""Does heterogeneity predict merge failure? A pairwise study, measured on the current selection.

For every pair of selected fine-tunes (and each leave-one-out group when more than two are
selected) it tunes λ for each aggregator on validation, scores the group's tasks on test, and
puts the drop in normalized accuracy beside the group's heterogeneity measures: cosine similarity
of the task vectors (whole model and the lowest layer), sign-conflict rate, the ratio of their
norms, and the ratio of their training effort (steps × learning rate). Spearman rank correlations
with bootstrap confidence intervals say how well each measure predicts the drop, per aggregator.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import stats

from merging.errors import MergeError
from merging.plan import layer_of
from merging.progress import Progress
from merging.registry import AGGREGATORS
from merging.similarity import SimilarityReport

from .distributed import session_map, with_heartbeat
from .harness import evaluate, normalized
from .limits import check_method
from .live_merge import MergeSettings
from .scorer import LIVE_SPLIT, ScratchModel
from .search import search

MEASURES = {
    "cosine": "cosine similarity (whole model)",
    "min_layer_cosine": "lowest per-layer cosine",
    "sign_conflict": "sign-conflict rate",
    "norm_ratio": "norm ratio (larger ÷ smaller)",
    "effort_ratio": "steps × lr ratio (larger ÷ smaller)",
}
DEFAULT_METHODS = ("task_arithmetic", "fedgma", "median", "fednova")
STUDY_LAMBDAS = tuple(round(0.2 * i, 1) for i in range(1, 11))  # 0.2 … 2.0: a coarse λ grid per group


@dataclass
class GroupResult:
    members: list[str]
    kind: str  # "pair" or "leave-one-out"
    measures: dict[str, float]
    drop: dict[str, float]  # method -> 1 − mean normalized test accuracy of the group's tasks
    setting: dict[str, MergeSettings]  # method -> the merge chosen on validation (λ, hyperparameters)
    left_out: str | None = None  # leave-one-out groups: the model left out

    @property
    def label(self) -> str:
        return " + ".join(self.members) if self.left_out is None else f"all but {self.left_out}"


@dataclass
class Correlation:
    measure: str
    method: str
    rho: float
    low: float
    high: float
    n: int


@dataclass
class Study:
    groups: list[GroupResult]
    correlations: list[Correlation]
    layers: list[tuple[str, float, float]]  # layer, mean pairwise cosine, spread (min)
    ablation: dict[str, Any] = field(default_factory=dict)
    recommendation: str = ""
    seconds: float = 0.0

    @property
    def pairs(self) -> list[GroupResult]:
        return [g for g in self.groups if g.kind == "pair"]


# ------------------------------------------------------------------------- statistics

def group_measures(report: SimilarityReport, idx: Sequence[int]) -> dict[str, float]:
    """Heterogeneity of a group of task vectors: pairwise means over its members."""
    pairs = list(itertools.combinations(idx, 2))
    cos = [report.cosine[i, j] for i, j in pairs]
    conflict = [report.sign_conflict[i, j] for i, j in pairs]
    layer_min = [min(float(m[i, j]) for m in report.layer_cosine.values()) for i, j in pairs]
    norms = [float(report.norms[i]) for i in idx]
    effort = []
    for i in idx:
        meta = report.training[i] if report.training else {}
        effort.append(meta["steps"] * meta["learning_rate"] if "steps" in meta and "learning_rate" in meta else math.nan)
    ratio = lambda xs: max(xs) / min(xs) if min(xs) > 0 else math.inf  # noqa: E731
    return {"cosine": float(np.nanmean(cos)), "min_layer_cosine": float(np.nanmean(layer_min)),
            "sign_conflict": float(np.mean(conflict)), "norm_ratio": ratio(norms),
            "effort_ratio": ratio(effort) if not any(math.isnan(e) for e in effort) else math.nan}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation over the finite pairs (NaN when either side is constant or fewer than 3 points)."""
    x, y = _finite(x, y)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def bootstrap_ci(x: Sequence[float], y: Sequence[float], n: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's ρ over resampled points (scipy.stats.bootstrap).

    The percentiles are taken over the resamples where ρ is defined: a few points resample to a
    constant side now and then, and one such draw should not void the interval."""
    x, y = _finite(x, y)
    if len(x) < 3:
        return math.nan, math.nan
    with warnings.catch_warnings():  # its own interval is NaN then; ours is computed below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((x, y), _rank_correlation, paired=True, vectorized=True, n_resamples=n,
                              method="percentile", rng=np.random.default_rng(seed))
    rhos = res.bootstrap_distribution
    if not np.isfinite(rhos).any():
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.nanquantile(rhos, a)), float(np.nanquantile(rhos, 1 - a))


def _rank_correlation(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along `axis` (Pearson's r of the ranks: spearmanr takes no batch axis); NaN where a side is constant."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return stats.pearsonr(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis).statistic


def _finite(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def correlations(groups: Sequence[GroupResult], methods: Sequence[str]) -> list[Correlation]:
    out = []
    pairs = [g for g in groups if g.kind == "pair"]
    for method in methods:
        drops = [g.drop.get(method, math.nan) for g in pairs]
        for m in MEASURES:
            xs = [g.measures[m] for g in pairs]
            lo, hi = bootstrap_ci(xs, drops)
            n = int(sum(1 for a, b in zip(xs, drops) if math.isfinite(a) and math.isfinite(b)))
            out.append(Correlation(m, method, spearman(xs, drops), lo, hi, n))
    return out


# ------------------------------------------------------------------------- the study

def _score(session, select: list[int], method: str, n_val: int, n_test: int) -> tuple[float, MergeSettings]:
    session.select(select)
    r = search(session, method, lambdas=STUDY_LAMBDAS, grid=[{}], n_val=n_val, n_test=n_test)
    chosen = MergeSettings(method, (1.0,) * len(select), r.best_lambda, dict(r.best_hyper), tuple(select))
    return 1.0 - r.test_normalized.get("mean", math.nan), chosen


def score_group(session, job: tuple[list[int], Sequence[str], int, int]) -> tuple[dict, dict]:
    """Drop and chosen merge of every method on one group (the unit a forked process runs)."""
    select, methods, n_val, n_test = job
    drop, setting = {}, {}
    for m in methods:
        drop[m], setting[m] = _score(session, select, m, n_val, n_test)
    return drop, setting


def group_sizes(n: int, leave_one_out: bool = True) -> list[int]:
    """How many fine-tunes the study merges at once, of `n` selected: pairs, and all but one."""
    return [2, n - 1] if leave_one_out and n > 2 else [2]


def run(session, methods: Sequence[str] = DEFAULT_METHODS, n_val: int = 12, n_test: int = 30,
        progress: Progress | None = None, leave_one_out: bool = True, workers: int | None = None) -> Study:
    """Run the study on the session's current selection (restored afterwards).

    The groups are scored in `workers` forked one-thread processes (as `search.compare_all`'s methods:
    default FEDMERGE_SEARCH_WORKERS, else torch's thread count); the same results as one after the other."""
    t0 = time.perf_counter()
    selected = list(session.selected)
    if len(selected) < 2:
        raise MergeError("the heterogeneity study needs at least two selected fine-tunes")
    methods = [check_method(m) for m in methods]
    sizes = group_sizes(len(selected), leave_one_out)
    unfit = [m for m in methods if not all(AGGREGATORS[m].accepts(k) for k in sizes)]
    if unfit:  # it stopped at the first group it could not merge, the groups before it wasted
        raise MergeError(f"{', '.join(unfit)}: cannot merge {'2' if max(sizes) == 2 else f'2 to {max(sizes)}'} "
                         "models at once, as the study does (pairs and all but one): leave them out")
    report = session.stack.similarity(selected)
    names = report.names
    groups_idx = [("pair", list(p)) for p in itertools.combinations(range(len(selected)), 2)]
    if len(sizes) > 1:  # all but one
        groups_idx += [("leave-one-out", [j for j in range(len(selected)) if j != i]) for i in range(len(selected))]
    everyone = set(range(len(selected)))
    jobs = [([selected[i] for i in idx], list(methods), n_val, n_test) for _, idx in groups_idx]
    label = lambda g: f"{groups_idx[g][0]} {'+'.join(names[i] for i in groups_idx[g][1])}"  # noqa: E731
    scored: dict[int, tuple[dict, dict]] = {}
    progress, beat = with_heartbeat(progress, f"{len(jobs)} groups")
    try:
        for g, result in session_map(session, score_group, jobs, [(LIVE_SPLIT, n_val), ("test", n_test)], workers,
                                      beat):
            scored[g] = result
            if progress:
                progress(len(scored) / (len(jobs) + 1), f"{label(g)} ({len(scored)} of {len(jobs)} groups)")
        groups: list[GroupResult] = []
        for g, (kind, idx) in enumerate(groups_idx):
            drop, setting = scored[g]
            left = sorted(everyone - set(idx)) if kind == "leave-one-out" else []
            groups.append(GroupResult([names[i] for i in idx], kind, group_measures(report, idx), drop, setting,
                                      names[left[0]] if left else None))
        corr = correlations(groups, methods)
        layers = layer_conflicts(report)
        ablation = layer_ablation(session, selected, report, groups, n_val=n_val)
    finally:
        session.select(selected)
    study = Study(groups, corr, layers, ablation, seconds=time.perf_counter() - t0)
    study.recommendation = recommend(study, methods)
    if progress:
        progress(1.0, "done")
    return study


def layer_conflicts(report: SimilarityReport) -> list[tuple[str, float, float]]:
    """Layers ordered from most to least conflicting: mean and minimum pairwise cosine."""
    rows = []
    for layer, mat in report.layer_cosine.items():
        vals = [float(mat[i, j]) for i, j in report.pairs()]
        rows.append((layer, float(np.nanmean(vals)), float(np.nanmin(vals))))
    return sorted(rows, key=lambda r: r[1])


def layer_ablation(session, selected: list[int], report: SimilarityReport, groups: Sequence[GroupResult],
                   n_val: int = 20) -> dict[str, Any]:
    """Worst pair under Task Arithmetic: merge it, then take its most conflicting layer from one side only
    (on a scratch model: the user's own merge is not touched)."""
    pairs = _scored_pairs(groups)
    if not pairs:
        return {}
    worst = max(pairs, key=lambda g: g.drop["task_arithmetic"])
    ia, ib = (report.names.index(n) for n in worst.members)
    layer_cos = {l: float(m[ia, ib]) for l, m in report.layer_cosine.items() if l != "other"}
    if not layer_cos:
        return {}
    layer = min(layer_cos, key=layer_cos.get)
    lam = worst.setting["task_arithmetic"].lam
    sel = [selected[ia], selected[ib]]
    session.select(sel)
    ft = session.finetuned_accuracy(LIVE_SPLIT, n_val)
    scratch = ScratchModel(session.loaded())
    stack = scratch.stack
    both = stack.request("task_arithmetic", [1.0, 1.0], lam, sel)
    out = {"pair": worst.members, "layer": layer, "layer_cosine": layer_cos[layer], "lambda": lam}
    for label, keep in (("both", None), (f"{layer} from {worst.members[0]}", 0),
                        (f"{layer} from {worst.members[1]}", 1)):
        one = both if keep is None else stack.request("task_arithmetic", [1.0], lam, [sel[keep]])
        scratch.write((n, stack.merged_tensor(one if layer_of(n) == layer else both, n)[0]) for n in stack.names)
        res = evaluate(scratch.model, scratch.tokenizer, session.tasks, split=LIVE_SPLIT, n=n_val)
        out[label] = normalized(res.accuracy, ft).get("mean", math.nan)
    return out


def _scored_pairs(groups: Sequence[GroupResult]) -> list[GroupResult]:
    """The pairs with a Task Arithmetic drop to rank: a pair whose fine-tunes answer none of their test
    prompts has none (NaN), and a NaN first in `max` was taken for the worst pair."""
    return [g for g in groups if g.kind == "pair" and math.isfinite(g.drop.get("task_arithmetic", math.nan))]


def recommend(study: Study, methods: Sequence[str]) -> str:
    """A recommendation from the measurements: which aggregator recovers most on the worst pair."""
    pairs = _scored_pairs(study.groups)
    if not pairs or "task_arithmetic" not in methods:
        return ""
    worst = max(pairs, key=lambda g: g.drop["task_arithmetic"])
    best = min(methods, key=lambda m: worst.drop.get(m, math.inf))
    gain = (worst.drop["task_arithmetic"] - worst.drop[best]) * 100
    a, b = worst.members
    text = (f"{a} and {b} lose the most under Task Arithmetic ({worst.drop['task_arithmetic'] * 100:.0f} points "
            f"of normalized accuracy at {worst.setting['task_arithmetic'].describe()}); their task vectors have cosine "
            f"{worst.measures['cosine']:.2f} and conflict in sign in {worst.measures['sign_conflict'] * 100:.0f}% "
            f"of coordinates. ")
    if best != "task_arithmetic" and gain > 0.5:
        text += f"{best} at {worst.setting[best].describe()} recovers {gain:.0f} points on this pair."
    else:
        text += "No aggregator tried recovers more than Task Arithmetic on this pair."
    strong = [c for c in study.correlations if c.method == "task_arithmetic" and math.isfinite(c.rho)]
    if strong:
        c = max(strong, key=lambda c: abs(c.rho))
        text += (f" Across {c.n} pairs, the best single predictor of the Task Arithmetic drop is "
                 f"{MEASURES[c.measure]} (Spearman ρ = {c.rho:+.2f}, 95% CI [{c.low:+.2f}, {c.high:+.2f}])")
        # the strongest of five is not a finding when its interval holds no correlation at all
        text += "; its interval includes 0: not a reliable predictor on these pairs." if c.low <= 0 <= c.high else "."
    return text


# ------------------------------------------------------------------------- reports

def to_markdown(study: Study, methods: Sequence[str]) -> str:
    lines = ["| group | " + " | ".join(MEASURES) + " | " + " | ".join(f"drop: {m}" for m in methods) + " |",
             "|" + "---|" * (1 + len(MEASURES) + len(methods))]
    for g in study.groups:
        lines.append(f"| {g.label} | " + " | ".join(f"{g.measures[m]:.3g}" for m in MEASURES) + " | "
                     + " | ".join(_drop_cell(g.drop[m]) for m in methods) + " |")
    lines += ["", "Spearman ρ between each measure and the drop (pairs only), 95% bootstrap interval:", "",
              "| measure | " + " | ".join(methods) + " |", "|" + "---|" * (1 + len(methods))]
    for m in MEASURES:
        cells = []
        for meth in methods:
            c = next(c for c in study.correlations if c.measure == m and c.method == meth)
            cells.append("n/a" if math.isnan(c.rho) else f"{c.rho:+.2f} [{c.low:+.2f}, {c.high:+.2f}]")
        lines.append(f"| {MEASURES[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Most conflicting layers (mean pairwise cosine of the task vectors in that layer):", ""]
    lines += [f"- {l}: mean {mean:+.3f}, min {mn:+.3f}" for l, mean, mn in study.layers[:5]]
    if study.ablation:
        ab = study.ablation
        lines += ["", f"Layer ablation on {' + '.join(ab['pair'])} (Task Arithmetic, λ = {ab['lambda']:g}; mean "
                  f"normalized validation accuracy): " + ", ".join(
                      f"{k}: {v:.2f}" for k, v in ab.items() if k not in ("pair", "layer", "layer_cosine", "lambda"))]
    if study.recommendation:
        lines += ["", f"**Recommendation.** {study.recommendation}"]
    if any(not math.isfinite(g.drop[m]) for g in study.groups for m in methods):
        lines += ["", "n/a: groups whose fine-tunes answer none of their own test prompts have no accuracy to "
                  "normalize by; they are left out of the correlations and the recommendation."]
    lines += ["", f"Study time: {study.seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def _drop_cell(drop: float) -> str:
    return f"{drop:.2f}" if math.isfinite(drop) else "n/a"


def scatter_figures(study: Study, methods: Sequence[str]):
    """One scatter per measure: the drop of each pair against the measure, one trace per aggregator."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from merging.report import PALETTE

    fig = make_subplots(rows=1, cols=len(MEASURES), subplot_titles=[MEASURES[m] for m in MEASURES],
                        shared_yaxes=True)
    for k, meth in enumerate(methods):
        for c, m in enumerate(MEASURES, start=1):
            fig.add_trace(go.Scatter(
                x=[g.measures[m] for g in study.pairs], y=[g.drop[meth] for g in study.pairs], mode="markers",
                name=meth, legendgroup=meth, showlegend=c == 1, marker=dict(color=PALETTE[k % len(PALETTE)], size=9),
                text=[" + ".join(g.members) for g in study.pairs],
                hovertemplate="%{text}<br>%{x:.3g} → drop %{y:.2f}<extra>" + meth + "</extra>"), row=1, col=c)
    fig.update_yaxes(title_text="drop in normalized accuracy", row=1, col=1)
    fig.update_layout(height=380, template="plotly_white", margin=dict(l=60, r=20, t=60, b=40),
                      title=dict(text="Does heterogeneity predict the merge's drop?", x=0.02))
    return fig
