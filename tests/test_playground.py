"""The Merge tab's logic and app.py's handlers, as plain functions over a real Playground (tiny zoo)."""
from __future__ import annotations

import json
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from merging.cache import StackCache
from merging.errors import MergeError


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tests.conftest import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory)


@pytest.fixture()
def pg(zoo, monkeypatch):
    from evaluation.playground import Playground
    from evaluation.session import Session

    monkeypatch.setenv("FEDMERGE_ZOO", str(zoo))
    session = Session(cache=StackCache(2 ** 30), zoo=zoo, allow_hub=False).load_zoo()
    return Playground.open(session)


def test_one_merge_per_action_and_values_by_name(pg):
    view = pg.act()
    assert "merged" in view.table and view.status.startswith("**task_arithmetic**")
    # a coefficient is stored by model name: changing the selection cannot misalign it
    pg.act(lambda: pg.set_weight("upper", 0.5))
    pg.act(lambda: pg.select(["upper", "add"]))
    assert pg.weight_list() == [0.5, 1.0] and pg.session.settings.weights == (0.5, 1.0)
    # out-of-range values are clamped, not refused
    assert pg.set_lambda(9) == 8.0 and pg.set_lambda("x") == 8.0 and pg.set_weight("add", -9) == -1.0


def test_a_newer_action_makes_the_older_one_drop(pg):
    gate, started = threading.Event(), threading.Event()
    results = {}

    def slow_change():
        started.set()
        gate.wait(10)
        pg.set_lambda(0.4)

    t = threading.Thread(target=lambda: results.setdefault("old", pg.act(slow_change)))
    t.start()
    started.wait(10)
    t2 = threading.Thread(target=lambda: results.setdefault("new", pg.act(lambda: pg.set_lambda(0.6))))
    t2.start()
    gate.set()
    t.join(30)
    t2.join(30)
    assert results["old"] is None  # dropped silently: the newer one paints
    assert results["new"] is not None and pg.session.settings.lam == 0.6


def test_refusals_name_the_problem_and_change_nothing(pg):
    pg.act(lambda: pg.select(["upper", "add", "sort"]))
    with pytest.raises(MergeError, match="select at least one"):
        pg.select([])
    with pytest.raises(MergeError, match="at most 2"):
        pg.set_method("slerp")
    assert pg.selected == ["upper", "sort", "add"] or set(pg.selected) == {"upper", "sort", "add"}
    assert pg.method == "task_arithmetic"
    pg.select(["upper", "add"])
    assert pg.set_method("slerp") == "slerp"
    with pytest.raises(MergeError, match="at most 2"):
        pg.select(["upper", "add", "sort"])


def test_outputs_table_merge_first_coloured_and_marked(pg):
    from evaluation.tasks import TASKS

    pg.set_prompts(f"{TASKS['reverse'].demo_prompts[0]}\nfree text <b>")
    res = pg.act().result
    from evaluation.playground import outputs_html

    html = outputs_html(res)
    head = html[html.index("<thead>"):html.index("</thead>")]
    assert head.index("expected") < head.index("merged") < head.index("base")
    assert ("fm-ok" in html or "fm-bad" in html) and ("✓" in html or "✗" in html)
    assert "free text &lt;b&gt;" in html and "<b>" not in html.replace("<b aria-label", "")  # escaped
    assert "<details" in html and "Each fine-tune" in html  # fine-tunes folded after the merge


def test_panel_has_one_slider_per_selected_model(pg):
    from evaluation.playground import panel_html

    html = panel_html(pg)
    assert html.count("type='range'") == len(pg.selected) == 7
    pg.select([s.name for s in pg.session.specs])
    assert panel_html(pg).count("type='range'") == 8
    pg.set_method("fednova")
    pg.set_auto("steps", False)
    html = panel_html(pg)
    assert html.count("data-hp='steps'") == 8
    assert pg.hyper_values()["steps"] == [t["steps"] for t in pg.session.training()]


def test_scenarios_apply(pg):
    from evaluation import scenarios

    for sc in scenarios.load():
        view = pg.act(lambda sc=sc: pg.apply_scenario(sc))
        assert pg.selected == [n for n in [s.name for s in pg.session.specs] if n in sc.models]
        assert pg.method == sc.method and pg.lam == sc.lam and sc.method in view.status


