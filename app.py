"""FedMerge Playground: merge fine-tuned models live, with Federated Learning's aggregators.

`python app.py` serves it on 127.0.0.1 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT), offline, on
the built-in zoo (FEDMERGE_ZOO). This file only lays out and wires; the logic lives in
evaluation/session.py, evaluation/search.py and merging/cache.py.
"""
from __future__ import annotations

import os

for _k, _v in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_k, _v)

import functools  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from evaluation import heterogeneity, limits, plots  # noqa: E402
from evaluation.search import (compare_all, comparison_chart, comparison_table, search,  # noqa: E402
                               sweep)
from evaluation.session import Session, default_prompts, default_threads, push_to_hub, read_zoo  # noqa: E402
from evaluation.tasks import TASKS  # noqa: E402
from merging.errors import MergeError  # noqa: E402
from merging.registry import AGGREGATORS  # noqa: E402

MAX_MODELS = limits.current().max_models  # also the number of coefficient sliders
DEFAULT_LAMBDA = 0.3  # Task Arithmetic with several tasks works best well below 1 (evaluation/RESULTS.md)
DEFAULT_METHOD = "task_arithmetic"
SESSION_TTL = limits.current().session_ttl


# ---------------------------------------------------------------------------- registry-built widgets

@dataclass
class HyperWidget:
    method: str
    name: str
    kind: str  # "scalar", "auto_list" (per-model numbers with an auto checkbox)
    components: list  # scalar: [widget]; auto_list: [auto checkbox, *MAX_MODELS numbers]


def _scalar_widget(p, method: str):
    label = p.name
    if p.per_model:
        label += " (every model)"
    kw = dict(label=label, info=p.help, interactive=True, elem_id=f"hp-{method}-{p.name}")
    if p.type is bool:
        return gr.Checkbox(value=bool(p.default), **kw)
    if p.type is str and p.choices:
        return gr.Radio(choices=list(p.choices), value=p.default, **kw)
    if p.type is float and p.low is not None and p.high is not None:
        step = 0.01 if p.high - p.low <= 2 else (p.high - p.low) / 100
        return gr.Slider(minimum=p.low, maximum=p.high, value=p.default, step=step, **kw)
    if p.optional:
        kw["label"] = f"{p.name} (empty = auto)"
    if p.type is int:
        return gr.Number(value=p.default, precision=0, minimum=p.low, maximum=p.high, **kw)
    return gr.Number(value=p.default, minimum=p.low, maximum=p.high, **kw)


def build_hyper_widgets() -> tuple[dict[str, Any], list[HyperWidget]]:
    """One group per aggregator, its widgets built from the registry; only the current one visible."""
    groups, widgets = {}, []
    for name, agg in AGGREGATORS.items():
        with gr.Group(visible=name == DEFAULT_METHOD) as g:
            if not agg.params:
                gr.Markdown(f"*{name} has no hyperparameters besides the coefficients and λ.*")
            for p in agg.params:
                if p.per_model and p.optional:
                    with gr.Accordion(f"{p.name}: one per model", open=False):
                        auto = gr.Checkbox(value=True, label=f"{p.name}: auto (from training metadata)", info=p.help)
                        nums = [gr.Number(label=f"{p.name} #{i + 1}", visible=False, interactive=True,
                                          precision=0 if p.type is int else None, minimum=p.low)
                                for i in range(MAX_MODELS)]
                    widgets.append(HyperWidget(name, p.name, "auto_list", [auto, *nums]))
                else:
                    widgets.append(HyperWidget(name, p.name, "scalar", [_scalar_widget(p, name)]))
        groups[name] = g
    return groups, widgets


def hyper_from_values(method: str, widgets: list[HyperWidget], values: list, k: int) -> dict[str, Any]:
    """The current method's hyperparameters from the flat list of widget values."""
    out, pos = {}, 0
    for w in widgets:
        vals = values[pos:pos + len(w.components)]
        pos += len(w.components)
        if w.method != method:
            continue
        if w.kind == "scalar":
            v = vals[0]
            out[w.name] = None if v in ("", None) else v
        else:
            auto, nums = vals[0], vals[1:1 + k]
            out[w.name] = None if auto or any(v in (None, "") for v in nums) else list(nums)
    return out


