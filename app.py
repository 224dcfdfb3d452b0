"""FedMerge Playground: merge fine-tuned models live, with Federated Learning's aggregators.

`python app.py` serves it on 127.0.0.1 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT), offline, on
the built-in zoo (FEDMERGE_ZOO), merging and decoding on a GPU when torch sees one
(FEDMERGE_DEVICE=cpu|cuda|cuda:N|auto, default auto). This file only lays out and wires; the
handlers below are plain functions over an `evaluation.playground.Playground` (unit-tested in tests/test_app_handlers.py),
and the work lives in evaluation/ and merging/.

One merge per user action: every control fires on `.input` (user changes only, never the
programmatic updates a scenario or page load makes) with trigger_mode="always_last", sends only
the value it changed, and the server holds the rest. The per-model sliders are native range inputs
in one HTML panel (drawn server-side for the current selection, however many models; their `change`
fires once per release or key press); each aggregator's widgets are built once from the registry
and only the current method's group is visible.
"""
from __future__ import annotations

import os

for _k, _v in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_k, _v)

import contextvars  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from evaluation import heterogeneity, landscape, limits, plots, scenarios, task_count  # noqa: E402
from evaluation.learn import learn_markdown  # noqa: E402
from evaluation.playground import (DEFAULT_LAMBDA, DEFAULT_METHOD, LAMBDA_RANGE, OUTPUTS_CSS,  # noqa: E402
                                   PANEL_CSS, PANEL_JS, Cancelled, Playground, View, add_model, method_label,
                                   model_card, panel_html)
from evaluation.search import (QUICK_LAMBDAS, SEARCH_N, compare_all, comparison_chart,  # noqa: E402
                               comparison_table, eval_cost_ratio, hyper_grid, search, sweep)
from evaluation.session import SESSIONS, default_threads, push_to_hub, read_zoo  # noqa: E402
from evaluation.tasks import TASKS  # noqa: E402
from merging.errors import MergeError  # noqa: E402
from merging.registry import AGGREGATORS  # noqa: E402

SESSION_TTL = limits.current().session_ttl
log = logging.getLogger("fedmerge.app")


class ClampedSlider(gr.Slider):
    """A slider whose typed-in value is clamped to its range before the handler sees it (Gradio's own
    refuses it with an error badge on every output); the handler then writes the clamped value back."""

    is_template = True  # drawn by the ordinary slider

    def preprocess(self, payload: float | None) -> float | None:
        try:
            x = float(payload)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):  # a cleared box, or a number past float's range (sent as null): no value, so the
            return None           # handler keeps λ (a hyperparameter: its default) and writes it back
        return super().preprocess(min(max(x, self.minimum), self.maximum))


# ---------------------------------------------------------------------------- handlers (plain functions)

N_VIEW = 4  # table, accuracy plot, heatmap, status
# every aggregator's hyperparameter widget, in registry order (per-model optional ones: an "auto" checkbox)
HYPER_SLOTS = [(m, p) for m, agg in AGGREGATORS.items() for p in agg.params]
N_CONTROLS = 6 + len(AGGREGATORS) + len(HYPER_SLOTS)  # models, method, λ, prompts, scenario, panel, groups, widgets


def read_zoo_root():
    from evaluation.session import zoo_dir

    return zoo_dir()


def message(exc: Exception, action: str = "", typed=()) -> str:
    """What the user reads: one line, our own MergeError text without server paths; anything else a
    plain sentence (traceback in the log)."""
    return limits.user_message(exc, read_zoo_root(), action, typed)


_HOLDS: contextvars.ContextVar[ExitStack | None] = contextvars.ContextVar("fedmerge_holds", default=None)


def _hold(session) -> None:
    """Mark `session` at work until the current request ends (it is not closed to make room meanwhile); refused,
    with the reason, when it was closed."""
    holds = _HOLDS.get()
    if holds is not None:
        holds.enter_context(session.use())


NO_SESSION = ("this page has no session on the server (it ended, or the server was full when the page loaded); "
              "reload the page")


def _guard(fn):
    """Any error a handler lets through reaches the user as one gr.Error line: no repr, errno or server path.
    The session the handler works on (its first argument) is held for the request; a closed one says why, and so
    does a missing one where the handler needs one (its first parameter is a `Playground`, not optional)."""
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    needs_session = first is not None and first.annotation in ("Playground", Playground)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with ExitStack() as holds:
                token = _HOLDS.set(holds)
                try:
                    if args and isinstance(args[0], Playground):
                        _hold(args[0].session)
                    elif needs_session and args and args[0] is None:
                        raise MergeError(NO_SESSION)
                    return fn(*args, **kwargs)
                finally:
                    _HOLDS.reset(token)
        except gr.Error:
            raise
        except Exception as exc:
            typed = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]  # shown as typed
            raise gr.Error(message(exc, fn.__name__, typed)) from None
    return wrapper


def warn(exc: Exception) -> str:
    text = message(exc)
    gr.Warning(text)
    return f"⚠️ {text}"


def view_out(view: View | None) -> list:
    return [view.table, view.accuracy, view.heat, view.status] if view is not None else [gr.skip()] * N_VIEW


def scenario_markdown(pg: Playground) -> str:
    sc = pg.scenario
    if sc is None:
        return ("**Scenarios**: each button sets up a merge that teaches one thing (link one with "
                "`?scenario=<id>`). Or pick models, an aggregator and λ yourself.")
    text = f"### {sc.title}\n{sc.explain}\n\n**Claim** (checked by a test on the shipped zoo): {sc.claim_text()}."
    changed = pg.scenario_changes()
    if changed:
        text += (f"\n\n✎ *You changed {', '.join(changed)} since the scenario set this merge up: the claim is about "
                 "its own setup, which its button above restores.*")
    return text