def test_a_scenario_says_what_was_changed_since(pg):
    """The claim is about the scenario's setup: each change away from it is named, the button clears it."""
    import app
    from evaluation import scenarios

    sc = scenarios.by_id("conflicting")  # cclip beats task_arithmetic, each at its own λ
    pg.act(lambda: pg.apply_scenario(sc))
    assert pg.scenario_changes() == [] and "You changed" not in app.scenario_markdown(pg)
    pg.set_method("task_arithmetic")  # the other side of the claim
    assert pg.scenario_changes() == ["λ"]  # the claim's task_arithmetic runs at λ 0.4
    pg.set_lambda(sc.settings_for("task_arithmetic")[0])
    assert pg.scenario_changes() == []
    pg.set_method("median")
    pg.set_weight(sc.models[0], 0.5)
    assert pg.scenario_changes() == ["the coefficients", "the aggregator"]
    out = app.on_select(pg, [*sc.models, "upper"])  # every action re-renders the header
    assert "You changed the models, the aggregator since" in out[5]
    out = app.on_scenario(pg, "conflicting")
    assert "You changed" not in out[5] and pg.scenario_changes() == []


def test_a_cleared_lambda_box_keeps_lambda(pg):
    """The slider's number box sends null when cleared or past float's range: λ stays, and is written back."""
    import app

    slider = app.ClampedSlider(0, 8, value=0.3)
    assert slider.preprocess(None) is None and slider.preprocess("x") is None and slider.preprocess(float("inf")) is None
    assert slider.preprocess(9) == 8 and slider.preprocess(-1) == 0 and slider.preprocess("0.7") == 0.7
    pg.act(lambda: pg.set_lambda(1.1))
    out = app.on_lambda(pg, slider.preprocess(None))
    assert pg.lam == 1.1 and out[3].value == 1.1 and "λ = 1.1," in out[-1]  # was: λ = 0


def test_a_scenario_brings_back_the_zoos_base(pg, zoo):
    import app
    from evaluation import scenarios

    copy = zoo / "base-copy"  # another base the fine-tunes fit (the same weights, another folder)
    shutil.copytree(zoo / "base", copy)
    try:  # the tiny zoo is shared by the session's tests: it gets its folders back
        pg.act(lambda: pg.apply_scenario(scenarios.by_id("two-tasks")))
        pg.act(lambda: pg.session.set_base(str(copy)))
        assert pg.scenario_changes() == ["the base"]
        out = app.on_scenario(pg, "two-tasks")
        assert pg.session.base_ref == str(zoo / "base") and "You changed" not in out[5]  # was: kept the other base
    finally:
        shutil.rmtree(copy)


def test_an_older_key_press_handled_late_is_dropped(pg):
    """One request per key press on a coefficient: one handled after a newer one must not undo it."""
    import app

    class Press:
        def __init__(self, value, seq):
            self._data = {"name": "upper", "hp": None, "value": value, "seq": seq}
    pg.act(lambda: pg.select(["upper", "add"]))
    app.on_panel(pg, Press(0.85, 20.0))
    out = app.on_panel(pg, Press(0.95, 10.0))  # pressed first, handled last
    assert pg.weights["upper"] == 0.85 and all(x == app.gr.skip() for x in out[1:])
    app.on_panel(pg, Press(0.5, None))  # an API caller: no stamp, applied
    assert pg.weights["upper"] == 0.5


def test_emptied_prompts_box_gets_the_demo_prompts_back(pg):
    import app

    pg.act(lambda: pg.set_prompts("upper: abc="))
    out = app.on_prompts(pg, "   ")
    assert pg.prompts is None and out[4] == "\n".join(pg.prompt_list()) and "upper: abc=" not in out[4]
    typed = "\n".join(f"upper: w{i}=" for i in range(40))  # over the limit: refused, and the typed text stays
    out = app.on_prompts(pg, typed)  # in the box (it was replaced by the demo prompts: the user's lines were lost)
    assert out[-1].startswith("⚠️") and "prompts" in out[-1] and out[4] == app.gr.skip() and pg.prompts is None


