"""Plotly figure builders shared by the app, the CLI and the reports: ordinary calls, no state."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

_FONT = dict(family="Inter, system-ui, sans-serif", size=13)


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.02), font=_FONT, height=height, margin=dict(l=60, r=20, t=50, b=50),
                      template="plotly_white")
    return fig


def similarity_heatmap(report, layer: str | None = None, metric: str = "cosine") -> go.Figure:
    """Annotated K×K heatmap of cosine similarity (or sign conflicts), whole model or one layer."""
    if metric == "sign_conflict":
        mat, title, scale, zmin, zmax = report.sign_conflict, "Sign conflicts between task vectors", "Reds", 0, 1
    else:
        mat = report.cosine if layer in (None, "", "whole model") else report.layer_cosine[layer]
        title = "Cosine similarity of task vectors" + (f" — {layer}" if layer not in (None, "", "whole model") else "")
        scale, zmin, zmax = "RdBu", -1, 1
    mat = np.asarray(mat, dtype=float)
    text = [["—" if np.isnan(v) else f"{v:.2f}" for v in row] for row in mat]
    fig = go.Figure(go.Heatmap(z=np.nan_to_num(mat), x=report.names, y=report.names, text=text,
                               texttemplate="%{text}", colorscale=scale, zmin=zmin, zmax=zmax,
                               hovertemplate="%{y} vs %{x}: %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title)


def layer_similarity_heatmap(report) -> go.Figure:
    """Pairs × layers: where in depth the task vectors agree or conflict."""
    pairs = report.pairs()
    labels = [f"{report.names[i]} ~ {report.names[j]}" for i, j in pairs]
    z = np.array([[report.layer_cosine[l][i, j] for l in report.layers] for i, j in pairs], dtype=float)
    fig = go.Figure(go.Heatmap(z=np.nan_to_num(z), x=report.layers, y=labels, colorscale="RdBu", zmin=-1, zmax=1,
                               text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}"))
    return _layout(fig, "Cosine similarity per layer", height=max(300, 60 + 40 * len(labels)))


def norms_chart(report) -> go.Figure:
    """Task-vector norms, annotated with steps and learning rate: training heterogeneity at a glance."""
    labels = []
    for meta in report.training or [{}] * len(report.names):
        parts = []
        if "steps" in meta:
            parts.append(f"{meta['steps']} steps")
        if "learning_rate" in meta:
            parts.append(f"lr {meta['learning_rate']:g}")
        labels.append(", ".join(parts))
    fig = go.Figure(go.Bar(x=report.names, y=list(map(float, report.norms)), text=labels, textposition="outside",
                           marker_color="#4f46e5"))
    fig.update_yaxes(title="‖τ‖ (L2, whole model)")
    return _layout(fig, "Task-vector norms and training")


def accuracy_bars(tasks: Sequence[str], series: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Grouped bars: per-task accuracy of each named model (e.g. base, fine-tune, merged)."""
    fig = go.Figure()
    for label, acc in series.items():
        fig.add_bar(name=label, x=list(tasks), y=[acc.get(t, float("nan")) for t in tasks],
                    text=[f"{acc.get(t, float('nan')):.0%}" for t in tasks], textposition="outside")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="exact-match accuracy", range=[0, 1.12], tickformat=".0%")
    return _layout(fig, "Per-task accuracy")


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
    return _layout(fig, title)