def hyper_updates(pg: Playground) -> list:
    """Visibility of each aggregator's group and the current value of every hyperparameter widget."""
    out: list = [gr.Group(visible=m == pg.method) for m in AGGREGATORS]
    for m, p in HYPER_SLOTS:
        if p.per_model and p.optional:
            out.append(gr.Checkbox(value=not isinstance(pg.hyper.get(m, {}).get(p.name), dict)))
        else:
            out.append(gr.update(value=pg.hyper_value(p.name, m)))
    return out


def controls_out(pg: Playground, render: bool = True, prompts: bool = True, models: bool = True) -> list:
    """Every Merge-tab control from the playground's state (`render`: also the panel and the method's widgets;
    `models`: the checkboxes too; not after the user's own click, which may be followed by more clicks)."""
    names = [s.name for s in pg.session.specs]
    out = [gr.CheckboxGroup(choices=names, value=pg.selected) if models else gr.skip(), gr.update(value=pg.method),
           gr.Slider(value=pg.lam), "\n".join(pg.prompt_list()) if prompts else gr.skip(), scenario_markdown(pg)]
    if render:
        return [*out, panel_html(pg), *hyper_updates(pg)]
    return [*out, *[gr.skip()] * (N_CONTROLS - len(out))]


def skip_controls() -> list:
    return [gr.skip()] * N_CONTROLS


def ensure(pg: Playground | None, progress=None) -> Playground:
    """This request's playground: a new one on a page's first request, in a place SESSIONS makes for it (held at
    work until the request ends, like the one _guard holds)."""
    if pg is None:
        with SESSIONS.place() as add:
            pg = Playground.open(progress=progress)
            _hold(pg.session)
            add(pg.session)
    return pg


@_guard
def on_load(pg: Playground | None, request: gr.Request | None = None, progress=gr.Progress()) -> list:
    """Page load: open the zoo, apply ?scenario=<id>, merge once; the render draws the sliders."""
    try:
        pg = ensure(pg, progress=lambda f, d: progress(f, desc=d))
    except Exception as exc:
        return [pg, *skip_controls(), *[gr.skip()] * 3, warn(exc)]
    sid = request.query_params.get("scenario") if request is not None else None
    note = None
    if sid:
        try:
            pg.apply_scenario(scenarios.by_id(sid))
        except Exception as exc:
            note = warn(exc)
    if pg.scenario is None:  # the first screen shows a merge that works: the first scenario
        first = _first_scenario(pg)
        if first is not None:
            pg.apply_scenario(first)
    try:
        view = pg.act()
    except Exception as exc:
        return [pg, *controls_out(pg), *[gr.skip()] * 3, warn(exc)]
    out = [pg, *controls_out(pg), *view_out(view)]
    if note:
        out[-1] = f"{note}\n\n{out[-1]}"
    return out


def run(pg: Playground, change=None, render: bool = False, prompts: bool = False, models: bool = True) -> list:
    """Apply one change and merge once (`render`: the selection or method changed, redraw the controls).
    On a refusal every control goes back to the server's state, with one warning."""
    try:
        view = pg.act(change)
    except Exception as exc:
        return [pg, *controls_out(pg, render=True, prompts=False), *[gr.skip()] * 3, warn(exc)]
    controls = controls_out(pg, render=True, prompts=prompts, models=models) if render else skip_controls()
    controls[4] = scenario_markdown(pg)  # the claim's header says when the setup has left the scenario's
    return [pg, *controls, *view_out(view)]


@_guard
def on_scenario(pg: Playground | None, scenario_id: str) -> list:
    pg = ensure(pg)
    try:
        sc = scenarios.by_id(scenario_id)
    except Exception as exc:
        return [pg, *skip_controls(), *[gr.skip()] * 3, warn(exc)]
    return run(pg, partial(pg.apply_scenario, sc), render=True, prompts=True)


@_guard
def on_select(pg: Playground, names: list[str]) -> list:
    return run(pg, partial(pg.select, names or []), render=True, prompts=pg.prompts is None, models=False)


@_guard
def on_method(pg: Playground, method: str) -> list:
    return run(pg, partial(pg.set_method, method), render=True)


@_guard
def on_lambda(pg: Playground, value: float) -> list:
    out = run(pg, partial(pg.set_lambda, value))
    out[3] = gr.Slider(value=pg.lam)  # the clamped value back into the widget
    return out


@_guard
def on_panel(pg: Playground, evt: gr.EventData) -> list:
    """A coefficient slider or a per-model hyperparameter box of the panel: {name, value, hp}."""
    data = getattr(evt, "_data", None) or {}
    name, value, hp = data.get("name"), data.get("value"), data.get("hp")
    if not pg.newest_input((hp, name), data.get("seq")):  # an older key press, handled after a newer one
        return [pg, *skip_controls(), *view_out(None)]
    if hp:
        out = run(pg, partial(pg.set_hyper, hp, value, name))
        out[6] = panel_html(pg)  # the checked (clamped) value back into its box
        return out
    return run(pg, partial(pg.set_weight, str(name), value))


def _first_scenario(pg: Playground):
    """The scenario file's first entry when this zoo has its models (a custom zoo may not)."""
    try:
        first = scenarios.load()[0]
    except Exception:
        return None
    known = {spec.name for spec in pg.session.specs}
    return first if set(first.models) <= known else None


@_guard
def on_hyper(pg: Playground, value: Any, name: str, method: str) -> list:
    if method != pg.method:  # a stale widget of another method: ignore
        return [pg, *skip_controls(), *view_out(None)]
    out = run(pg, partial(pg.set_hyper, name, value))
    i = 1 + 6 + len(AGGREGATORS) + [(m, p.name) for m, p in HYPER_SLOTS].index((method, name))
    out[i] = gr.update(value=pg.hyper_value(name))  # clamped
    return out


@_guard
def on_auto(pg: Playground, auto: bool, name: str, method: str) -> list:
    if method != pg.method:
        return [pg, *skip_controls(), *view_out(None)]
    return run(pg, partial(pg.set_auto, name, bool(auto)), render=True)