def test_app_handlers(pg, zoo):
    import app

    out = app.on_scenario(pg, "conflicting")
    assert len(out) == 1 + app.N_CONTROLS + app.N_VIEW
    assert "Conflicting tasks" in out[5] and "Claim" in out[5]
    assert out[-1].startswith("**cclip**")
    # refusal: all models deselected -> one warning text, the controls back to the server's state
    out = app.on_select(pg, [])
    assert out[-1].startswith("⚠️") and "select at least one" in out[-1]
    assert out[1].value == pg.selected and pg.selected
    # typed λ = 9 comes back as 8, the top of the range
    out = app.on_lambda(pg, 9.0)
    assert out[3].value == 8.0 and "λ = 8" in out[-1]
    # a stale hyperparameter widget of another method does nothing
    out = app.on_hyper(pg, 0.3, name="density", method="ties")
    assert all(isinstance(x, dict) or x is pg for x in out[1:])  # gr.skip() updates only
    pg.set_method("fedgma")
    out = app.on_hyper(pg, 7.0, name="rho", method="fedgma")  # clamped to [0, 1]
    assert pg.hyper_value("rho") == 1.0
    # a refused model stays in the Models tab: every Merge-tab output is skipped
    out = app.on_add(pg, "/etc", "", "(none)")
    assert out[-1].startswith("⚠️") and all(isinstance(x, dict) for x in out[1:-1])
    out = app.on_add(pg, str(zoo / "upper"), "", "(none)")
    assert "already listed" in out[-1]
    # a fine-tune as the base: its own task vector is zero, and the page says so (was: silently)
    with pytest.warns(UserWarning, match="upper: identical to the base"):
        out = app.on_base(pg, str(zoo / "upper"))
    assert out[-1].startswith("Base model:")


def test_live_api_named_arguments(pg):
    import app

    out = app.live_api(pg, ["upper", "add"], "fedgma", 1.2, [0.5, 1.0], {"rho": 0.3}, "add: 1+2=")
    data = out[-1]
    assert data["headers"] == ["prompt", "expected", "base", "upper", "add", "merged"]
    assert pg.session.settings.hyper == {"rho": 0.3} and pg.session.settings.weights == (0.5, 1.0)
    out = app.live_api(pg, ["upper", "add", "sort"], "slerp", 1.0, [], {}, "")
    assert out[-2].startswith("⚠️") and "slerp" in out[-2]
    # a model named twice (was: merged once, its second weight dropped) and a per-model list that does not
    # match the selection (was: cut to it) are refused, and nothing changes
    out = app.live_api(pg, ["upper", "upper"], "task_arithmetic", 1.0, [1.0, 0.5], {}, "")
    assert out[-2] == "⚠️ models: 'upper' given twice"
    out = app.live_api(pg, ["upper", "add"], "ties", 1.0, [], {"density": [0.5] * 1000}, "")
    assert out[-2] == "⚠️ density: 1000 values given for 2 selected models"
    assert pg.session.settings.hyper == {"rho": 0.3} and pg.session.settings.weights == (0.5, 1.0)
    out = app.live_api(pg, ["upper", "add"], "ties", 1.0, [], {"density": [0.5, 0.7]}, "")
    assert not out[-2].startswith("⚠️") and pg.session.settings.hyper["density"] == [0.5, 0.7]


def test_takeaway_reproduces(pg, tmp_path):
    import app
    from evaluation.playground import model_card

    pg.act(lambda: (pg.select(["upper", "add"]), pg.set_method("fedgma"), pg.set_hyper("rho", 0.4),
                    pg.set_weight("add", 0.7), pg.set_lambda(0.9)))
    card = model_card(pg)
    assert "λ = 0.9" in card and "| 0.7 |" in card and "`rho` = 0.4" in card and "Live scores" in card
    path = app.do_zip(pg, progress=lambda *a, **k: None)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        cfg = yaml.safe_load(z.read("merge_config.yml"))
        readme = z.read("README.md").decode()
    assert {"config.json", "merge_config.yml", "README.md", "model.safetensors"} <= names
    assert any(n.startswith("tokenizer") for n in names)
    assert cfg["merge_method"] == "fedgma" and cfg["parameters"]["lambda"] == 0.9 and cfg["parameters"]["rho"] == 0.4
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [1.0, 0.7]
    assert not any(str(m["model"]).startswith("/") for m in cfg["models"]) and not cfg["base_model"].startswith("/")
    assert "Live scores" in readme
    shutil.rmtree(Path(path).parent, ignore_errors=True)


