"""The Merge tab's state and actions, as plain Python (app.py only lays out and wires).

A `Playground` is one browser tab: its `Session` plus the current value of every control
(selection, aggregator, λ, one coefficient per selected model by NAME, the method's
hyperparameters, prompts, the scenario). The server holds the truth: each user action sends only
the one value it changed, so a slider and a checkbox moved in quick succession can never disagree
about how many models there are. `act()` applies a change and re-merges once; when a newer action
arrived meanwhile, the older one returns None (the app leaves the screen as it is: the newer one
will paint it).
"""
from __future__ import annotations

import html
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from merging.errors import MergeError
from merging.registry import AGGREGATORS

from . import limits, plots
from .scenarios import Scenario
from .prompts import default_prompts
from .pool import read_zoo
from .session import LIVE_N, LiveResult, Session, clean_hyper

log = logging.getLogger("fedmerge.playground")

DEFAULT_METHOD = "task_arithmetic"
DEFAULT_LAMBDA = 0.3  # Task Arithmetic with several tasks works best well below 1 (evaluation/RESULTS.md)
from .limits import LAMBDA_RANGE, WEIGHT_RANGE  # noqa: E402  (one definition of the widgets' ranges)


class Cancelled(MergeError):
    """A long job stopped by its Cancel button."""


@dataclass
class View:
    """What one merge puts on screen."""

    table: str  # HTML: prompt, expected, merged, base; the fine-tunes' answers folded below
    accuracy: Any  # plotly figure
    heat: Any  # plotly figure
    status: str  # markdown
    result: LiveResult | None = None


def clamp(v: Any, lo: float, hi: float, default: float) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return default
    if not math.isfinite(x):
        return default
    return min(max(x, lo), hi)


def method_label(name: str) -> str:
    agg = AGGREGATORS[name]
    need = ""
    if agg.max_models is not None and agg.max_models == agg.min_models:
        need = f" · exactly {agg.max_models} model{'' if agg.max_models == 1 else 's'}"
    elif agg.max_models is not None:
        need = f" · at most {agg.max_models} model{'' if agg.max_models == 1 else 's'}"
    elif agg.min_models > 1:
        need = f" · {agg.min_models}+ models"
    return f"{name} · {agg.family}{need}"


