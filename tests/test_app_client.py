"""The real Gradio app on the shipped zoo (assets/zoo), on 127.0.0.1 (free port), driven through
gradio_client: the answers and scores it returns are the library's, and the scenarios' own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.shipped_app import library_result

DEFAULT_SEVEN = ["reverse", "upper", "sort", "sort_desc", "add", "is_even", "is_odd"]  # one per task


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def live(c, method="task_arithmetic", lam=1.0, weights=(), hyper=None, prompts="", selection=()):
    """The /live endpoint's named, typed arguments."""
    return c.predict(selection=list(selection), method=method, lam=lam, weights=list(weights), hyper=hyper or {},
                     prompts=prompts, api_name="/live")


def scenario(sid: str):
    from evaluation import scenarios

    return scenarios.by_id(sid)


def plotted_bars(fig) -> dict[str, dict[str, float]]:
    """{trace name: {task: bar height}} of a serialised plotly bar chart."""
    plot = json.loads(fig["plot"]) if isinstance(fig["plot"], str) else fig["plot"]
    return {t["name"]: dict(zip(t["x"], t["y"])) for t in plot["data"] if t.get("type") == "bar"}


def test_two_tasks_scenario_answers_and_scores(shipped_url):
    sc = scenario("two-tasks")
    assert sc.models == ["reverse", "upper"] and sc.method == "task_arithmetic"
    html, acc, heat, status, data = live(client(shipped_url), sc.method, sc.lam, sc.weight_list(), sc.hyper,
                                         "reverse: abc=\nupper: abc=\nsort: cab=", sc.models)
    assert data["headers"] == ["prompt", "expected", "base", "reverse", "upper", "merged"]
    rows = {r[0]: r[1:] for r in data["rows"]}
    # expected, base, reverse, upper, merged: each fine-tune solves its own task, the merge both
    assert rows["reverse: abc="][0] == "cba" and rows["upper: abc="][0] == "ABC"
    assert rows["reverse: abc="][2] == "✓ cba" and rows["reverse: abc="][4] == "✓ cba"
    assert rows["upper: abc="][3] == "✓ ABC" and rows["upper: abc="][4] == "✓ ABC"
    assert rows["reverse: abc="][1].startswith("✗") and rows["upper: abc="][1].startswith("✗")  # the base does not
    assert rows["sort: cab="][0] == "abc (sort) / cba (sort_desc)"  # a task outside the selection: both answers
    # scores: validation accuracies in [0, 1]; normalized = merged ÷ fine-tune; the scenario's claim holds
    accuracy, normalized = data["accuracy"], data["normalized"]
    assert set(accuracy) == {"base", "fine-tuned (own task)", "merged"}
    assert all(set(v) == {"reverse", "upper"} and all(0 <= x <= 1 for x in v.values()) for v in accuracy.values())
    assert accuracy["fine-tuned (own task)"] == {"reverse": 1.0, "upper": 1.0}
    assert accuracy["base"] == {"reverse": 0.0, "upper": 0.0}
    for t in ("reverse", "upper"):
        assert normalized[t] == pytest.approx(accuracy["merged"][t] / accuracy["fine-tuned (own task)"][t])
    assert normalized["mean"] == pytest.approx((normalized["reverse"] + normalized["upper"]) / 2)
    assert normalized["mean"] >= sc.claim["value"]
    assert f"**{round(100 * normalized['mean'])}%**" in status and "λ = 0.8" in status and "2 model(s)" in status
    # the bar chart shows the same numbers; the merged cells are marked in the HTML table
    assert plotted_bars(acc) == accuracy
    assert "fm-merged" in html and html.count("✓") >= 4
    assert heat


def test_scenario_scores_are_the_librarys(shipped_url):
    """The conflicting-tasks scenario (cclip, a hyperparameter) through the app and through
    evaluation.Session directly: the same answers and the same scores (its claim, on the test
    split, is checked by test_scenarios.py; the app's live subset is 12 prompts per task)."""
    sc = scenario("conflicting")
    prompts = "sort: dcba=\nsort: bca="
    *_, status, data = live(client(shipped_url), sc.method, sc.lam, sc.weight_list(), sc.hyper, prompts, sc.models)
    assert "⚠️" not in status and "cclip" in status
    mine = library_result(sc.models, sc.method, sc.weight_list(), sc.lam, sc.hyper, prompts.split("\n"))
    assert data["headers"] == mine.headers and data["rows"] == [list(r) for r in mine.rows]
    assert data["accuracy"] == mine.accuracy and data["normalized"] == pytest.approx(mine.normalized)