def test_landscape_and_click(pg, zoo):
    import app
    from evaluation import landscape

    pg.act(lambda: pg.select(["upper", "add"]))
    settings = pg.session.settings
    before = {n: p.detach().clone() for n, p in pg.session.live_model.targets.items()}
    ls = pg.compute_landscape(grid=[0.0, 0.5, 1.0], n=4)
    assert ls.accuracy["upper"].shape == (3, 3) and ls.current == (pg.lam, pg.lam)
    html = landscape.to_html(ls)
    assert html.count("data-a=") == 3 * 3 * 3  # upper, add and the mean
    # its merges ran on a scratch model: the user's merge is untouched, not merged again
    assert pg.session.settings is settings and settings.weights == (1.0, 1.0)
    assert all(torch.equal(before[n], p) for n, p in pg.session.live_model.targets.items())

    class Evt:
        _data = {"a": 0.5, "b": 1.0}
    out = app.on_landscape_click(pg, Evt())
    assert pg.method == "task_arithmetic" and pg.lam == 1.0 and pg.weight_list() == [0.5, 1.0]
    assert "λ = 1," in out[-1]
    # the selection changed since: a click merges the landscape's own two models (it merged the new pair)
    pg.act(lambda: pg.select(["add", "sort"]))
    out = app.on_landscape_click(pg, Evt())
    assert pg.selected == ["upper", "add"] and pg.weight_list() == [0.5, 1.0], pg.selected
    assert out[1].value == ["upper", "add"] and "2 model(s)" in out[-1]
    pg.session.set_base(str(zoo / "sort"))  # another base: its task vectors are others, the landscape stale
    out = app.on_landscape_click(pg, Evt())
    assert out[-1] == "⚠️ landscape: it was computed for upper × add on another base model or model list; run it again"
    pg.select(["upper", "add", "sort"])
    with pytest.raises(MergeError, match="exactly two"):
        landscape.compute(pg)


def test_long_jobs_estimate_and_cancel(pg):
    import app
    from evaluation.playground import Cancelled
    from evaluation.search import search

    pg.act()
    text = app.job_estimate(pg, "compare")
    assert text.startswith("⏳ About") and " merges, ~" in text and "Cancel" in text
    pg.cancel.set()
    with pytest.raises(Cancelled):
        search(pg.session, "task_arithmetic", progress=pg.progress_checker())
    pg.cancel.clear()
    out = app.do_sweep(pg, progress=lambda *a, **k: None)
    assert "Best λ" in out[-1]


def test_a_job_asked_for_holds_its_slot_until_it_runs(pg, zoo):
    """Long jobs wait in one server-wide queue: a session's second request is refused when asked for (not
    run after the first), Cancel reaches a job still waiting, and Cancel with nothing running changes nothing."""
    import gradio as gr

    import app
    from evaluation.session import Session

    pg.act()
    no_progress = {"progress": lambda *a, **k: None}
    assert app.do_cancel(pg) == gr.skip() and not pg.cancel.is_set()  # idle: the last result stays
    assert app.ask_job(pg, "sweep").startswith("⏳ About")
    with pytest.raises(gr.Error, match="already has a long job running or waiting"):
        app.ask_job(pg, "compare")
    assert app.do_cancel(pg).startswith("Cancelled before it started")  # pressed while the sweep waits
    assert not pg.session.busy  # its slot is free at once
    assert app.do_sweep(pg, **no_progress) == gr.skip()  # the queue reaches it: it does nothing
    assert not pg.session.busy and not pg.cancel.is_set()
    app.ask_job(pg, "sweep")  # the next request runs
    assert "Best λ" in app.do_sweep(pg, **no_progress)[-1]
    # a handler that returns before its job starts (here: a refusal) gives the slot back too
    app.ask_job(pg, "task_count", ["task_arithmetic"], 1)
    assert app.do_task_count(pg, ["slerp"], 1, **no_progress)[-1].startswith("⚠️ choose at least one")
    assert not pg.session.busy
    # another visitor's running job: this request says it waits for it
    other = Session(cache=StackCache(2 ** 30), zoo=zoo, allow_hub=False)
    with other.job("compare all", serial=True):
        text = app.ask_job(pg, "sweep")
    assert "Waiting first for 1 long job(s) of other visitors" in text
    pg.session.leave_queue()
    with other.job("export"):  # not a search: nothing waits for it
        assert "Waiting" not in app.ask_job(pg, "sweep")
    pg.session.leave_queue()
    assert "Waiting" not in app.ask_job(pg, "sweep")
    pg.session.leave_queue()