@_guard
def on_prompts(pg: Playground, text: str) -> list:
    out = run(pg, partial(pg.set_prompts, text))
    if not (text or "").strip():  # emptied: the demo prompts it now shows are back in the box (a refused
        out[4] = "\n".join(pg.prompt_list())  # text stays, with its warning, for the user to shorten)
    return out


@_guard
def on_landscape_click(pg: Playground, evt: gr.EventData) -> list:
    data = getattr(evt, "_data", None) or {}
    a, b = data.get("a"), data.get("b")
    if a is None or b is None:
        return [pg, *skip_controls(), *view_out(None)]
    return run(pg, partial(pg.click_landscape, a, b), render=True, prompts=pg.prompts is None)


@_guard
def live_api(pg: Playground | None, selection: list[str], method: str, lam: float, weights: list[float],
             hyper: dict, prompts: str) -> list:
    """The /live endpoint for gradio_client users: named, typed arguments; one merge.

    selection: fine-tune names (empty = keep); weights: one per selected model, in selection order
    (missing ones keep theirs); hyper: the method's hyperparameters by registry name."""
    pg = ensure(pg)
    try:  # every argument checked against its bound before any work; a refusal is one line in the status
        selection, method, lam, weights, hyper, prompts = pg.check_api(selection, method, lam, weights, hyper, prompts)
    except MergeError as exc:
        return [pg, gr.skip(), gr.skip(), gr.skip(), f"⚠️ {message(exc)}", None]

    def change():
        if selection:
            pg.session.select(selection)
        pg.set_method(method)
        pg.set_lambda(lam)
        for name, w in zip(pg.selected, weights or []):
            pg.set_weight(name, w)
        pg.hyper[pg.method] = {}
        for k, v in (hyper or {}).items():
            if isinstance(v, (list, tuple)):
                for name, x in zip(pg.selected, v):
                    pg.set_hyper(k, x, name)
            else:
                pg.set_hyper(k, v)
        pg.set_prompts(prompts)
    try:
        view = pg.act(change)
    except Exception as exc:
        return [pg, gr.skip(), gr.skip(), gr.skip(), f"⚠️ {message(exc)}", None]
    res = view.result
    data = {"headers": res.headers, "rows": res.rows, "accuracy": res.accuracy, "normalized": res.normalized}
    return [pg, *view_out(view), data]


@_guard
def hetero(pg: Playground | None, layer_name: str, metric_name: str) -> list:
    try:
        pg = ensure(pg)
        rep = pg.session.similarity(with_merged=False)
    except Exception as exc:
        warn(exc)
        return [gr.skip()] * 4
    hm = plots.similarity_heatmap(rep, None if layer_name == "whole model" else layer_name, metric_name)
    choices = ["whole model", *rep.layers]
    return [hm, plots.norms_chart(rep), plots.layer_similarity_heatmap(rep) if len(rep.names) > 1 else None,
            gr.Dropdown(choices=choices, value=layer_name if layer_name in choices else "whole model")]


# ---------------------------------------------------------------------------- long jobs

