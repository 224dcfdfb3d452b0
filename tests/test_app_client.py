"""The real Gradio app, launched on 127.0.0.1 (free port), driven through gradio_client."""
from __future__ import annotations


import pytest



def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def test_live_endpoint_merges_and_scores(app_url):
    from app import live_args

    c = client(app_url)
    table, acc, heat, status = c.predict(*live_args(lam=0.4, weights=[1.0] * 7, prompts="reverse: abc=\nhi"),
                                                 api_name="/live")
    assert table["headers"][:3] == ["prompt", "expected", "base"] and table["headers"][-1] == "merged"
    assert [r[0] for r in table["data"]] == ["reverse: abc=", "hi"] and table["data"][0][1] == "cba"
    assert "task_arithmetic" in status and "λ = 0.4" in status
    assert acc and heat  # plotly figures serialised
    # a non-default aggregator with its hyperparameter from the registry-built widgets
    *_, status2 = c.predict(*live_args("fedgma", 1.2, [1.0] * 7, {"rho": 0.3}), api_name="/live")
    assert "fedgma" in status2 and "λ = 1.2" in status2


def test_sessions_are_independent_and_errors_leave_the_app_usable(app_url):
    from app import live_args

    a, b = client(app_url), client(app_url)
    ta, *_ = a.predict(*live_args(weights=[1.0, 1.0], selection=["upper", "add"], prompts="add: 1+2="),
                          api_name="/live")
    tb, *_ = b.predict(*live_args(weights=[1.0] * 7, prompts="add: 1+2="), api_name="/live")
    assert ta["headers"] == ["prompt", "expected", "base", "upper", "add", "merged"]
    assert len(tb["headers"]) == 3 + 7 + 1
    # an impossible merge (slerp takes two models) is refused with a message; the next call works
    *_, bad = a.predict(*live_args("slerp", 1.0, [1.0] * 3, selection=["upper", "add", "sort"]), api_name="/live")
    assert "⚠️" in bad and "slerp" in bad
    *_, ok = a.predict(*live_args("median", 1.0, [1.0, 1.0], selection=["upper", "add"]), api_name="/live")
    assert "median" in ok and "⚠️" not in ok


def test_yaml_of_the_current_merge(app_url):
    import yaml

    from app import live_args

    c = client(app_url)
    c.predict(*live_args("ties", 0.9, [1.0] * 7, {"density": 0.5}), api_name="/live")
    path, text = c.predict(api_name="/yaml")
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "ties" and cfg["parameters"]["lambda"] == 0.9 and len(cfg["models"]) == 7


def test_heterogeneity_study_endpoint(app_url):
    from app import live_args

    c = client(app_url)
    c.predict(*live_args(weights=[1.0] * 3, selection=["upper", "add", "sort"]), api_name="/live")
    fig, text = c.predict(["task_arithmetic", "median", "slerp"], api_name="/heterogeneity")
    assert "Spearman" in text and "drop: median" in text and "drop: slerp" not in text
    assert "upper + add" in text and "all but sort" in text
    assert fig