class Playground:
    def __init__(self, session: Session):
        self.session = session
        self.method = DEFAULT_METHOD
        self.lam = DEFAULT_LAMBDA
        self.weights: dict[str, float] = {}
        self.hyper: dict[str, dict[str, Any]] = {}  # method -> name -> value (per-model: {model: value})
        self.prompts: list[str] | None = None  # None: one demo prompt per selected task
        self.scenario: Scenario | None = None
        self._scenario_base: str | None = None  # the zoo's base, on which a scenario runs
        self.last: LiveResult | None = None
        self.cancel = threading.Event()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._inputs_seen: dict[tuple, float] = {}  # panel input -> the page's stamp of the newest one applied
        self.panel_renders = 0
        self.landscape_of: tuple[tuple[str, ...], str | None] | None = None  # the landscape on screen: models, base
        self._work = threading.Lock()

    @classmethod
    def open(cls, session: Session | None = None, progress=None) -> "Playground":
        """Load the zoo (from the shared cache) and score the references once."""
        session = session or Session()
        if session.live_model is None:
            session.load_zoo(progress=progress)
        pg = cls(session)
        session.prepare_references(pg.prompt_list(), progress=progress)
        return pg

    def close(self) -> None:
        self.cancel.set()
        self.session.close()

    @property
    def closed(self) -> bool:
        return self.session.closed

    # ------------------------------------------------------------------ what is selected
    @property
    def selected(self) -> list[str]:
        return [s.name for s in self.session.selected_specs]

    def weight_list(self) -> list[float]:
        return [self.weights.get(n, 1.0) for n in self.selected]

    def prompt_list(self) -> list[str]:
        return list(self.prompts) if self.prompts else default_prompts(self.session.tasks)

    def hyper_values(self, method: str | None = None) -> dict[str, Any]:
        """The method's hyperparameters for a merge: per-model values as lists in selection order
        (absent while any is unset: auto)."""
        method = method or self.method
        out: dict[str, Any] = {}
        for p in AGGREGATORS[method].params:
            v = self.hyper.get(method, {}).get(p.name)
            if isinstance(v, dict):
                vals = [v.get(n) for n in self.selected]
                if all(x is not None for x in vals):
                    out[p.name] = vals
            elif v is not None:
                out[p.name] = v
        return out

    def hyper_value(self, name: str, method: str | None = None) -> Any:
        method = method or self.method
        v = self.hyper.get(method, {}).get(name)
        return AGGREGATORS[method].param(name).default if v is None else v

    # ------------------------------------------------------------------ changes (cheap; no merge)
    def set_lambda(self, value: Any) -> float:
        self.lam = clamp(value, *LAMBDA_RANGE, default=self.lam)
        return self.lam

    def set_weight(self, name: str, value: Any) -> float:
        if name not in {s.name for s in self.session.specs}:
            raise MergeError(f"no model named {name!r}")
        self.weights[name] = clamp(value, *WEIGHT_RANGE, default=self.weights.get(name, 1.0))
        return self.weights[name]

    def check_count(self, method: str, k: int) -> None:
        agg = AGGREGATORS[method]
        if not agg.accepts(k):
            if agg.max_models == agg.min_models:
                need = f"exactly {agg.max_models}"
            elif agg.max_models is not None:
                need = f"at most {agg.max_models}" if agg.min_models <= 1 else f"{agg.min_models} to {agg.max_models}"
            else:
                need = f"at least {agg.min_models}"
            raise MergeError(f"{method} merges {need} fine-tuned model{'' if need.endswith(' 1') else 's'}; "
                             f"{k} {'is' if k == 1 else 'are'} selected")

    def set_method(self, method: str) -> str:
        limits.check_method(method)
        self.check_count(method, len(self.selected))
        self.method = method
        return method

    def set_hyper(self, name: str, value: Any, model: str | None = None) -> Any:
        """One hyperparameter of the current method, checked against the registry (None/'' = auto/default)."""
        p = limits.live_param(self.method, AGGREGATORS[self.method].param(name))
        store = self.hyper.setdefault(self.method, {})
        if value in (None, ""):
            if model is None:
                store.pop(name, None)
            elif isinstance(store.get(name), dict):
                store[name].pop(model, None)
            return None
        if p.type in (int, float) and p.low is not None and p.high is not None and not isinstance(value, bool):
            value = clamp(value, p.low, p.high, default=p.default if p.default is not None else p.low)
        value = p.check(p.type(value) if p.type in (int, float) else value)
        if model is None:
            store[name] = value
        else:
            cur = store.get(name)
            store[name] = {**(cur if isinstance(cur, dict) else {}), model: value}
        return value

    def set_auto(self, name: str, auto: bool) -> None:
        """Per-model hyperparameters (fednova's steps): auto = read from each model's training metadata."""
        store = self.hyper.setdefault(self.method, {})
        if auto:
            store.pop(name, None)
        else:
            meta = "steps" if name == "steps" else "learning_rate"
            store[name] = {n: t.get(meta) for n, t in zip(self.selected, self.session.training())}

    def select(self, names: Sequence[str]) -> list[str]:
        names = limits.check_selection(names, [s.name for s in self.session.specs])
        self.check_count(self.method, len(names))
        self.session.select(names)
        self.session.prepare_references(self.prompt_list())
        return self.selected

    def set_setup(self, selection: Sequence[str], method: str, weights: Sequence[float]) -> None:
        """Back to a selection, aggregator and coefficients a long job ran on (live changes go on beside it):
        its result (a tuned λ and hyperparameters) is about that setup, not whatever is set when it ends."""
        self.method = limits.check_method(method)
        self.select(list(selection))
        for name, w in zip(selection, weights):
            self.set_weight(name, w)

    def compute_landscape(self, **kwargs):
        """evaluation.landscape.compute on this playground, remembered as the landscape on screen (its clicks)."""
        from . import landscape

        ls = landscape.compute(self, **kwargs)
        self.landscape_of = (tuple(ls.names), self.session.base_ref)
        return ls

    def click_landscape(self, a: Any, b: Any) -> None:
        """A cell of the landscape on screen was clicked: Task Arithmetic at λ = 1 of *its* two fine-tunes (selected
        again if the selection changed since; it merged the new selection at the cell's coefficients) with the
        cell's coefficients. Refused when the landscape was computed on another base."""
        if self.landscape_of is None:
            raise MergeError("landscape: none computed in this session yet; run it first")
        names, base = self.landscape_of
        known = [s.name for s in self.session.specs]
        if base != self.session.base_ref or any(n not in known for n in names):
            raise MergeError(f"landscape: it was computed for {' × '.join(names)} on another base model or model "
                             "list; run it again")
        a, b = (clamp(v, *WEIGHT_RANGE, default=1.0) for v in (a, b))
        self.method = "task_arithmetic"
        self.select(list(names))
        self.set_lambda(1.0)
        self.set_weight(names[0], a)
        self.set_weight(names[1], b)
        self.scenario = None

    def set_prompts(self, text: str) -> None:
        """The prompt lines (empty: the demo prompts), refused past the count/length limits."""
        self.prompts = limits.check_prompts(text) or None

    def check_api(self, selection: Any, method: Any, lam: Any, weights: Any, hyper: Any, prompts: Any) -> tuple:
        """Every argument of one API request checked against its bound before any work (nothing changes):
        returns (selection, method, λ, weights, hyper, prompts); empty selection/method keep the current ones."""
        prompts = "\n".join(limits.check_prompts(prompts))
        names = [s.name for s in self.session.specs]
        sel = limits.check_selection(selection, names) if selection else self.selected
        method = limits.check_method(method or self.method)
        self.check_count(method, len(sel))
        if weights is None:
            weights = []
        if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
            raise MergeError("weights: expected a list of numbers, one per selected model")
        if len(weights) > len(sel):
            raise MergeError(f"weights: {len(weights)} given for {len(sel)} selected models")
        weights = limits.check_weights(sel, weights)
        lam = limits.check_number("λ", lam, *LAMBDA_RANGE)
        if hyper is None:
            hyper = {}
        if not isinstance(hyper, dict):
            raise MergeError("hyper: expected an object of hyperparameters by name")
        for p in AGGREGATORS[method].params:  # a per-model list: one value per selected model, as the weights
            v = hyper.get(p.name)
            if p.per_model and isinstance(v, (list, tuple)) and len(v) != len(sel):
                raise MergeError(f"{p.name}: {len(v)} values given for {len(sel)} selected models")
        limits.check_hyper(method, clean_hyper(method, hyper, len(sel)), len(sel))
        return sel, method, lam, weights, hyper, prompts

    def apply_scenario(self, sc: Scenario) -> None:
        known = {s.name for s in self.session.specs}
        missing = [m for m in sc.models if m not in known]
        if missing:
            raise MergeError(f"scenario {sc.title!r} needs {', '.join(missing)}, which this zoo lacks")
        zoo_base = read_zoo(self.session.zoo)[0]  # a scenario is a setup on the zoo: its base too
        if self.session.base_ref != zoo_base:
            self.session.set_base(zoo_base)
        self.session.select(sc.models)
        self.method, self.lam = sc.method, sc.lam
        self.weights.update({m: w for m, w in zip(sc.models, sc.weight_list())})
        self.hyper[sc.method] = dict(sc.hyper)
        self.prompts = None
        self.scenario, self._scenario_base = sc, zoo_base
        self.session.prepare_references(self.prompt_list())

    def scenario_changes(self) -> list[str]:
        """What was changed since the scenario set up its merge: its claim is about that setup."""
        sc = self.scenario
        if sc is None:
            return []
        changed = []
        if set(self.selected) != set(sc.models):
            changed.append("the models")
        elif [self.weights.get(m, 1.0) for m in sc.models] != sc.weight_list():
            changed.append("the coefficients")
        if self.method not in sc.claim_methods():
            changed.append("the aggregator")
        else:
            lam, hyper = sc.settings_for(self.method)
            if not math.isclose(self.lam, lam):
                changed.append("λ")
            if any(self.hyper.get(self.method, {}).get(k) != v for k, v in hyper.items()):
                changed.append("the hyperparameters")
        if self.session.base_ref != self._scenario_base:
            changed.append("the base")
        return changed

    def newest_input(self, key: tuple, seq: Any) -> bool:
        """Whether a panel input stamped `seq` (the page's clock) is newer than the last one applied for
        `key`: each key press is its own request, and requests can be handled out of order."""
        if isinstance(seq, bool) or not isinstance(seq, (int, float)) or not math.isfinite(seq):
            return True  # no stamp (an API caller)
        with self._seq_lock:
            if seq <= self._inputs_seen.get(key, -math.inf):
                return False
            self._inputs_seen[key] = seq
            return True

    # ------------------------------------------------------------------ one merge per action
    def act(self, change: Callable[[], Any] | None = None) -> View | None:
        """Apply `change`, then merge and score once. None when a newer action came in meanwhile."""
        with self._seq_lock:
            self._seq += 1
            token = self._seq
        with self._work:
            if change is not None:
                change()
            if token != self._seq:
                return None
            return self.view()

    def view(self) -> View:
        s = self.session
        res = s.live(self.method, self.weight_list(), self.lam, self.hyper_values(), self.prompt_list())
        self.last = res
        sim = s.similarity_live()
        acc = plots.accuracy_bars(res.tasks, res.accuracy)
        acc.update_layout(height=340, legend=dict(orientation="h", y=-0.2), margin=dict(l=40, r=10, t=40, b=40))
        hm = plots.similarity_heatmap(sim)
        hm.update_layout(height=340, title=dict(text="Cosine: task vectors & merge"),  # fits a phone
                         margin=dict(l=40, r=10, t=40, b=40))
        mean = res.normalized.get("mean")
        status = (f"**{self.method}**, λ = {self.lam:g}, {len(self.selected)} model(s): mean normalized accuracy "
                  f"**{'—' if mean is None else f'{mean:.0%}'}** on {len(res.tasks)} task(s) "
                  f"(validation, {LIVE_N} per task) · {res.seconds * 1000:.0f} ms"
                  + (f" on {s.device}" if s.device.type != "cpu" else ""))
        if res.notes:  # e.g. a prompt cut to the model's context
            status += "  \nℹ️ " + "; ".join(res.notes)
        return View(outputs_html(res), acc, hm, status, res)

    # ------------------------------------------------------------------ long jobs
    def request_job(self, what: str) -> int:
        """A long job was asked for: its slot is taken now (a second one is refused before it queues) and
        Cancel is armed for it. Returns how many other sessions' long jobs run now (it waits for them)."""
        mine = self.session.busy
        others = self.session.reserve_job(what)
        if not mine:
            self.cancel.clear()
        return others

    def cancel_jobs(self) -> str | None:
        """Cancel pressed: stop this session's running jobs (at their next check) and drop its waiting ones (their
        slots are free at once). "running" when one was running, "queued" when only waiting ones were dropped,
        None when there was none."""
        dropped, running = self.session.cancel_queued()
        if running:
            self.cancel.set()  # checked between merges; the job clears it as it ends
        return "running" if running else "queued" if dropped else None

    def dequeue(self) -> bool:
        """A long job's handler starts (its request left the server's queue): False when Cancel dropped it while
        it waited; then it does nothing."""
        return self.session.leave_queue()

    def progress_checker(self, progress: Callable[[float, str], None] | None = None) -> Callable[[float, str], None]:
        """A progress callback that raises Cancelled once Cancel was pressed (checked between merges)."""
        def tick(frac: float, text: str) -> None:
            if self.cancel.is_set():
                raise Cancelled("cancelled")
            if progress:
                progress(frac, text)
        return tick

    def tune_lambdas(self, method: str | None = None) -> list[float]:
        """Auto-tune's λ grid: the paper's, cut where the search's λ would pass the λ slider's top. The search
        stretches the grid by K for the averaging aggregators (FedNova, median): from K = 5 on it reached past
        the slider, and the tuned λ was then clamped onto it, so the Merge tab showed another merge than the one
        reported (seven fine-tunes at weight 0.4: median tuned to λ = 11.2, shown at 8)."""
        from .search import LAMBDAS, method_lambdas

        method, k = method or self.method, max(len(self.selected), 1)
        return [l for l, stretched in zip(LAMBDAS, method_lambdas(method, k, LAMBDAS)) if stretched <= LAMBDA_RANGE[1]]

    def seconds_per_eval(self, n_val: int) -> float:
        """One merge + scoring at n_val examples per task, from the last live update's timing."""
        if self.last is None:
            return 0.2 * len(self.session.tasks)
        per = self.last.timings.get("evaluate + generate", self.last.seconds) + self.last.timings.get("merge", 0.0)
        return max(per * n_val / LIVE_N, 0.01)


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _cell(text: str) -> str:
    """A coloured, marked cell from a `_mark`ed output ("✓ out" / "✗ out" / free text)."""
    if text.startswith("✓ "):
        body = text[2:]
        return f'<td class="fm-ok" title="correct"><b aria-label="correct">✓</b> {_esc(body) or "<i>(empty)</i>"}</td>'
    if text.startswith("✗ "):
        body = text[2:]
        return f'<td class="fm-bad" title="wrong"><b aria-label="wrong">✗</b> {_esc(body) or "<i>(empty)</i>"}</td>'
    return f'<td class="fm-free">{_esc(text) or "<i>(empty)</i>"}</td>'