@_guard
def job_estimate(pg: Playground | None, kind: str, methods: list[str] | None = None, per_size: Any = None) -> str:
    """Before a long job: how many merges, about how long, and that Cancel stops it."""
    pg = ensure(pg)
    k = len(pg.selected)
    if kind == "sweep":
        n, n_val = len(QUICK_LAMBDAS) + 1, SEARCH_N
    elif kind == "autotune":
        n, n_val = len(hyper_grid(pg.method)) * len(pg.tune_lambdas()) + 1, SEARCH_N
    elif kind == "landscape":
        n, n_val = len(landscape.GRID) ** 2, None
    elif kind in ("study", "task_count"):
        if kind == "study":  # pairs, then the leave-one-out groups
            sizes = [2] * (k * (k - 1) // 2) + ([k - 1] * k if k > 2 else [])
        else:
            per_group = _per_size(per_size)
            sizes = [j for j in range(2, k + 1) for _ in range(min(math.comb(k, j), per_group))]
        m = len([x for x in (methods or heterogeneity.DEFAULT_METHODS) if AGGREGATORS[x].max_models is None])
        evals = m * (len(heterogeneity.STUDY_LAMBDAS) + 1)
        # a group scores only its own tasks: its merges cost |group|/k of one over the whole selection
        seconds = evals * sum(sizes) / max(k, 1) * pg.seconds_per_eval(12) * eval_cost_ratio()
        return (f"⏳ About {len(sizes) * evals} merges, ~{max(1, round(seconds))} s on this machine. "
                "**Cancel** stops it.")
    else:
        ok = [m for m in AGGREGATORS if _fits(m, k)]
        n, n_val = sum(len(hyper_grid(m, quick=True)) * len(QUICK_LAMBDAS) + 1 for m in ok), SEARCH_N
    per = pg.seconds_per_eval(n_val or 12) * (eval_cost_ratio() if kind != "landscape" else 1.0)
    return f"⏳ About {n} merges, ~{max(1, round(n * per))} s on this machine. **Cancel** stops it."


JOB_NAMES = {"sweep": "λ sweep", "autotune": "auto-tune", "compare": "compare all", "landscape": "landscape",
             "study": "heterogeneity study", "task_count": "task-count curve"}


@_guard
def ask_job(pg: Playground | None, kind: str, methods: list[str] | None = None, per_size: Any = None) -> str:
    """A long job's button: the estimate, then this session's job slot is taken (a second job is refused here,
    before it waits in the server's queue) and Cancel is armed for it."""
    pg = ensure(pg)
    text = job_estimate(pg, kind, methods, per_size)
    others = pg.request_job(JOB_NAMES[kind])
    if others:
        text += (f" Waiting first for {others} long job(s) of other visitors: long jobs run one at a time on "
                 "this server.")
    return text


def _fits(method: str, k: int) -> bool:
    agg = AGGREGATORS[method]
    return agg.accepts(k)


def _dequeued(fn):
    """A long job's handler: the request ask_job reserved leaves the queue as the handler starts, whatever
    the handler does next (API calls reserve nothing; then this does nothing). One that Cancel dropped while it
    waited changes nothing on the page (a newer job of this session may be showing its estimate there)."""
    @functools.wraps(fn)
    def wrapper(pg, *args, **kwargs):
        if pg is not None and not pg.dequeue():
            return gr.skip()
        return fn(pg, *args, **kwargs)
    return wrapper


def _job(pg: Playground, what: str, fn, progress, check: bool = True):
    """A long job: the current request validated first, at most FEDMERGE_MAX_JOBS per session, stoppable
    (also by a Cancel pressed while it waited in the queue)."""
    if check:
        pg.session.check_request(pg.method, pg.weight_list(), pg.lam, pg.hyper_values())
    try:
        with pg.session.job(what, serial=True):
            if pg.cancel.is_set():  # pressed while the job waited
                raise Cancelled("cancelled")
            return fn(pg.progress_checker(lambda f, d: progress(f, desc=d)))
    finally:
        if not pg.session.busy:  # Cancel is armed again by the next request
            pg.cancel.clear()


@_guard
@_dequeued
def do_sweep(pg: Playground, progress=gr.Progress()) -> list:
    try:
        r = _job(pg, "λ sweep", lambda tick: sweep(pg.session, pg.method, pg.weight_list(), pg.hyper_values(), progress=tick),
                 progress)
    except Cancelled:
        return [gr.skip(), "Cancelled: the λ sweep stopped."]
    except Exception as exc:
        return [gr.skip(), warn(exc)]
    fig = plots.lambda_sweep(r.lambdas, r.curves, r.best_lambda, title=f"λ sweep: {pg.method} (validation)")
    return [fig, f"Best λ for **{pg.method}** at these settings: **{r.best_lambda:g}** (mean normalized validation "
                 f"accuracy {r.best_score:.0%}; test {r.test_normalized.get('mean', float('nan')):.0%})."]


@_guard
@_dequeued
def do_autotune(pg: Playground, progress=gr.Progress()) -> list:
    """Tune λ and the method's grid; the sliders then hold the best setting (one merge to show it)."""
    meth, sel, weights = pg.method, pg.selected, pg.weight_list()  # the setup tuned (live changes go on meanwhile)
    try:
        fixed = {k: v for k, v in pg.hyper_values().items() if isinstance(v, list)}
        r = _job(pg, "auto-tune", lambda tick: search(pg.session, meth, weights, fixed=fixed,
                                                      lambdas=pg.tune_lambdas(meth), progress=tick), progress)
    except Cancelled:
        return [pg, *skip_controls(), *view_out(None), gr.skip(), "Cancelled: auto-tune stopped; nothing changed."]
    except Exception as exc:
        return [pg, *skip_controls(), *view_out(None), gr.skip(), warn(exc)]

    def change():
        pg.set_setup(sel, meth, weights)
        pg.set_lambda(r.best_lambda)
        for k, v in r.best_hyper.items():
            if not isinstance(v, list):
                pg.set_hyper(k, v)
    out = run(pg, change, render=True, prompts=pg.prompts is None)
    fig = plots.lambda_sweep(r.lambdas, r.curves, r.best_lambda, title=f"Auto-tune: {meth} (validation)")
    md = (f"Auto-tuned **{meth}**: {r.describe()}: mean normalized accuracy {r.best_score:.0%} on validation, "
          f"**{r.test_normalized.get('mean', float('nan')):.0%} on test** ({r.evaluations} merges, "
          f"{r.seconds:.0f} s). The Merge tab now holds this setting.")
    return [*out, fig, md]


@_guard
@_dequeued
def do_compare(pg: Playground, progress=gr.Progress()) -> list:
    k = len(pg.selected)
    skipped = []
    for m in AGGREGATORS:
        if not _fits(m, k):
            try:
                AGGREGATORS[m].check_model_count(k)
            except MergeError as exc:
                skipped.append(f"`{m}` ({exc})")
    methods = [m for m in AGGREGATORS if _fits(m, k)]
    failed: list[tuple[str, str]] = []  # could not run on this selection (e.g. a zero task vector)
    try:
        results = _job(pg, "compare all", lambda tick: compare_all(pg.session, methods, weights=pg.weight_list(),
                                                                   progress=tick, failed=failed), progress)
    except Cancelled:
        return [gr.skip(), gr.skip(), "Cancelled: the comparison stopped."]
    except Exception as exc:
        return [gr.skip(), gr.skip(), warn(exc)]
    headers, rows = comparison_table(results)
    note = f" Skipped: {'; '.join(skipped)}." if skipped else ""
    if failed:
        note += " Could not run: " + "; ".join(f"**{m}** ({message(MergeError(e))})" for m, e in failed) + "."
    return [gr.Dataframe(value=pd.DataFrame(rows, columns=headers), visible=True), comparison_chart(results),
            f"Compared {len(results)} aggregators (λ step 0.1, coarse hyperparameter grids).{note}"]


@_guard
@_dequeued
def do_landscape(pg: Playground, progress=gr.Progress()) -> list:
    try:
        ls = _job(pg, "landscape", lambda tick: pg.compute_landscape(progress=tick), progress)
    except Cancelled:
        return [gr.skip(), "Cancelled: the landscape stopped."]
    except Exception as exc:
        return [gr.skip(), warn(exc)]
    return [landscape.to_html(ls), f"Landscape of **{ls.names[0]}** × **{ls.names[1]}**: {ls.seconds:.1f} s."]


def _per_size(value: Any) -> int:
    return int(limits.check_number("groups per size", value, 1, task_count.MAX_PER_SIZE))


def _study_methods(methods_chosen: Any) -> list[str]:
    """The aggregators ticked for the study or the curve: known names, those that take any number of models."""
    if not isinstance(methods_chosen, (list, tuple)):
        raise MergeError("aggregators: expected a list of aggregator names")
    methods_chosen = [limits.check_method(m) for m in methods_chosen]  # before any work
    methods_chosen = [m for m in methods_chosen if AGGREGATORS[m].max_models is None]
    if not methods_chosen:
        raise MergeError("choose at least one aggregator that takes any number of models")
    return methods_chosen


@_guard
@_dequeued
def do_task_count(pg: Playground | None, methods_chosen: list[str], per_size: Any, progress=gr.Progress()) -> list:
    """How many tasks one merge holds, on the current selection (stoppable between its searches)."""
    try:
        methods_chosen, per = _study_methods(methods_chosen), _per_size(per_size)
    except MergeError as exc:
        return [gr.skip(), warn(exc)]
    pg = ensure(pg)
    try:
        curve = _job(pg, "task-count curve", lambda tick: task_count.run(pg.session, methods_chosen, per_size=per,
                                                                          progress=tick), progress, check=False)
    except Cancelled:
        return [gr.skip(), "Cancelled: the curve stopped; the selection is as it was."]
    except Exception as exc:
        return [gr.skip(), warn(exc)]
    return [task_count.figure(curve), task_count.to_markdown(curve)]


@_guard
@_dequeued
def do_study(pg: Playground | None, methods_chosen: list[str], progress=gr.Progress()) -> list:
    """The heterogeneity study on the current selection (stoppable between its searches)."""
    try:
        methods_chosen = _study_methods(methods_chosen)
    except MergeError as exc:
        return [gr.skip(), warn(exc)]
    pg = ensure(pg)
    try:
        study = _job(pg, "heterogeneity study", lambda tick: heterogeneity.run(pg.session, methods_chosen,
                                                                               progress=tick), progress, check=False)
    except Cancelled:
        return [gr.skip(), "Cancelled: the study stopped; the selection is as it was."]
    except Exception as exc:
        return [gr.skip(), warn(exc)]
    return [heterogeneity.scatter_figures(study, methods_chosen), heterogeneity.to_markdown(study, methods_chosen)]


@_guard
def do_cancel(pg: Playground | None) -> Any:
    """Stop this session's running or waiting long jobs; with none, the last result stays on screen."""
    what = pg.cancel_jobs() if pg is not None else None
    if what is None:
        gr.Info("Nothing to cancel: no long job of yours is running or waiting.")
        return gr.skip()
    if what == "queued":
        return "Cancelled before it started (it was waiting for other visitors' jobs); nothing changed."
    return "Cancelling…"


# ---------------------------------------------------------------------------- models tab

@_guard
def on_add(pg: Playground | None, ref: str, name: str, task: str, progress=gr.Progress()) -> list:
    """Add a model; a refusal is a message in the Models tab and nothing else changes."""
    pg = ensure(pg)
    try:
        added = add_model(pg, ref, (name or "").strip() or None, None if task == "(none)" else task,
                          progress=lambda f, d: progress(f, desc=d))
    except Exception as exc:  # what the user typed is shown as typed, other paths never
        return [pg, *skip_controls(), *view_out(None), f"⚠️ {message(exc, 'on_add', [ref, name])}"]
    stack_warnings(pg)
    return [*run(pg, render=True, prompts=pg.prompts is None), f"Added **{added}** ({ref.strip()})."]


def stack_warnings(pg: Playground) -> None:
    """What the models just loaded hold that a merge should know of: a zero task vector, the same weights twice..."""
    for w in pg.session.stack.warnings:
        gr.Warning(w)


@_guard
def on_base(pg: Playground | None, ref: str, progress=gr.Progress()) -> list:
    pg = ensure(pg)
    try:
        pg.session.set_base(ref, progress=lambda f, d: progress(f, desc=d))
        pg.session.prepare_references(pg.prompt_list())
    except Exception as exc:
        return [pg, *skip_controls(), *view_out(None), f"⚠️ {message(exc, 'on_base', [ref])}"]
    stack_warnings(pg)  # e.g. a fine-tune used as the base: its own task vector is now zero
    return [*run(pg, render=True), f"Base model: **{limits.check_text('base model', ref)}**."]


# ---------------------------------------------------------------------------- take away

@_guard
def do_zip(pg: Playground | None, progress=gr.Progress()):
    """Weights, config, tokenizer, merge_config.yml and a model card with the live scores, zipped into the
    session's export folder (deleted with the session or after FEDMERGE_EXPORT_TTL)."""
    pg = ensure(pg)
    return str(pg.session.export_zip(card=model_card(pg),
                                     progress=lambda f, name: progress(f, desc=name)))


@_guard
def do_yaml(pg: Playground | None):
    path, text = ensure(pg).session.export_yaml()
    return str(path), text


@_guard
def do_push(pg: Playground | None, repo: str, token: str, private: bool) -> str:
    pg = ensure(pg)
    try:
        with pg.session.job("push"):
            return f"Pushed: {push_to_hub(pg.session, limits.check_text('repository', repo, 96), token, bool(private))}"
    except MergeError as exc:
        return warn(exc)


def _free(pg):
    """Gradio's delete_callback (TTL or unload): runs on the event loop, so the work goes to a thread."""
    if pg is not None and not pg.closed:
        threading.Thread(target=pg.close, name="fedmerge-free", daemon=True).start()


def _free_on_unload(demo: gr.Blocks, request: gr.Request) -> None:
    """The browser tab (or gradio_client) went away: free its session now, not after the TTL."""
    holder = getattr(demo, "state_holder", None)
    if holder is None or request is None or request.session_hash not in holder:
        return
    holder.delete_state(request.session_hash)  # runs the State's delete_callback (_free)
    holder.session_data.pop(request.session_hash, None)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


CSS = """
.fm-title h1 {margin-bottom: 0.1em}
.fm-status {min-height: 1.5em}
#fm-scenarios button {flex: 1 1 auto}
/* the task-count table: numbers stay whole; on a narrow screen the table scrolls, not the page */
#fm-count-md table {display: block; overflow-x: auto; width: fit-content; max-width: 100%; border: none}
#fm-count-md td, #fm-count-md th {word-break: normal; overflow-wrap: normal}
@media (max-width: 640px) {
  #fm-scenarios {flex-direction: row !important; flex-wrap: wrap !important; gap: 4px !important}
  #fm-scenarios > button {flex: 1 1 45% !important; min-width: 45% !important; margin: 0 !important}
  #fm-scenario {font-size: 0.9em}
}
"""


# ---------------------------------------------------------------------------- layout and wiring

def build_demo() -> gr.Blocks:
    try:
        zoo_names = [s.name for s in read_zoo()[1]]
    except Exception:  # no zoo: the page says so on load
        zoo_names = []
    try:
        scenario_list = scenarios.load()
    except MergeError as exc:
        log.warning("scenarios not loaded: %s", exc)
        scenario_list = []
    live_opts = dict(trigger_mode="always_last", show_progress="hidden", concurrency_limit=4, concurrency_id="live",
                     api_visibility="undocumented")  # the UI's own calls; API users have /live
    with gr.Blocks(title="FedMerge Playground") as demo:
        state = gr.State(None, time_to_live=SESSION_TTL, delete_callback=_free)
        gr.Markdown("# FedMerge Playground\nMerge fine-tuned models live: Task Arithmetic is one round of FedAvg, "
                    "so try Federated Learning's aggregators on it. Every change re-merges and re-scores.",
                    elem_classes="fm-title")
        with gr.Row(elem_id="fm-scenarios"):
            sc_buttons = [(s.id, gr.Button(s.title, size="sm", elem_id=f"fm-sc-{slug(s.id)}")) for s in scenario_list]
        scenario_md = gr.Markdown(elem_id="fm-scenario")
        with gr.Tabs() as tabs:
            with gr.Tab("Merge", id="merge"):
                with gr.Row():
                    with gr.Column(scale=5, min_width=340):  # results first: above the controls on a phone
                        status = gr.Markdown(elem_classes="fm-status", elem_id="fm-status")
                        table = gr.HTML(elem_id="fm-table", js_on_load=None, css_template=OUTPUTS_CSS)
                        prompts = gr.Textbox(label="Prompts (one per line; edit or type free text, then click outside "
                                                   "the box to refresh)", lines=3, max_lines=20, elem_id="fm-prompts",
                                             info=limits.current().describe())
                        with gr.Row():
                            acc_plot = gr.Plot(label="Per-task accuracy (live validation subset)", elem_id="fm-acc")
                            heat_live = gr.Plot(label="Cosine of task vectors and of the merge", elem_id="fm-heat")
                    with gr.Column(scale=2, min_width=300):
                        models = gr.CheckboxGroup(label="Fine-tuned models to merge", choices=zoo_names,
                                                  interactive=True, elem_id="fm-models")
                        method = gr.Dropdown(choices=[(method_label(n), n) for n in AGGREGATORS],
                                             value=DEFAULT_METHOD, label="Aggregator", interactive=True,
                                             elem_id="fm-method")
                        lam = ClampedSlider(*LAMBDA_RANGE, value=DEFAULT_LAMBDA, step=0.05, label="λ (global scale)",
                                            info="merged = θ₀ + λ·U", elem_id="fm-lambda")

                        panel = gr.HTML(panel_placeholder(), elem_id="fm-panel", js_on_load=PANEL_JS,
                                        css_template=PANEL_CSS)
                        with gr.Accordion("Aggregator hyperparameters", open=True):
                            groups, hyper_comps = build_hyper_widgets()
                    controls = [models, method, lam, prompts, scenario_md, panel, *groups, *hyper_comps]
            with gr.Tab("Heterogeneity", id="hetero") as hetero_tab:
                gr.Markdown("Data heterogeneity shows as low or negative cosine similarity and many sign conflicts "
                            "between task vectors; training heterogeneity as very different norms next to the "
                            "recorded steps and learning rates. In the per-layer heatmap, `other` is every tensor "
                            "outside the transformer blocks (embeddings, final layer norm).")
                with gr.Row():
                    layer = gr.Dropdown(choices=["whole model"], value="whole model", label="Layer", interactive=True)
                    metric = gr.Radio(choices=[("cosine similarity", "cosine"), ("sign conflicts", "sign_conflict")],
                                      value="cosine", label="Metric")
                with gr.Row():
                    heat = gr.Plot(label="Heatmap")
                    norms = gr.Plot(label="Norms")
                layer_heat = gr.Plot(label="Per layer")
                gr.Markdown("**Does heterogeneity predict merge failure?** The study merges every pair of the "
                            "selected fine-tunes (and each leave-one-out group) with each aggregator at its tuned "
                            "λ, and correlates the drop in normalized accuracy with the measures above.")
                with gr.Row():
                    study_methods = gr.CheckboxGroup(choices=list(AGGREGATORS), value=list(heterogeneity.DEFAULT_METHODS),
                                                     label="Aggregators in the study", elem_id="fm-study-methods")
                    study_btn = gr.Button("Run the study", variant="primary")
                    study_cancel = gr.Button("Cancel", variant="stop")
                study_plot = gr.Plot(label="Drop vs heterogeneity, per pair")
                study_md = gr.Markdown()
                gr.Markdown("**How many tasks does one merge hold?** Merges groups of 2, 3, … up to all of the "
                            "selected fine-tunes (every group, or a fixed sample of them per size) with the "
                            "aggregators above at their tuned λ. A curve that falls with the number of tasks, "
                            "where pairs merge well, means the model runs out of room, not that two tasks conflict.")
                with gr.Row():
                    count_per = gr.Slider(1, task_count.MAX_PER_SIZE, value=task_count.PER_SIZE, step=1,
                                          label="Groups per size", elem_id="fm-count-per")
                    count_btn = gr.Button("Run the task-count curve", variant="primary", elem_id="fm-count-btn")
                    count_cancel = gr.Button("Cancel", variant="stop")
                count_plot = gr.Plot(label="Normalized accuracy vs tasks merged", elem_id="fm-count-plot")
                count_md = gr.Markdown(elem_id="fm-count-md")
            with gr.Tab("Explore", id="explore"):
                gr.Markdown("λ is searched over 0.05…2.00 (for fednova and median, which average the K updates, K "
                            "times that, up to the λ slider's top), with ρ for fedgma/cclip and density for ties/dare, by the best "
                            "mean **normalized** validation accuracy; the chosen setting is reported on test. Each "
                            "button first says how long it will take; **Cancel** stops it on the server.")
                with gr.Row():
                    sweep_btn = gr.Button("λ sweep (current aggregator)")
                    autotune_btn = gr.Button("Auto-tune λ and hyperparameters", variant="primary")
                    compare_btn = gr.Button("Compare all aggregators (tuned)")
                    landscape_btn = gr.Button("Merge landscape (two selected models)")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="fm-cancel")
                explore_md = gr.Markdown(elem_id="fm-explore-md")
                landscape_html = gr.HTML(elem_id="fm-landscape", js_on_load=landscape.LANDSCAPE_JS,
                                         css_template=landscape.LANDSCAPE_CSS)
                sweep_plot = gr.Plot(label="λ sweep")
                compare_table = gr.Dataframe(label="Aggregators, each tuned on validation", interactive=False,
                                             visible=False)  # shown with the first comparison
                compare_plot = gr.Plot(label="Comparison")
            with gr.Tab("Models", id="models"):
                gr.Markdown("Add a fine-tune or a LoRA adapter of the same base, by Hugging Face Hub id or by a local "
                            "folder (local folders: the zoo and the folders the operator allowed in "
                            "`FEDMERGE_ALLOWED_DIRS`). Models that do not fit the base are refused.")
                with gr.Row():
                    add_ref = gr.Textbox(label="Fine-tune or LoRA adapter (Hub id or folder)", scale=3, elem_id="fm-add-ref")
                    add_name = gr.Textbox(label="Name (optional)", scale=1, elem_id="fm-add-name")
                    add_task = gr.Dropdown(choices=["(none)", *TASKS], value="(none)", label="Task it was trained on",
                                           scale=1)
                add_btn = gr.Button("Add model", elem_id="fm-add-btn")
                with gr.Row():
                    base_ref = gr.Textbox(label="Base model (Hub id or folder)", scale=3)
                    base_btn = gr.Button("Use as base", scale=1)
                models_md = gr.Markdown(elem_id="fm-models-md")
            with gr.Tab("Take away", id="export"):
                gr.Markdown("The zip holds the merged weights, config, tokenizer, `merge_config.yml` (re-run it with "
                            "`python -m merging merge`) and a model card with the method, λ, weights, "
                            "hyperparameters and the live scores.")
                with gr.Row():
                    zip_btn = gr.Button("Build merged model (.zip)", variant="primary")
                    yaml_btn = gr.Button("Merge as mergekit-style YAML")
                with gr.Row():
                    zip_file = gr.File(label="Merged model")
                    yaml_file = gr.File(label="YAML")
                yaml_code = gr.Code(label="merge.yml", language="yaml", elem_id="fm-yaml")
                with gr.Accordion("Push to the Hugging Face Hub", open=False):
                    gr.Markdown("The token is used for this upload only; it is never logged or stored.")
                    with gr.Row():
                        hub_repo = gr.Textbox(label="Repository (owner/name)")
                        hub_token = gr.Textbox(label="Token", type="password")
                        hub_private = gr.Checkbox(value=True, label="private")
                    push_btn = gr.Button("Push")
                    push_md = gr.Markdown()
            with gr.Tab("Learn", id="learn"):
                gr.Markdown(learn_markdown(scenario_list))
        with gr.Row(visible=False):  # the /live API's named arguments (gradio_client users)
            api_sel = gr.JSON(label="selection")
            api_method = gr.Textbox(label="method")
            api_lam = gr.Number(label="lam")
            api_weights = gr.JSON(label="weights")
            api_hyper = gr.JSON(label="hyper")
            api_prompts = gr.Textbox(label="prompts")
            api_data = gr.JSON(label="data")
            api_btn = gr.Button("live")

        view = [table, acc_plot, heat_live, status]
        main_out = [state, *controls, *view]
        demo.load(on_load, inputs=[state], outputs=main_out)
        for sid, btn in sc_buttons:
            btn.click(partial(on_scenario, scenario_id=sid), inputs=[state], outputs=main_out, **live_opts)
        models.input(on_select, inputs=[state, models], outputs=main_out, **live_opts)
        method.input(on_method, inputs=[state, method], outputs=main_out, **live_opts)
        lam.input(on_lambda, inputs=[state, lam], outputs=main_out, **live_opts)
        prompts.blur(on_prompts, inputs=[state, prompts], outputs=main_out, **live_opts)
        # each press its own request (stamped): always_last would re-send the first press's event data
        panel.input(on_panel, inputs=[state], outputs=main_out, **{**live_opts, "trigger_mode": "multiple"})
        for (m, p), comp in zip(HYPER_SLOTS, hyper_comps):
            fn = on_auto if (p.per_model and p.optional) else on_hyper
            comp.input(partial(fn, name=p.name, method=m), inputs=[state, comp], outputs=main_out, **live_opts)
        api_btn.click(live_api, inputs=[state, api_sel, api_method, api_lam, api_weights, api_hyper, api_prompts],
                      outputs=[state, *view, api_data], api_name="live", concurrency_limit=4, concurrency_id="live")

        # a plot redrawn while its tab was hidden (a scenario button, auto-tune) took a default width: plotly
        # re-fits its responsive plots on a window resize, so the shown tab gets one
        tabs.select(None, js="() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }")

        hetero_out = [heat, norms, layer_heat, layer]
        gr.on([hetero_tab.select, layer.input, metric.input], hetero, inputs=[state, layer, metric],
              outputs=hetero_out, trigger_mode="always_last")

        # models: refusals stay in this tab
        add_btn.click(on_add, inputs=[state, add_ref, add_name, add_task], outputs=[*main_out, models_md])
        base_btn.click(on_base, inputs=[state, base_ref], outputs=[*main_out, models_md])

        # explore: an estimate and this session's slot first, then the job (one at a time on the server);
        # Cancel sets a flag the job checks between merges
        jobs = []
        for btn, kind, fn, outs in ((sweep_btn, "sweep", do_sweep, [sweep_plot, explore_md]),
                                    (autotune_btn, "autotune", do_autotune, [*main_out, sweep_plot, explore_md]),
                                    (compare_btn, "compare", do_compare, [compare_table, compare_plot, explore_md]),
                                    (landscape_btn, "landscape", do_landscape, [landscape_html, explore_md])):
            ev = btn.click(partial(ask_job, kind=kind), inputs=[state], outputs=[explore_md],
                           show_progress="hidden")
            jobs.append(ev.success(fn, inputs=[state], outputs=outs, concurrency_limit=1, concurrency_id="jobs"))
        cancel = dict(show_progress="hidden", concurrency_limit=None)  # queued (else no toast), never waits
        cancel_btn.click(do_cancel, inputs=[state], outputs=[explore_md], **cancel)
        landscape_html.click(on_landscape_click, inputs=[state], outputs=main_out, **live_opts)

        study_btn.click(lambda pg, ms: ask_job(pg, "study", ms), inputs=[state, study_methods], outputs=[study_md],
                        show_progress="hidden", api_visibility="undocumented").success(
            do_study, inputs=[state, study_methods], outputs=[study_plot, study_md], concurrency_limit=1,
            concurrency_id="jobs", api_name="heterogeneity")
        study_cancel.click(do_cancel, inputs=[state], outputs=[study_md], **cancel)
        count_btn.click(lambda pg, ms, per: ask_job(pg, "task_count", ms, per),
                        inputs=[state, study_methods, count_per], outputs=[count_md], show_progress="hidden",
                        api_visibility="undocumented").success(
            do_task_count, inputs=[state, study_methods, count_per], outputs=[count_plot, count_md],
            concurrency_limit=1, concurrency_id="jobs", api_name="task_count")
        count_cancel.click(do_cancel, inputs=[state], outputs=[count_md], **cancel)

        zip_btn.click(do_zip, inputs=[state], outputs=[zip_file], concurrency_limit=2, api_name="zip")
        yaml_btn.click(do_yaml, inputs=[state], outputs=[yaml_file, yaml_code], api_name="yaml")
        push_btn.click(do_push, inputs=[state, hub_repo, hub_token, hub_private], outputs=[push_md])

        def on_unload(request: gr.Request):
            _free_on_unload(demo, request)

        demo.unload(on_unload)
    return demo


