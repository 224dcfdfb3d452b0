"""Merge landscape: each task's accuracy over a grid of two fine-tunes' coefficients.

θ = θ₀ + a·τᵢ + b·τⱼ for a, b on a grid (default 0, 0.1, …, 1.0: 11×11 merges). Every cell is a
Task Arithmetic merge through a LiveModel on a scratch copy of the model (the user's own merge is
not touched), which updates only the coefficient that changed (one column of the grid costs one
full write, then one axpy per cell). Rendered as HTML heatmaps whose cells carry their (a, b):
clicking one sets the sliders (app.py wires the click).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from merging.errors import MergeError

from .harness import evaluate
from .scorer import LIVE_N, LIVE_SPLIT, ScratchModel

GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class Landscape:
    names: tuple[str, str]  # the two fine-tunes: rows follow the first's coefficient, columns the second's
    grid: list[float]
    tasks: list[str]
    accuracy: dict[str, np.ndarray]  # task -> [len(grid), len(grid)]; also "mean"
    current: tuple[float, float] | None  # the current merge as (a, b) = (λ·wᵢ, λ·wⱼ) when it is Task Arithmetic
    seconds: float

    def best(self) -> tuple[float, float, float]:
        m = self.accuracy["mean"]
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        return self.grid[i], self.grid[j], float(m[i, j])


def compute(playground, grid: Sequence[float] = GRID, n: int = LIVE_N,
            progress: Callable[[float, str], None] | None = None) -> Landscape:
    """The landscape of the playground's two selected fine-tunes (it needs exactly two)."""
    s = playground.session
    names = playground.selected
    if len(names) != 2:
        raise MergeError(f"the landscape needs exactly two selected fine-tunes ({len(names)} are selected)")
    t0 = time.perf_counter()
    grid = [float(g) for g in grid]
    tasks = s.tasks
    acc = {t: np.zeros((len(grid), len(grid))) for t in tasks}
    scratch = ScratchModel(s.loaded())  # the user's own merge stays as it is
    select = list(s.selected)
    total = len(grid) ** 2
    for i, a in enumerate(grid):
        for j, b in enumerate(grid):
            scratch.apply("task_arithmetic", [a, b], 1.0, select=select)
            res = evaluate(scratch.model, scratch.tokenizer, tasks, split=LIVE_SPLIT, n=n)
            for t in tasks:
                acc[t][i, j] = res.accuracy[t]
            if progress:
                progress((i * len(grid) + j + 1) / total, f"a={a:g}, b={b:g}")
    ft = s.finetuned_accuracy()
    acc["mean"] = np.mean([acc[t] / max(ft.get(t, 0.0), 1e-9) if ft.get(t) else acc[t] for t in tasks], axis=0)
    current = None
    if playground.method == "task_arithmetic":
        w = playground.weight_list()
        current = (playground.lam * w[0], playground.lam * w[1])
    return Landscape((names[0], names[1]), grid, tasks, acc, current, time.perf_counter() - t0)


def _colour(v: float) -> str:
    """White (0) to deep green (1); text stays readable."""
    v = min(max(v, 0.0), 1.0)
    r, g, b = int(255 - 200 * v), int(255 - 90 * v), int(255 - 190 * v)
    return f"rgb({r},{g},{b})"


