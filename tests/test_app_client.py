"""The real Gradio app, launched on 127.0.0.1 (free port), driven through gradio_client."""
from __future__ import annotations


import pytest



def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def live(c, method="task_arithmetic", lam=1.0, weights=(), hyper=None, prompts="", selection=()):
    """The /live endpoint's named, typed arguments."""
    return c.predict(selection=list(selection), method=method, lam=lam, weights=list(weights), hyper=hyper or {},
                     prompts=prompts, api_name="/live")


def test_live_endpoint_merges_and_scores(app_url):
    c = client(app_url)
    html, acc, heat, status, data = live(c, lam=0.4, weights=[1.0] * 7, prompts="reverse: abc=\nhi")
    assert data["headers"][:3] == ["prompt", "expected", "base"] and data["headers"][-1] == "merged"
    assert [r[0] for r in data["rows"]] == ["reverse: abc=", "hi"] and data["rows"][0][1] == "cba"
    assert "fm-merged" in html and "reverse: abc=" in html
    assert "task_arithmetic" in status and "λ = 0.4" in status
    assert acc and heat  # plotly figures serialised
    # a non-default aggregator with its hyperparameter by registry name
    *_, status2, _ = live(c, "fedgma", 1.2, [1.0] * 7, {"rho": 0.3})
    assert "fedgma" in status2 and "λ = 1.2" in status2


def test_sessions_are_independent_and_errors_leave_the_app_usable(app_url):
    a, b = client(app_url), client(app_url)
    *_, ta = live(a, weights=[1.0, 1.0], selection=["upper", "add"], prompts="add: 1+2=")
    *_, tb = live(b, weights=[1.0] * 7, prompts="add: 1+2=")
    assert ta["headers"] == ["prompt", "expected", "base", "upper", "add", "merged"]
    assert len(tb["headers"]) == 3 + 7 + 1
    # an impossible merge (slerp takes two models) is refused with a message; the next call works
    *_, bad, _ = live(a, "slerp", 1.0, [1.0] * 3, selection=["upper", "add", "sort"])
    assert "⚠️" in bad and "slerp" in bad
    *_, ok, _ = live(a, "median", 1.0, [1.0, 1.0], selection=["upper", "add"])
    assert "median" in ok and "⚠️" not in ok


def test_yaml_of_the_current_merge(app_url):
    import yaml

    c = client(app_url)
    live(c, "ties", 0.9, [1.0] * 7, {"density": 0.5})
    path, text = c.predict(api_name="/yaml")
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "ties" and cfg["parameters"]["lambda"] == 0.9 and len(cfg["models"]) == 7


def test_heterogeneity_study_endpoint(app_url):
    c = client(app_url)
    live(c, weights=[1.0] * 3, selection=["upper", "add", "sort"])
    fig, text = c.predict(["task_arithmetic", "median", "slerp"], api_name="/heterogeneity")
    assert "Spearman" in text and "drop: median" in text and "drop: slerp" not in text
    assert "upper + add" in text and "all but sort" in text
    assert fig