def test_cancel_of_a_job_waiting_behind_another_visitors_frees_its_slot_at_once(pg, zoo):
    """A job cancelled while it waits behind another visitor's search gives its slot back at once (it held it
    until that search ended: a new request was refused meanwhile); when the queue reaches it, it does nothing
    and the newer request runs."""
    import gradio as gr

    import app
    from evaluation.session import Session

    pg.act()
    no_progress = {"progress": lambda *a, **k: None}
    other = Session(cache=StackCache(2 ** 30), zoo=zoo, allow_hub=False)
    with other.job("compare all", serial=True):  # another visitor's search runs
        assert "Waiting first for 1" in app.ask_job(pg, "sweep")
        said = app.do_cancel(pg)
        assert "Waiting first for 1" in app.ask_job(pg, "sweep")  # was: "already has a long job running or waiting"
        assert said.startswith("Cancelled before it started")
        with pytest.raises(gr.Error, match="already has a long job"):  # the new one holds the slot
            app.ask_job(pg, "compare")
    # the other search ended: the queue runs the cancelled request first (nothing), then the new one
    assert app.do_sweep(pg, **no_progress) == gr.skip()
    assert pg.session.busy
    assert "Best λ" in app.do_sweep(pg, **no_progress)[-1]
    assert not pg.session.busy and not pg.cancel.is_set()
    # Cancel of a running job still stops it at its next check
    app.ask_job(pg, "sweep")
    assert pg.dequeue()
    with pg.session.job("λ sweep", serial=True):
        assert app.do_cancel(pg) == "Cancelling…" and pg.cancel.is_set()


def test_auto_tune_result_goes_to_the_setup_it_tuned(pg):
    """Live changes go on while auto-tune runs; its result is the tuned selection, aggregator and coefficients
    with the tuned λ (it was put onto whatever the user had switched to meanwhile: here another pair and
    aggregator, which the tuned λ and ρ were never tried on)."""
    import re

    import app

    pg.act(lambda: (pg.select(["upper", "add"]), pg.set_method("fedgma"), pg.set_weight("add", 0.5)))
    switched = []

    def user_meanwhile(*a, **k):  # the page's live events run beside the job
        if not switched:
            switched.append(pg.act(lambda: (pg.select(["add", "sort"]), pg.set_method("ties"))))
    out = app.do_autotune(pg, progress=user_meanwhile)
    assert switched and "Auto-tuned **fedgma**" in out[-1]
    tuned = float(re.search(r"λ=([0-9.]+)", out[-1]).group(1))
    assert (pg.selected, pg.method, pg.weight_list(), pg.lam) == (["upper", "add"], "fedgma", [1.0, 0.5], tuned)
    s = pg.session.settings
    assert s.method == "fedgma" and s.weights == (1.0, 0.5) and s.lam == tuned and "rho" in s.hyper


def test_learn_text():
    from evaluation import scenarios
    from evaluation.learn import learn_markdown

    text = learn_markdown(scenarios.load())
    assert "λ = 1/K" in text and "data-size weights are the wᵢ" in text and "?scenario=" in text
    assert "`other`" in text


def test_scenario_file_is_checked(tmp_path):
    from evaluation import scenarios

    good = json.loads(scenarios.scenarios_path().read_text())
    assert len(good["scenarios"]) >= 4
    bad = dict(good["scenarios"][0], claim={"kind": "nope"})
    with pytest.raises(MergeError, match="claim kind"):
        scenarios.parse(bad)
    with pytest.raises(MergeError, match="unknown"):
        scenarios.parse(dict(good["scenarios"][0], method="avg"))
    with pytest.raises(MergeError, match="exactly 2|at most 2"):
        scenarios.parse(dict(good["scenarios"][0], method="slerp", models=["a", "b", "c"]))
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"scenarios": [good["scenarios"][0], good["scenarios"][0]]}))
    with pytest.raises(MergeError, match="share an id"):
        scenarios.load(f)