def outputs_html(res: LiveResult) -> str:
    """The merge's answer next to the expected one, first; the fine-tunes' answers folded below."""
    k = len(res.headers) - 4  # prompt, expected, base, k fine-tunes, merged
    fts = res.headers[3:3 + k]
    head = "<tr><th>prompt</th><th>expected</th><th class='fm-merged'>merged</th><th>base</th></tr>"
    body = []
    for r in res.rows:
        expected = _esc(r[1]) if r[1] else "<i>free text</i>"
        body.append(f"<tr><td class='fm-prompt'>{_esc(r[0])}</td><td>{expected}</td>{_cell(r[-1])}{_cell(r[2])}</tr>")
    main = (f"<table class='fm-out' id='fm-out-main'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")
    if not res.rows:
        main = "<p><i>No prompts: type some below.</i></p>"
    ft_head = "<tr><th>prompt</th>" + "".join(f"<th>{_esc(n)}</th>" for n in fts) + "</tr>"
    ft_body = "".join("<tr><td class='fm-prompt'>" + _esc(r[0]) + "</td>" + "".join(_cell(c) for c in r[3:3 + k])
                      + "</tr>" for r in res.rows)
    fold = (f"<details class='fm-fts'{' open' if k <= 3 else ''}><summary>Each fine-tune's own answers ({k})</summary>"
            f"<div class='fm-scroll'><table class='fm-out'><thead>{ft_head}</thead><tbody>{ft_body}</tbody></table>"
            f"</div></details>")
    legend = ("<p class='fm-legend'><span class='fm-ok'>✓ correct</span> <span class='fm-bad'>✗ wrong</span> "
              "(exact match against the expected answer)</p>")
    return f"<div class='fm-outputs'>{legend}{main}{fold if res.rows and k else ''}</div>"


