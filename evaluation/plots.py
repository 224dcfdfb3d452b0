"""Plotly figure builders of the app and the reports: ordinary calls, no state. The similarity
figures live in `merging.report` (the CLI draws them too) and are re-exported here. A study's
report (its markdown and its figure) is written by `write_report`."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import plotly.graph_objects as go

from merging import report
from merging.report import legend_below, styled

__all__ = ["accuracy_bars", "lambda_sweep", "layer_similarity_heatmap", "norms_chart", "similarity_heatmap"]

TITLE_CHARS = 33  # a title line that fits a 390 px phone's plot (plotly cuts a longer one: it never wraps)


def fit_title(fig: go.Figure) -> go.Figure:
    """A long title goes onto lines of at most TITLE_CHARS characters, the top margin grown to hold them."""
    text = fig.layout.title.text or ""
    if len(text) <= TITLE_CHARS or "<br>" in text:
        return fig
    parts = text.split(" — ")  # a dash's clause (a layer, a caveat) is a smaller line of its own
    lines = textwrap.wrap(parts[0], TITLE_CHARS, break_long_words=False)
    lines += [f'<span style="font-size:12px">{part}</span>' for part in parts[1:]]
    top = fig.layout.margin.t if fig.layout.margin.t is not None else 50
    fig.update_layout(title=dict(text="<br>".join(lines)), margin=dict(t=top + 44 * (len(lines) - 1)))
    return fig


def similarity_heatmap(rep, layer: str | None = None, metric: str = "cosine") -> go.Figure:
    return fit_title(report.similarity_heatmap(rep, layer, metric))


def layer_similarity_heatmap(rep) -> go.Figure:
    return fit_title(report.layer_similarity_heatmap(rep))


def norms_chart(rep) -> go.Figure:
    return fit_title(report.norms_chart(rep))


def accuracy_bars(tasks: Sequence[str], series: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Grouped bars: per-task accuracy of each named model (e.g. base, fine-tune, merged)."""
    fig = go.Figure()
    for label, acc in series.items():
        fig.add_bar(name=label, x=list(tasks), y=[acc.get(t, float("nan")) for t in tasks],
                    text=[f"{acc.get(t, float('nan')):.0%}" for t in tasks], textposition="outside")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="exact-match accuracy", range=[0, 1.12], tickformat=".0%")
    return fit_title(styled(fig, "Per-task accuracy"))


def lambda_sweep(lambdas: Sequence[float], curves: Mapping[str, Sequence[float]], best: float | None = None,
                 title: str = "λ sweep") -> go.Figure:
    """One curve per series (a task, or the average) over λ; a dashed line at the chosen λ."""
    fig = go.Figure()
    for label, ys in curves.items():
        fig.add_scatter(x=list(lambdas), y=list(ys), mode="lines+markers", name=label)
    if best is not None:
        fig.add_vline(x=best, line_dash="dash", line_color="#888", annotation_text=f"λ = {best:g}")
    fig.update_xaxes(title="λ")
    fig.update_yaxes(title="accuracy", tickformat=".0%")
    return fit_title(legend_below(styled(fig, title)))


def write_report(out: str | os.PathLike, stem: str, text: str, fig: go.Figure) -> tuple[Path, Path]:
    """<out>/<stem>.md and <stem>.html (the folder made if missing), each written to a hidden file and
    renamed into place: a Ctrl-C or a full disk leaves the previous report, not half of one. The
    figure's element id is fixed (plotly draws a random one), so the same results give the same bytes."""
    from merging.targets import replaced

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    md, html = folder / f"{stem}.md", folder / f"{stem}.html"
    with replaced(md) as md_temp, replaced(html) as html_temp:  # both written before either is replaced
        md_temp.write_text(text, encoding="utf-8")
        fig.write_html(html_temp, include_plotlyjs="cdn", div_id=stem)
    return md, html