def to_html(ls: Landscape) -> str:
    """One heatmap per task and one for the mean normalized accuracy; click a cell to merge there. Each heatmap is
    an ARIA grid with one tab stop (the current merge's cell, else the first): the arrow keys move between its
    cells and Enter or Space merges at the focused one (LANDSCAPE_JS), so 11×11 cells per task are not as many
    Tab presses."""
    a_name, b_name = (html.escape(n) for n in ls.names)
    near = None
    if ls.current is not None:
        near = (int(np.argmin([abs(g - ls.current[0]) for g in ls.grid])),
                int(np.argmin([abs(g - ls.current[1]) for g in ls.grid])))
    parts = []
    for key in [*ls.tasks, "mean"]:
        m = ls.accuracy[key]
        title = "mean normalized" if key == "mean" else f"{html.escape(key)} accuracy"
        rows = [f"<tr><th class='fm-ls-corner'>{a_name} ↓ · {b_name} →</th>"
                + "".join(f"<th>{g:g}</th>" for g in ls.grid) + "</tr>"]
        for i, a in enumerate(ls.grid):
            cells = []
            for j, b in enumerate(ls.grid):
                v = float(m[i, j])
                cur = " fm-ls-cur" if near == (i, j) else ""
                stop = "0" if (i, j) == (near or (0, 0)) else "-1"
                what = f"{a_name} {a:g}, {b_name} {b:g}: {title} {v:.0%}"
                cells.append(f"<td class='fm-ls-cell{cur}' data-a='{a:g}' data-b='{b:g}' data-i='{i}' data-j='{j}' "
                             f"tabindex='{stop}' aria-label='{what}' title='{what}' "
                             f"style='background:{_colour(v)}'>{round(100 * v):d}</td>")
            rows.append(f"<tr><th>{a:g}</th>{''.join(cells)}</tr>")
        parts.append(f"<div class='fm-ls-one'><div class='fm-ls-title'>{title} (%)</div>"
                     f"<table class='fm-ls' role='grid' aria-label='{title} (%): rows {a_name}, columns {b_name}; "
                     f"arrow keys move, Enter merges'>{''.join(rows)}</table></div>")
    ba, bb, bv = ls.best()
    cur = "" if ls.current is None else f" The outlined cell is the current merge (λ·w = {ls.current[0]:.2g}, {ls.current[1]:.2g})."
    return (f"<div class='fm-landscape'><p>θ₀ + a·τ({a_name}) + b·τ({b_name}); rows: a, columns: b. Best mean: "
            f"a = {ba:g}, b = {bb:g} ({bv:.0%}).{cur} <b>Click a cell</b> (or Tab to a heatmap, move with the arrow "
            f"keys and press Enter) to merge there (sets λ = 1 and the two coefficients). {ls.seconds:.1f} s for "
            f"{len(ls.grid) ** 2} merges.</p>"
            f"<div class='fm-ls-grid'>{''.join(parts)}</div></div>")


LANDSCAPE_CSS = """
.fm-ls-grid {display: flex; flex-wrap: wrap; gap: 12px}
.fm-ls {border-collapse: collapse; font-size: 0.72em; font-family: ui-monospace, monospace}
.fm-ls td, .fm-ls th {border: 1px solid #e5e7eb; padding: 1px 3px; text-align: center; min-width: 1.9em}
.fm-ls td.fm-ls-cell {cursor: pointer; color: #111}
.fm-ls td.fm-ls-cur {outline: 3px solid #4338ca; outline-offset: -2px; font-weight: bold}
.fm-ls td.fm-ls-cell:focus-visible {outline: 3px solid #d97706; outline-offset: -3px; box-shadow: 0 0 0 3px #fde68a}
.fm-ls-title {font-weight: 600; margin-bottom: 2px}
.fm-ls-corner {font-weight: normal; font-size: 0.9em}
"""

# A click, or Enter/Space on the focused cell, merges there; the arrow keys, Home and End move the focus within one
# heatmap (the cell moved to becomes its tab stop).
LANDSCAPE_JS = ("const pick = (c) => trigger('click', {a: parseFloat(c.dataset.a), b: parseFloat(c.dataset.b)});"
                "element.addEventListener('click', (e) => { const c = e.target.closest('[data-a]'); if (c) { pick(c); } });"
                "element.addEventListener('keydown', (e) => { const c = e.target.closest('[data-a]'); if (!c) { return; }"
                " if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); pick(c); return; }"
                " const n = c.closest('table').querySelectorAll('tr').length - 2;"
                " const i = +c.dataset.i, j = +c.dataset.j;"
                " const to = {ArrowUp: [i - 1, j], ArrowDown: [i + 1, j], ArrowLeft: [i, j - 1], ArrowRight: [i, j + 1],"
                " Home: [i, 0], End: [i, n]}[e.key];"
                " if (!to) { return; } e.preventDefault();"
                " const t = c.closest('table').querySelector(`[data-i='${to[0]}'][data-j='${to[1]}']`);"
                " if (t) { c.tabIndex = -1; t.tabIndex = 0; t.focus(); } });")