OUTPUTS_CSS = """
.fm-outputs table.fm-out {border-collapse: collapse; width: 100%; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 0.85em; table-layout: auto}
.fm-outputs th, .fm-outputs td {border: 1px solid #d0d4dc; padding: 3px 6px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere}
.fm-outputs th {overflow-wrap: normal}  /* a header breaks between words, never inside one ("expecte d") */
.fm-outputs th.fm-merged {background: #e0e7ff}
.fm-outputs td.fm-ok, .fm-legend .fm-ok {background: #c9efcf; color: #0b4a17}
.fm-outputs td.fm-bad, .fm-legend .fm-bad {background: #fbd0d0; color: #7a0d0d}
.fm-outputs td.fm-free {background: #f3f4f6; color: #222}
.fm-legend span {padding: 1px 6px; border-radius: 3px; font-size: 0.85em}
.fm-outputs details {margin-top: 0.5em}
.fm-scroll {overflow-x: auto}
"""


# ---------------------------------------------------------------------------- models and take-away

def add_model(pg: Playground, ref: str, name: str | None = None, task: str | None = None, progress=None) -> str:
    """Add a fine-tune (refused when that folder or Hub id is already listed) and score it once."""
    import os

    ref = limits.check_text("model", ref)  # bounded before anything looks at it
    if not ref:
        raise MergeError("model: enter a Hub id or a local folder")

    def key(r: str) -> str:  # lexical: the session's allow-list is checked before the disk is
        return os.path.normpath(os.path.abspath(os.path.expanduser(r))) if ("/" in r or r.startswith(".")) else r

    for s in pg.session.specs:
        if key(s.ref) == key(ref):
            raise MergeError(f"{ref} is already listed, as {s.name!r}")
    spec = pg.session.add_model(ref, name, task, progress=progress)
    pg.session.prepare_references(pg.prompt_list())
    return spec.name