def panel_placeholder() -> str:
    return "<div class='fm-panel'><i>Loading the models…</i></div>"


def _widget(p, method: str):
    """The widget of one hyperparameter, from its registry description."""
    label = p.name + (" (every model)" if p.per_model else "")
    kw = dict(info=p.help, interactive=True, elem_id=f"hp-{method}-{p.name}")
    if p.per_model and p.optional:  # fednova's steps / learning rates: auto, or one box per model in the panel
        return gr.Checkbox(value=True, label=f"{p.name}: auto (from training metadata)", **kw)
    if p.type is bool:
        return gr.Checkbox(value=bool(p.default), label=label, **kw)
    if p.type is str and p.choices:
        return gr.Radio(choices=list(p.choices), value=p.default, label=label, **kw)
    if p.type is float and p.low is not None and p.high is not None and p.high != float("inf"):
        step = 0.01 if p.high - p.low <= 2 else (p.high - p.low) / 100
        return ClampedSlider(minimum=p.low, maximum=p.high, value=p.default, step=step, label=label, **kw)
    return gr.Number(value=p.default, label=f"{label} (empty = auto)" if p.optional else label,
                     precision=0 if p.type is int else None, **kw)


def build_hyper_widgets() -> tuple[list, list]:
    """One group per aggregator (only the current one visible), its widgets in HYPER_SLOTS order."""
    groups, comps = [], []
    for name, agg in AGGREGATORS.items():
        with gr.Group(visible=name == DEFAULT_METHOD) as g:
            if not agg.params:
                gr.Markdown(f"*{name} has no hyperparameters besides the coefficients and λ.*")
            for p in agg.params:
                comps.append(_widget(limits.live_param(name, p), name))
        groups.append(g)
    return groups, comps


def look() -> dict[str, Any]:
    """The theme and CSS (Gradio 6 takes them at launch): one place, for `main` and the browser tests."""
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css": CSS}


def main() -> None:
    from merging.cache import CACHE

    try:
        device = CACHE.device  # a bad FEDMERGE_DEVICE: one line, before anything is served
    except MergeError as exc:
        raise SystemExit(f"app.py: FEDMERGE_DEVICE: {exc}") from None
    if device.type != "cpu":
        print(f"merging and decoding on {device} ({torch.cuda.get_device_name(device)})", flush=True)
    try:
        read_zoo()  # a malformed FEDMERGE_ZOO: one line, before anything is served
    except MergeError as exc:
        raise SystemExit(f"app.py: FEDMERGE_ZOO: {exc}") from None
    torch.set_num_threads(default_threads())
    demo = build_demo()
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
                show_error=True, **look())


if __name__ == "__main__":
    main()