def test_lambda_zero_is_the_base_and_one_model_is_that_model(shipped_url):
    c = client(shipped_url)
    prompts = "reverse: abc=\nupper: abc=\nadd: 1+2="
    *_, data = live(c, "task_arithmetic", 0.0, [1.0, 1.0], {}, prompts, ["reverse", "upper"])
    assert [r[-1] for r in data["rows"]] == [r[2] for r in data["rows"]]  # merged = base, cell for cell
    assert data["accuracy"]["merged"] == data["accuracy"]["base"]
    *_, status, data = live(c, "task_arithmetic", 1.0, [1.0], {}, prompts, ["upper"])
    assert data["headers"] == ["prompt", "expected", "base", "upper", "merged"]
    assert [r[-1] for r in data["rows"]] == [r[3] for r in data["rows"]]  # merged = the fine-tune
    assert data["accuracy"]["merged"] == data["accuracy"]["fine-tuned (own task)"] == {"upper": 1.0}
    assert "**100%**" in status


@pytest.mark.parametrize("call,needles", [
    (dict(method="soup", weights=[1.0, 1.0]), ["method", "soup"]),
    (dict(method="fedgma", weights=[1.0, 1.0], hyper={"rho": 7.0}), ["rho", "7"]),
    (dict(method="slerp", weights=[1.0] * 3, selection=["reverse", "upper", "sort"]), ["slerp", "2"]),
    (dict(method="task_arithmetic", weights=[1.0, 1.0], hyper={"density": 0.5}), ["density", "task_arithmetic"]),
])
def test_bad_input_is_a_named_error_and_the_next_call_is_right(shipped_url, call, needles):
    c = client(shipped_url)
    call = {"selection": ["reverse", "upper"], **call}
    *_, status, data = live(c, prompts="reverse: abc=", **call)
    assert status.startswith("⚠️") and data is None, status
    assert all(n in status for n in needles), status
    assert "Traceback" not in status and "Error" not in status and "/" not in status.replace("λ", "")
    *_, status, data = live(c, "task_arithmetic", 0.8, [1.0, 1.0], {}, "reverse: abc=", ["reverse", "upper"])
    assert "⚠️" not in status and data["rows"][0][-1] == "✓ cba"


def test_sessions_are_independent(shipped_url):
    a, b = client(shipped_url), client(shipped_url)
    *_, ta = live(a, weights=[1.0], selection=["upper"], prompts="upper: abc=")
    *_, tb = live(b, lam=0.0, weights=[1.0] * 7, selection=DEFAULT_SEVEN, prompts="upper: abc=")
    *_, ta2 = live(a, weights=[1.0], prompts="upper: abc=")  # a's selection and merge were kept
    assert ta["headers"] == ta2["headers"] == ["prompt", "expected", "base", "upper", "merged"]
    assert tb["headers"] == ["prompt", "expected", "base", *DEFAULT_SEVEN, "merged"]
    assert ta["rows"][0][-1] == ta2["rows"][0][-1] == "✓ ABC"  # a: the upper fine-tune itself
    assert tb["rows"][0][-1] == tb["rows"][0][2]  # b: λ = 0, the base


def test_yaml_of_the_current_merge(shipped_url):
    import yaml

    c = client(shipped_url)
    live(c, "ties", 0.9, [1.0, 0.5, 0.25], {"density": 0.5}, selection=["reverse", "upper", "add"])
    path, text = c.predict(api_name="/yaml")
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == "ties" and cfg["parameters"]["lambda"] == 0.9
    assert cfg["parameters"]["density"] == 0.5
    assert [Path(m["model"]).name for m in cfg["models"]] == ["reverse", "upper", "add"]
    assert [m.get("parameters", {}).get("weight", 1.0) for m in cfg["models"]] == [1.0, 0.5, 0.25]
    assert Path(cfg["base_model"]).name == "base"
    assert path["orig_name"] == "merge.yml" and Path(path["path"]).read_text().strip() == text.strip()  # the download: the same YAML


def test_heterogeneity_study_endpoint(app_url):
    """On the recipe's tiny zoo (conftest's app_url): the study re-scores every group of models,
    minutes on the shipped zoo's 1M-parameter models."""
    c = client(app_url)
    live(c, weights=[1.0] * 3, selection=["upper", "add", "sort"])
    fig, text = c.predict(["task_arithmetic", "median", "slerp"], api_name="/heterogeneity")
    assert "Spearman" in text and "drop: median" in text and "drop: slerp" not in text
    assert "upper + add" in text and "all but sort" in text
    assert fig


def test_task_count_endpoint(app_url):
    """The task-count curve on the tiny zoo: every group size, slerp (two models only) left out, and a
    groups-per-size value out of range refused."""
    c = client(app_url)
    live(c, weights=[1.0] * 3, selection=["upper", "add", "sort"])
    fig, text = c.predict(["task_arithmetic", "slerp"], 2, api_name="/task_count")
    assert "| 2 | 2 |" in text and "| 3 | 1 |" in text and "slerp" not in text
    assert "no accuracy to normalize by" in text  # the recipe's tiny fine-tunes answer nothing right
    assert fig
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="greater than maximum value 20"):  # Gradio checks the slider's bounds
        c.predict(["task_arithmetic"], 99, api_name="/task_count")