def model_card(pg: Playground) -> str:
    """The take-away's README: how the merge was made (method, λ, weights, hyperparameters) and its live scores."""
    s = pg.session.settings
    if s is None:
        raise MergeError("nothing merged yet")
    cfg = pg.session.export_config()
    lines = ["---", "library_name: transformers", "tags: [merge, fedmerge]", "---",
             f"# Merged in the FedMerge Playground: `{s.method}`", "",
             AGGREGATORS[s.method].summary if s.method in AGGREGATORS else "", "",
             f"- base model: `{cfg.base_model}`", f"- λ = {s.lam}", "", "| fine-tune | weight wᵢ |", "|---|---|"]
    lines += [f"| `{m.model}` | {w:g} |" for m, w in zip(cfg.models, s.weights)]
    hyper = {k: v for k, v in s.hyper.items() if v is not None}
    lines += ["", "Hyperparameters: " + (", ".join(f"`{k}` = {v}" for k, v in hyper.items()) or "none besides λ and wᵢ")]
    if pg.last is not None:
        res = pg.last
        lines += ["", f"## Live scores (validation, {LIVE_N} examples per task, exact match)", "",
                  "| task | merged | own fine-tune | base |", "|---|---|---|---|"]
        for t in res.tasks:
            a = res.accuracy
            lines.append(f"| {t} | {a['merged'].get(t, 0):.0%} | {a['fine-tuned (own task)'].get(t, 0):.0%} | "
                         f"{a['base'].get(t, 0):.0%} |")
        if res.normalized.get("mean") is not None:
            lines.append(f"\nMean normalized accuracy (merged ÷ own fine-tune): {res.normalized['mean']:.2f}")
    lines += ["", "## Reproduce", "", "```yaml", cfg.to_yaml().rstrip(), "```", "",
              "`python -m merging merge merge_config.yml OUT_DIR` (from the FedMerge repository root)."]
    return "\n".join(lines) + "\n"