def live_args(method: str = DEFAULT_METHOD, lam: float = 1.0, weights: list[float] | None = None,
              hyper: dict[str, Any] | None = None, prompts: str = "", selection: list[str] | None = None) -> list:
    """Positional arguments of the /live endpoint (for gradio_client users: the bench and the tests)."""
    weights = list(weights or [])
    w = weights + [1.0] * (MAX_MODELS - len(weights))
    hv: list[Any] = []
    for name, agg in AGGREGATORS.items():
        for p in agg.params:
            given = (hyper or {}).get(p.name) if name == method else None
            if p.per_model and p.optional:
                vals = list(given) if isinstance(given, (list, tuple)) else []
                hv += [not vals, *(vals + [None] * (MAX_MODELS - len(vals)))]
            else:
                hv.append(p.default if given is None else given)
    return [selection if selection is not None else [], method, lam, prompts, *w, *hv]


# ---------------------------------------------------------------------------- handlers

def _session(state: Session | None, progress=None) -> Session:
    if state is None or state.closed:
        state = Session()
        state.load_zoo(progress=progress)
    return state


def _free(state):
    """Gradio's delete_callback (TTL or unload): runs on the event loop, so the work goes to a thread."""
    if state is not None and not state.closed:
        threading.Thread(target=state.close, name="fedmerge-free", daemon=True).start()


def _fail(exc: Exception) -> str:
    msg = limits.user_message(exc, read_zoo_root())
    gr.Warning(msg)
    return f"⚠️ {msg}"


def read_zoo_root():
    from evaluation.session import zoo_dir

    return zoo_dir()