def test_task_count_estimate_and_bounds(pg):
    import app

    pg.act(lambda: pg.select(["upper", "add", "sort"]))
    # two groups of two (of three), one of three; slerp is left out
    assert app.job_estimate(pg, "task_count", ["task_arithmetic", "slerp"], 2).startswith(f"⏳ About {3 * 11} merges")
    for bad in (0, 21, "x", None):  # refused before any work, in words
        out = app.do_task_count(pg, ["task_arithmetic"], bad, progress=lambda *a, **k: None)
        assert out[-1].startswith("⚠️ groups per size") and "between 1 and 20" in out[-1], (bad, out)
    assert set(pg.selected) == {"upper", "add", "sort"}


def test_study_estimate_and_cancel(pg, monkeypatch):
    import app
    from evaluation.playground import Playground

    pg.act(lambda: pg.select(["upper", "add", "sort"]))
    text = app.job_estimate(pg, "study", ["task_arithmetic", "slerp"])  # slerp is left out of the study
    assert text.startswith(f"⏳ About {(3 + 3) * 1 * 11} merges")
    # Cancel pressed while the job runs (here: as it starts): it stops at the next check, selection restored
    real = Playground.progress_checker

    def pressed(self, progress=None):
        self.cancel.set()
        return real(self, progress)
    monkeypatch.setattr(Playground, "progress_checker", pressed)
    out = app.do_study(pg, ["task_arithmetic"], progress=lambda *a, **k: None)
    assert out[-1].startswith("Cancelled")
    assert set(pg.selected) == {"upper", "add", "sort"}


@pytest.mark.slow  # the shipped zoo's seven fine-tunes and one search: about 30 s
def test_auto_tune_keeps_lambda_within_the_slider():
    """Auto-tune's λ is one the λ slider holds, so the Merge tab shows the merge it reports: the search stretches
    the averaging aggregators' grid by K (to 14 for seven fine-tunes), and median at weights 0.4 was tuned to
    λ = 11.2 and then shown clamped at 8."""
    import re

    import app
    from evaluation.limits import LAMBDA_RANGE
    from evaluation.playground import Playground
    from evaluation.session import Session
    from tests.shipped_app import ZOO

    pg = Playground.open(Session(cache=StackCache(2 ** 30), zoo=ZOO, allow_hub=False))
    pg.select(["reverse", "upper", "sort", "sort_desc", "add", "is_even", "is_odd"])
    pg.set_method("median")
    for name in pg.selected:
        pg.set_weight(name, 0.4)
    assert max(pg.tune_lambdas()) * 7 <= LAMBDA_RANGE[1] and max(pg.tune_lambdas("task_arithmetic")) == 2.0
    out = app.do_autotune(pg, progress=lambda *a, **k: None)
    tuned = float(re.search(r"λ=([0-9.]+)", out[-1]).group(1))
    assert tuned <= LAMBDA_RANGE[1] and pg.lam == tuned == pg.session.settings.lam, out[-1]
    pg.close()


def test_karcher_iterations_are_capped_in_the_app(pg):
    """Karcher's max_iter goes to 1000 in the registry (the CLI, as mergekit), but each iteration is a pass
    over every model: one live merge of 1000 on the zoo took 29 s and held a live slot. The app offers 100."""
    from evaluation.limits import LIVE_CAPS
    from merging.errors import MergeError
    from merging.registry import AGGREGATORS

    assert AGGREGATORS["karcher"].param("max_iter").high == 1000 and LIVE_CAPS[("karcher", "max_iter")] == 100
    pg.act(lambda: (pg.select(["reverse", "upper"]), pg.set_method("karcher")))
    assert pg.set_hyper("max_iter", 1000) == 100  # the box clamps, as every bounded widget does
    with pytest.raises(MergeError, match=r"^max_iter: at most 100 here .*up to 1000"):
        pg.check_api(["reverse", "upper"], "karcher", 1.0, [1, 1], {"max_iter": 500}, "")
    pg.check_api(["reverse", "upper"], "karcher", 1.0, [1, 1], {"max_iter": 100}, "")