def live_kwargs(method: str = DEFAULT_METHOD, lam: float = 1.0, weights: list[float] | None = None,
                hyper: dict[str, Any] | None = None, prompts: str = "", selection: list[str] | None = None) -> dict:
    """Keyword arguments of the app's /live endpoint for gradio_client (tests, benchmarks):
    `client.predict(**live_kwargs(...), api_name="/live")`. Here, not in app.py, so callers need not import the app."""
    return dict(selection=list(selection or []), method=method, lam=float(lam), weights=list(weights or []),
                hyper=dict(hyper or {}), prompts=prompts)


# ---------------------------------------------------------------------------- the per-model panel

# A moved input also gets its value attribute: Gradio redraws the panel by comparing attributes, so a value
# the server sends back (a scenario's coefficient) would otherwise not reach a slider the user has moved.
PANEL_JS = ("element.addEventListener('input', (e) => { const t = e.target; if (t.type === 'range') { "
            "t.setAttribute('value', t.value); "
            "const o = t.parentElement.querySelector('output'); if (o) { o.textContent = Number(t.value).toFixed(2); } } });"
            "element.addEventListener('change', (e) => { const t = e.target; if (t.dataset && t.dataset.name) { "
            "t.setAttribute('value', t.value); "
            "trigger('input', {name: t.dataset.name, hp: t.dataset.hp || null, value: parseFloat(t.value), "
            "seq: performance.now()}); } });")  # seq: one request per key press; they may arrive out of order
