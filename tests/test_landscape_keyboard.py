"""The landscape's HTML for keyboard and screen-reader users (the browser test, tests/test_app_browser.py, presses
the keys): each heatmap is a grid with one tab stop, every cell named by its coefficients and score."""
from __future__ import annotations

import re

import numpy as np

from evaluation import landscape


def _landscape(current):
    grid = [0.0, 0.5, 1.0]
    acc = {"upper": np.array([[0.0, 0.25, 0.5], [0.1, 0.6, 0.7], [0.2, 0.8, 1.0]]), "mean": np.full((3, 3), 0.5)}
    return landscape.Landscape(("up'per", "add"), grid, ["upper"], acc, current, 1.0)


def test_one_tab_stop_per_heatmap_on_the_current_merge():
    html = landscape.to_html(_landscape((0.5, 1.0)))
    assert html.count("role='grid'") == 2  # upper, mean
    stops = re.findall(r"<td class='fm-ls-cell fm-ls-cur' [^>]*data-i='1' data-j='2' tabindex='0'", html)
    assert len(stops) == 2 and html.count("tabindex='0'") == 2 and html.count("tabindex='-1'") == 2 * 8
    # named: both coefficients, which heatmap, the score; the quote in a model name escaped
    assert "aria-label='up&#x27;per 0.5, add 1: upper accuracy 70%'" in html
    assert "title='up&#x27;per 0.5, add 1: upper accuracy 70%'" in html
    assert "aria-label='up&#x27;per 1, add 0: mean normalized 50%'" in html


def test_without_a_current_merge_the_first_cell_is_the_stop():
    html = landscape.to_html(_landscape(None))
    assert re.findall(r"data-i='(\d)' data-j='(\d)' tabindex='0'", html) == [("0", "0")] * 2
    assert ":focus-visible" in landscape.LANDSCAPE_CSS and "keydown" in landscape.LANDSCAPE_JS
