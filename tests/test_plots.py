"""Plot builders carry the right data (not only the right figure type)."""
from __future__ import annotations

import numpy as np
import torch

from evaluation import plots
from merging.similarity import similarity_from_stacks


def report():
    a = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    stacks = [("h.0.w", torch.stack([a, a, -a])), ("h.1.w", torch.stack([a, 2 * a, a]))]
    return similarity_from_stacks(stacks, ["x", "y", "z"], [{"steps": 10, "learning_rate": 1e-3}, {"steps": 40}, {}])


def test_similarity_report_values():
    r = report()
    np.testing.assert_allclose(r.cosine[0, 1], 3 / np.sqrt(10))  # (a, a) vs (a, 2a)
    np.testing.assert_allclose(r.layer_cosine["h.0"][0, 2], -1.0)
    np.testing.assert_allclose(r.layer_cosine["h.1"][0, 2], 1.0)
    np.testing.assert_allclose(r.cosine[0, 2], 0.0, atol=1e-12)  # −|a|² + |a|² over both layers
    np.testing.assert_allclose(r.sign_conflict[0, 2], 0.5)  # opposite in layer 0 (3 coords), agree in layer 1
    np.testing.assert_allclose(r.norms[1], np.sqrt(6 + 24))


def test_heatmap_has_the_matrix_and_labels():
    r = report()
    fig = plots.similarity_heatmap(r)
    hm = fig.data[0]
    np.testing.assert_allclose(np.array(hm.z), r.cosine)
    assert list(hm.x) == ["x", "y", "z"] and hm.text[0][1] == "0.95"
    layer = plots.similarity_heatmap(r, layer="h.0")
    np.testing.assert_allclose(np.array(layer.data[0].z), r.layer_cosine["h.0"])
    assert "h.0" in layer.layout.title.text
    conflicts = plots.similarity_heatmap(r, metric="sign_conflict")
    np.testing.assert_allclose(np.array(conflicts.data[0].z), r.sign_conflict)
    assert "whole model (not counted per layer)" in plots.similarity_heatmap(r, "h.0", "sign_conflict").layout.title.text
    assert "per layer" not in conflicts.layout.title.text
    per_layer = plots.layer_similarity_heatmap(r)
    assert list(per_layer.data[0].x) == ["h.0", "h.1"] and len(per_layer.data[0].y) == 3  # a row per pair
    np.testing.assert_allclose(np.array(per_layer.data[0].z)[:, 1], [r.layer_cosine["h.1"][i, j] for i, j in r.pairs()])
    assert per_layer.data[0].showscale is False  # the numbers are in the cells; the bar took a phone's width


def test_norms_chart_shows_training_metadata():
    fig = plots.norms_chart(report())
    bar = fig.data[0]
    np.testing.assert_allclose(bar.y, report().norms)
    assert bar.text[0] == "10 steps, lr 0.001" and bar.text[1] == "40 steps" and bar.text[2] == ""


def test_accuracy_bars_and_lambda_sweep():
    fig = plots.accuracy_bars(["a", "b"], {"base": {"a": 0.1, "b": 0.2}, "merged": {"a": 0.9}})
    assert [t.name for t in fig.data] == ["base", "merged"]
    assert list(fig.data[0].y) == [0.1, 0.2] and np.isnan(fig.data[1].y[1])
    sweep = plots.lambda_sweep([0.5, 1.0], {"mean": [0.3, 0.6]}, best=1.0)
    assert list(sweep.data[0].x) == [0.5, 1.0] and list(sweep.data[0].y) == [0.3, 0.6]
    assert any(s.x0 == 1.0 for s in sweep.layout.shapes)