PANEL_CSS = """
.fm-panel .fm-w {display: grid; grid-template-columns: 1fr 3.2em; gap: 0 6px; align-items: center; margin: 2px 0 6px}
.fm-panel .fm-w label {grid-column: 1 / span 2; font-size: 0.85em; font-weight: 600}
.fm-panel .fm-w input[type=range] {width: 100%; accent-color: #4f46e5}
.fm-panel .fm-w output {font-family: ui-monospace, monospace; font-size: 0.85em; text-align: right}
.fm-panel .fm-hp input {width: 6em}
.fm-panel h4 {margin: 4px 0}
"""


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def panel_html(pg: Playground) -> str:
    """One coefficient slider per selected model (however many), plus per-model hyperparameter boxes
    when the method has them and they are not on auto. Native inputs: their `change` fires once per
    release or key press, so one user action is one request."""
    lo, hi = WEIGHT_RANGE
    rows = [f"<h4>Per-model coefficients wᵢ ({len(pg.selected)})</h4>"]
    for spec in pg.session.selected_specs:
        w = pg.weights.get(spec.name, 1.0)
        label = _esc(spec.name) + (f" <small>({_esc(spec.task)})</small>" if spec.task else "")
        rows.append(f"<div class='fm-w' id='fm-w-{_slug(spec.name)}'><label for='fm-wi-{_slug(spec.name)}'>w · {label}"
                    f"</label><input type='range' id='fm-wi-{_slug(spec.name)}' min='{lo}' max='{hi}' step='0.05' "
                    f"value='{w}' data-name='{_esc(spec.name)}' aria-label='coefficient of {_esc(spec.name)}'>"
                    f"<output>{w:.2f}</output></div>")
    for p in AGGREGATORS[pg.method].params:
        cur = pg.hyper.get(pg.method, {}).get(p.name)
        if p.per_model and p.optional and isinstance(cur, dict):
            rows.append(f"<h4>{_esc(p.name)} per model</h4>")
            for name in pg.selected:
                v = cur.get(name)
                rows.append(f"<div class='fm-hp'><label>{_esc(p.name)} · {_esc(name)} <input type='number' "
                            f"data-name='{_esc(name)}' data-hp='{_esc(p.name)}' value='{'' if v is None else v}' "
                            f"min='{p.low if p.low is not None else ''}'></label></div>")
    # a new stamp on every render, or Gradio skips a panel equal to the one it last got from the server (a
    # scenario's button, after the user moved a slider, sends the coefficients the panel last showed)
    pg.panel_renders += 1
    return f"<div class='fm-panel' data-render='{pg.panel_renders}'>" + "".join(rows) + "</div>"