def _guard(fn):
    """Any error of a handler reaches the user as one gr.Error line: no repr, errno or server path."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            typed = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]  # shown as typed
            raise gr.Error(limits.user_message(exc, read_zoo_root(), fn.__name__, typed)) from None
    return wrapper


def _weights_for(session: Session, values) -> list:
    """The raw slider values of the selected models (validated by Session.check_request)."""
    return list(values[:len(session.selected)])


def _free_on_unload(demo: gr.Blocks, request: gr.Request) -> None:
    """The browser tab (or gradio_client) went away: free its session now, not after the TTL."""
    holder = getattr(demo, "state_holder", None)
    if holder is None or request is None or request.session_hash not in holder:
        return
    holder.delete_state(request.session_hash)  # runs the State's delete_callback (_free)
    holder.session_data.pop(request.session_hash, None)


def selection_updates(session: Session, widgets: list[HyperWidget]) -> list:
    """Checkbox choices/value, one slider per selected model, per-model numbers prefilled from training."""
    names = [s.name for s in session.specs]
    sel = [session.specs[i] for i in session.selected]
    out: list = [gr.CheckboxGroup(choices=names, value=[s.name for s in sel])]
    for j in range(MAX_MODELS):
        if j < len(sel):
            out.append(gr.Slider(visible=True, label=f"w · {sel[j].name}" + (f"  ({sel[j].task})" if sel[j].task else ""),
                                 value=1.0))
        else:
            out.append(gr.Slider(visible=False))
    training = session.training()
    for w in widgets:
        if w.kind != "auto_list":
            continue
        meta = "steps" if w.name == "steps" else "learning_rate"
        out.append(gr.Checkbox())
        for j in range(MAX_MODELS):
            if j < len(sel):
                out.append(gr.Number(visible=True, label=f"{w.name} · {sel[j].name}", value=training[j].get(meta)))
            else:
                out.append(gr.Number(visible=False))
    return out


def learn_markdown() -> str:
    lines = [
        "## Task Arithmetic is one round of FedAvg",
        "Treat each fine-tune as one client of Federated Learning that trained locally from the same global "
        "model θ₀. Its update is the task vector τᵢ = θᵢ − θ₀. One-shot FedAvg with server learning rate η "
        "averages the updates: θ₀ + (η/K)·Σ τᵢ — exactly Task Arithmetic with λ = η/K. So what FL knows about "
        "when averaging fails carries over to merging:",
        "",
        "* **Data heterogeneity** — the tasks pull the weights in different directions. Look at the cosine "
        "similarity of the task vectors (whole model and layer by layer) and at their sign conflicts "
        "(Heterogeneity tab). `is_even` and `is_odd` in the zoo disagree on purpose.",
        "* **Training heterogeneity** — fine-tunes ran different numbers of steps or learning rates. Plain "
        "averaging silently over-weights the longest-trained client: compare the task-vector norms with the "
        "steps and learning rates (the zoo's `reverse-long` trained 4× longer).",
        "",
        "In every method below the merged model is θ₀ + λ·U, with U built from the weighted updates uᵢ = wᵢ·τᵢ "
        "(wᵢ are the per-model sliders). The paper searches λ in {0.05, …, 2.00} and picks it, with ρ, by the "
        "best average *normalized* accuracy on validation (merged accuracy ÷ the task's own fine-tune) and "
        "reports on test: that is what *Auto-tune* and *Compare all aggregators* do.",
        "",
        "## The aggregators",
    ]
    for fam, title in (("federated", "Federated Learning aggregators"), ("baseline", "Merging baselines (mergekit)")):
        lines.append(f"### {title}")
        for name, agg in AGGREGATORS.items():
            if agg.family == fam:
                hp = ", ".join(f"`{p.name}`" for p in agg.params) or "none"
                lines.append(f"* **{name}** — {agg.summary} *Hyperparameters:* {hp}.")
        lines.append("")
    return "\n".join(lines)


CSS = """
.fm-title h1 {margin-bottom: 0.1em}
.fm-status {min-height: 1.5em}
#fm-table table {font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85em}
"""


# ---------------------------------------------------------------------------- layout and wiring

def build_demo() -> gr.Blocks:
    try:
        zoo_names = [s.name for s in read_zoo()[1]]
    except Exception:  # no zoo: the page says so on load
        zoo_names = []
    with gr.Blocks(title="FedMerge Playground") as demo:
        state = gr.State(None, time_to_live=SESSION_TTL, delete_callback=_free)
        gr.Markdown("# FedMerge Playground\nMerge fine-tuned models live — Task Arithmetic is one-shot FedAvg, "
                    "so try Federated Learning's aggregators on it. Move a slider: the merged model is rebuilt "
                    "in place and re-scored on every change.", elem_classes="fm-title")
        with gr.Tabs():
            with gr.Tab("Merge", id="merge"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=330):
                        models = gr.CheckboxGroup(label="Fine-tuned models to merge", choices=zoo_names, interactive=True,
                                                  elem_id="fm-models")
                        method = gr.Dropdown(choices=[(f"{n}  ·  {a.family}", n) for n, a in AGGREGATORS.items()],
                                             value=DEFAULT_METHOD, label="Aggregator", interactive=True,
                                             elem_id="fm-method")
                        lam = gr.Slider(0.0, 2.0, value=DEFAULT_LAMBDA, step=0.05, label="λ (global scale)",
                                        info="merged = θ₀ + λ·U", elem_id="fm-lambda")
                        with gr.Accordion("Per-model coefficients wᵢ", open=True):
                            sliders = [gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label=f"w{i}", visible=False,
                                                 elem_id=f"fm-w{i}") for i in range(MAX_MODELS)]
                        with gr.Accordion("Aggregator hyperparameters", open=True):
                            groups, hwidgets = build_hyper_widgets()
                    with gr.Column(scale=5):
                        status = gr.Markdown(elem_classes="fm-status", elem_id="fm-status")
                        table = gr.Dataframe(label="Outputs: base, each fine-tune and the merge (✓ correct, ✗ wrong)",
                                             interactive=False, wrap=True, elem_id="fm-table")
                        with gr.Row():
                            acc_plot = gr.Plot(label="Per-task accuracy (live validation subset)", elem_id="fm-acc")
                            heat_live = gr.Plot(label="Cosine of task vectors and of the merge", elem_id="fm-heat")
                        prompts = gr.Textbox(label="Prompts (one per line; edit, or type free text; Enter or leave "
                                                   "the box to refresh)", lines=4, max_lines=20, elem_id="fm-prompts",
                                             info=limits.current().describe())
            with gr.Tab("Heterogeneity", id="hetero"):
                gr.Markdown("Data heterogeneity shows as low or negative cosine similarity and many sign conflicts "
                            "between task vectors; training heterogeneity as very different norms next to the "
                            "recorded steps and learning rates.")
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
                                                     label="Aggregators in the study")
                    study_btn = gr.Button("Run the study", variant="primary")
                study_plot = gr.Plot(label="Drop vs heterogeneity, per pair")
                study_md = gr.Markdown()
            with gr.Tab("Explore", id="explore"):
                gr.Markdown("λ is searched over 0.05…2.00 (plus ρ for fedgma/cclip, density for ties/dare) by the best "
                            "mean **normalized** validation accuracy; the chosen setting is reported on test.")
                with gr.Row():
                    sweep_btn = gr.Button("λ sweep (current aggregator)")
                    autotune_btn = gr.Button("Auto-tune λ and hyperparameters", variant="primary")
                    compare_btn = gr.Button("Compare all aggregators (tuned)")
                explore_md = gr.Markdown()
                sweep_plot = gr.Plot(label="λ sweep")
                compare_table = gr.Dataframe(label="Aggregators, each tuned on validation", interactive=False)
                compare_plot = gr.Plot(label="Comparison")
            with gr.Tab("Models", id="models"):
                gr.Markdown("Add a fine-tune or a LoRA adapter of the same base, by Hugging Face Hub id or by a local "
                            "folder (local folders: the zoo and the folders the operator allowed in "
                            "`FEDMERGE_ALLOWED_DIRS`). Models that do not fit the base are refused.")
                with gr.Row():
                    add_ref = gr.Textbox(label="Fine-tune or LoRA adapter (Hub id or folder)", scale=3)
                    add_name = gr.Textbox(label="Name (optional)", scale=1)
                    add_task = gr.Dropdown(choices=["(none)", *TASKS], value="(none)", label="Task it was trained on",
                                           scale=1)
                add_btn = gr.Button("Add model")
                with gr.Row():
                    base_ref = gr.Textbox(label="Base model (Hub id or folder)", scale=3)
                    base_btn = gr.Button("Use as base", scale=1)
                models_md = gr.Markdown()
            with gr.Tab("Take away", id="export"):
                with gr.Row():
                    zip_btn = gr.Button("Build merged model (.zip)", variant="primary")
                    yaml_btn = gr.Button("Merge as mergekit-style YAML")
                with gr.Row():
                    zip_file = gr.File(label="Merged model")
                    yaml_file = gr.File(label="YAML")
                yaml_code = gr.Code(label="merge.yml", language="yaml")
                with gr.Accordion("Push to the Hugging Face Hub", open=False):
                    gr.Markdown("The token is used for this upload only; it is never logged or stored.")
                    with gr.Row():
                        hub_repo = gr.Textbox(label="Repository (owner/name)")
                        hub_token = gr.Textbox(label="Token", type="password")
                        hub_private = gr.Checkbox(value=True, label="private")
                    push_btn = gr.Button("Push")
                    push_md = gr.Markdown()
            with gr.Tab("Learn", id="learn"):
                gr.Markdown(learn_markdown())

        hyper_inputs = [c for w in hwidgets for c in w.components]
        auto_lists = [c for w in hwidgets if w.kind == "auto_list" for c in w.components]
        live_inputs = [state, models, method, lam, prompts, *sliders, *hyper_inputs]
        live_outputs = [state, table, acc_plot, heat_live, status]
        sel_outputs = [models, *sliders, *auto_lists]
        hetero_outputs = [heat, norms, layer_heat, layer]

        # -------------------------------------------------------------- live update
        def live(st, selection, meth, lamv, prompt_text, *rest):
            try:
                session = _session(st)
            except Exception as exc:
                return st, gr.skip(), gr.skip(), gr.skip(), _fail(exc)
            weight_vals, hyper_vals = rest[:MAX_MODELS], list(rest[MAX_MODELS:])
            try:
                prompt_list = limits.check_prompts(prompt_text)  # bounds first, before any work
                if selection:
                    session.select(limits.check_selection(selection, [m.name for m in session.specs]))
                hyper = hyper_from_values(limits.check_method(meth), hwidgets, hyper_vals, len(session.selected))
                prompt_list = prompt_list or default_prompts(session.tasks)
                res = session.live(meth, _weights_for(session, weight_vals), lamv, hyper, prompt_list)
                sim = session.similarity_live()
            except Exception as exc:
                return session, gr.skip(), gr.skip(), gr.skip(), _fail(exc)
            df = pd.DataFrame(res.rows, columns=res.headers)
            acc = plots.accuracy_bars(res.tasks, res.accuracy)
            acc.update_layout(height=360, legend=dict(orientation="h", y=-0.15))
            hm = plots.similarity_heatmap(sim)
            hm.update_layout(height=360, title=dict(text="Cosine: task vectors and the merge"))
            mean = res.normalized.get("mean")
            msg = (f"**{meth}**, λ = {lamv:g}: mean normalized accuracy "
                   f"{'—' if mean is None else f'{mean:.0%}'} on {len(res.tasks)} task(s) · {res.seconds * 1000:.0f} ms")
            if res.notes:
                msg += "  \nℹ️ " + "; ".join(res.notes)
            return session, df, acc, hm, msg

        live_triggers = [lam.change, lam.release, method.change, prompts.submit, prompts.blur]
        live_triggers += [s.change for s in sliders] + [s.release for s in sliders]
        live_triggers += [c.change for c in hyper_inputs]
        gr.on(live_triggers, live, inputs=live_inputs, outputs=live_outputs, trigger_mode="always_last",
              show_progress="hidden", api_name="live", concurrency_limit=4, concurrency_id="live")

        # -------------------------------------------------------------- page load / selection
        @_guard
        def hetero(st, layer_name, metric_name):
            session = _session(st)
            rep = session.similarity(with_merged=False)
            hm = plots.similarity_heatmap(rep, None if layer_name == "whole model" else layer_name, metric_name)
            choices = ["whole model", *rep.layers]
            return (hm, plots.norms_chart(rep), plots.layer_similarity_heatmap(rep) if len(rep.names) > 1 else None,
                    gr.Dropdown(choices=choices, value=layer_name if layer_name in choices else "whole model"))

        def on_load(st, progress=gr.Progress()):
            try:
                session = _session(st, progress=lambda f, d: progress(f, desc=d))
                prompt_text = "\n".join(default_prompts(session.tasks))
                session.prepare_references(prompt_text.splitlines(), progress=lambda f, d: progress(f, desc=d))
                return [session, prompt_text, *selection_updates(session, hwidgets), "Loaded the zoo."]
            except Exception as exc:
                return [st, gr.skip(), *[gr.skip()] * len(sel_outputs), _fail(exc)]

        load_ev = demo.load(on_load, inputs=[state], outputs=[state, prompts, *sel_outputs, models_md])
        load_ev.then(live, inputs=live_inputs, outputs=live_outputs).then(
            hetero, inputs=[state, layer, metric], outputs=hetero_outputs)

        @_guard
        def on_select(st, selection):
            session = _session(st)
            session.select(limits.check_selection(selection, [m.name for m in session.specs]))
            session.prepare_references()
            return [session, *selection_updates(session, hwidgets)]

        models.input(on_select, inputs=[state, models], outputs=[state, *sel_outputs]).success(
            live, inputs=live_inputs, outputs=live_outputs).then(
            hetero, inputs=[state, layer, metric], outputs=hetero_outputs)
        gr.on([layer.input, metric.change], hetero, inputs=[state, layer, metric], outputs=hetero_outputs)

        def on_method(meth):
            return [gr.Group(visible=name == meth) for name in groups]

        method.change(on_method, inputs=[method], outputs=list(groups.values()), show_progress="hidden")

        # -------------------------------------------------------------- models
        @_guard
        def add_model(st, ref, name, task, progress=gr.Progress()):
            session = _session(st)
            spec = session.add_model(ref, name, None if task in (None, "(none)") else task,
                                     progress=lambda f, d: progress(f, desc=d))
            session.prepare_references()
            for warning in session.stack.warnings:  # zero task vector, the same model twice, ...
                gr.Warning(warning)
            return [session, *selection_updates(session, hwidgets), f"Added **{spec.name}** ({spec.ref})."]

        @_guard
        def set_base(st, ref, progress=gr.Progress()):
            session = _session(st)
            session.set_base(ref, progress=lambda f, d: progress(f, desc=d))
            session.prepare_references()
            return [session, *selection_updates(session, hwidgets), f"Base model: **{ref}**."]

        for btn, fn, ins in ((add_btn, add_model, [state, add_ref, add_name, add_task]),
                             (base_btn, set_base, [state, base_ref])):
            btn.click(fn, inputs=ins, outputs=[state, *sel_outputs, models_md]).success(
                live, inputs=live_inputs, outputs=live_outputs).then(
                hetero, inputs=[state, layer, metric], outputs=hetero_outputs)

        # -------------------------------------------------------------- explore
        def _current(session, meth, rest, lamv=1.0):
            """(weights, hyper) of the widgets, validated before any work (a NaN weight fails here)."""
            hyper = hyper_from_values(limits.check_method(meth), hwidgets, list(rest[MAX_MODELS:]), len(session.selected))
            _, weights, _ = session.check_request(meth, _weights_for(session, rest[:MAX_MODELS]), lamv, hyper)
            return weights, hyper

        @_guard
        def do_sweep(st, selection, meth, lamv, prompt_text, *rest, progress=gr.Progress()):
            session = _session(st)
            weights, hyper = _current(session, meth, rest, lamv)
            with session.job("λ sweep"):
                r = sweep(session, meth, weights, hyper, progress=lambda f, d: progress(f, desc=d))
            fig = plots.lambda_sweep(r.lambdas, r.curves, r.best_lambda, title=f"λ sweep — {meth} (validation)")
            return fig, f"Best λ for **{meth}** at these settings: **{r.best_lambda:g}** (mean normalized validation " \
                        f"accuracy {r.best_score:.0%}; test {r.test_normalized.get('mean', float('nan')):.0%})."

        @_guard
        def do_autotune(st, selection, meth, lamv, prompt_text, *rest, progress=gr.Progress()):
            session = _session(st)
            weights, hyper = _current(session, meth, rest, lamv)
            fixed = {k: v for k, v in hyper.items() if isinstance(v, list)}
            with session.job("auto-tune"):
                r = search(session, meth, weights, fixed=fixed, progress=lambda f, d: progress(f, desc=d))
            updates = []
            for w in hwidgets:
                if w.method == meth and w.kind == "scalar" and w.name in r.best_hyper:
                    updates.append(gr.update(value=r.best_hyper[w.name]))
                else:
                    updates += [gr.skip()] * len(w.components)
                    continue
            fig = plots.lambda_sweep(r.lambdas, r.curves, r.best_lambda, title=f"Auto-tune — {meth} (validation)")
            md = (f"Auto-tuned **{meth}**: {r.describe()} — mean normalized accuracy {r.best_score:.0%} on validation, "
                  f"**{r.test_normalized.get('mean', float('nan')):.0%} on test** ({r.evaluations} evaluations, "
                  f"{r.seconds:.0f} s). The sliders now hold this setting.")
            if r.extra.get("skipped"):
                md += "\n\nSkipped (could not run): " + "; ".join(r.extra["skipped"])
            return [gr.update(value=r.best_lambda), *updates, fig, md]

        @_guard
        def do_compare(st, selection, meth, lamv, prompt_text, *rest, progress=gr.Progress()):
            session = _session(st)
            weights, _ = _current(session, meth, rest, lamv)
            failed: list[tuple[str, str]] = []
            with session.job("compare all"):
                results = compare_all(session, weights=weights, progress=lambda f, d: progress(f, desc=d),
                                      failed=failed)
            headers, rows = comparison_table(results)
            md = f"Compared {len(results)} aggregators (λ step 0.1, coarse hyperparameter grids)."
            if failed:
                md += " Could not run: " + "; ".join(f"**{m}** ({limits.user_message(MergeError(e))})" for m, e in failed)
            return pd.DataFrame(rows, columns=headers), comparison_chart(results), md

        @_guard
        def do_study(st, methods_chosen, progress=gr.Progress()):
            session = _session(st)
            if not isinstance(methods_chosen, (list, tuple)):
                raise MergeError("aggregators: expected a list of aggregator names")
            methods_chosen = [limits.check_method(m) for m in methods_chosen]
            methods_chosen = [m for m in methods_chosen if AGGREGATORS[m].max_models is None]
            if not methods_chosen:
                raise MergeError("aggregators: choose at least one aggregator that takes any number of models")
            with session.job("heterogeneity study"):
                study = heterogeneity.run(session, methods_chosen, progress=lambda f, d: progress(f, desc=d))
            return heterogeneity.scatter_figures(study, methods_chosen), heterogeneity.to_markdown(study, methods_chosen)

        study_btn.click(do_study, inputs=[state, study_methods], outputs=[study_plot, study_md], concurrency_limit=1,
                        api_name="heterogeneity")

        explore_inputs = live_inputs
        sweep_btn.click(do_sweep, inputs=explore_inputs, outputs=[sweep_plot, explore_md], concurrency_limit=2)
        autotune_btn.click(do_autotune, inputs=explore_inputs, outputs=[lam, *hyper_inputs, sweep_plot, explore_md],
                           concurrency_limit=2).success(live, inputs=live_inputs, outputs=live_outputs)
        compare_btn.click(do_compare, inputs=explore_inputs, outputs=[compare_table, compare_plot, explore_md],
                          concurrency_limit=1)

        # -------------------------------------------------------------- take away
        @_guard
        def do_zip(st, progress=gr.Progress()):
            session = _session(st)  # written into the session's export folder: deleted with it or after the TTL
            return str(session.export_zip(progress=lambda i, n, name: progress(i / max(1, n), desc=name)))

        @_guard
        def do_yaml(st):
            path, text = _session(st).export_yaml()
            return str(path), text

        @_guard
        def do_push(st, repo, token, private, progress=gr.Progress()):
            session = _session(st)
            try:
                with session.job("push"):
                    url = push_to_hub(session, limits.check_text("repository", repo, 96), token, bool(private))
            except MergeError as exc:
                return _fail(exc)
            return f"Pushed: {url}"

        zip_btn.click(do_zip, inputs=[state], outputs=[zip_file], concurrency_limit=2, api_name="zip")
        yaml_btn.click(do_yaml, inputs=[state], outputs=[yaml_file, yaml_code], api_name="yaml")
        push_btn.click(do_push, inputs=[state, hub_repo, hub_token, hub_private], outputs=[push_md])
        def on_unload(request: gr.Request):
            _free_on_unload(demo, request)

        demo.unload(on_unload)
    return demo


def main() -> None:
    torch.set_num_threads(default_threads())
    demo = build_demo()
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
                theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, show_error=True)


if __name__ == "__main__":
    main()
