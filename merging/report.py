"""Plotly figures of a similarity report (`merging.similarity`): the CLI's `--html` and the app's
heterogeneity tab draw the same ones. Plotly is imported here, never by the merging core."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

FONT = dict(family="Inter, system-ui, sans-serif", size=13)


def legend_below(fig: go.Figure) -> go.Figure:
    """A horizontal legend under the x axis: beside the plot, a legend takes half of a phone's width,
    and above it, a legend that wraps runs into the title."""
    fig.update_layout(legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, xanchor="left", x=0))
    return fig


# one colour per aggregator (or series) in the figures that compare several
PALETTE = ("#4f46e5", "#db2777", "#059669", "#d97706", "#0891b2", "#7c3aed")


def styled(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    """The house style of every figure: title top left, one font, white template."""
    fig.update_layout(title=dict(text=title, x=0.02), font=FONT, height=height, margin=dict(l=60, r=20, t=50, b=50),
                      template="plotly_white")
    return fig


def similarity_heatmap(report, layer: str | None = None, metric: str = "cosine") -> go.Figure:
    """Annotated K×K heatmap of cosine similarity (or sign conflicts), whole model or one layer."""
    one_layer = layer not in (None, "", "whole model")
    if metric == "sign_conflict":  # counted over the whole model only
        title = "Sign conflicts between task vectors" + (" — whole model (not counted per layer)" if one_layer else "")
        mat, scale, zmin, zmax = report.sign_conflict, "Reds", 0, 1
    else:
        mat = report.layer_cosine[layer] if one_layer else report.cosine
        title = "Cosine similarity of task vectors" + (f" — {layer}" if one_layer else "")
        scale, zmin, zmax = "RdBu", -1, 1
    mat = np.asarray(mat, dtype=float)
    text = [["—" if np.isnan(v) else f"{v:.2f}" for v in row] for row in mat]
    fig = go.Figure(go.Heatmap(z=np.nan_to_num(mat), x=report.names, y=report.names, text=text,
                               texttemplate="%{text}", colorscale=scale, zmin=zmin, zmax=zmax,
                               hovertemplate="%{y} vs %{x}: %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return styled(fig, title)


def layer_similarity_heatmap(report) -> go.Figure:
    """Pairs × layers: where in depth the task vectors agree or conflict. A row per pair (any number of
    them stacks down) and the numbers in the cells, without a colour bar: on a phone the bar and the
    pairs' labels left the cells too narrow for their numbers."""
    pairs = report.pairs()
    labels = [f"{report.names[i]} ~ {report.names[j]}" for i, j in pairs]
    z = np.array([[report.layer_cosine[l][i, j] for l in report.layers] for i, j in pairs], dtype=float)
    fig = go.Figure(go.Heatmap(z=np.nan_to_num(z), x=report.layers, y=labels, colorscale="RdBu", zmin=-1, zmax=1,
                               showscale=False, text=[[f"{v:.2f}" for v in row] for row in z],
                               texttemplate="%{text}", textfont=dict(size=11),
                               hovertemplate="%{y}, %{x}: %{text}<extra></extra>"))
    fig.update_xaxes(side="top")
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig = styled(fig, "Cosine similarity per layer", height=max(260, 110 + 30 * len(labels)))
    fig.update_layout(margin=dict(l=10, r=10, t=80, b=10))
    return fig


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
    fig.update_yaxes(title="‖τ‖ (L2)")  # short: a longer axis title is cut on a phone
    return styled(fig, "Task-vector norms (whole model) and training")
