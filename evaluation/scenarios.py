"""Workshop scenarios: named merges with a sentence on what to look at and a claim a test checks.

Scenarios are data, declared in ONE file (`assets/zoo/scenarios.json`, or FEDMERGE_SCENARIOS), so
a rebuilt zoo only needs new entries there. Each entry:

    {"id": "two-tasks", "title": "Two tasks merge",
     "models": ["upper", "is_even"],              # zoo names (zoo.json "name"), merged in this order
     "method": "task_arithmetic", "lambda": 1.0,
     "weights": {"upper": 1.0},                   # optional; missing models get 1.0
     "hyper": {},                                  # the method's hyperparameters (registry names)
     "explain": "Two or three sentences on what to look at.",
     "claim": {"kind": "min_normalized", "value": 0.8, "split": "test", "n": 50}}

Claim kinds (each scored with exact match on `split`, first `n` examples per task; "normalized" =
merged accuracy ÷ the best selected fine-tune of that task, averaged over the selected tasks):

* ``min_normalized``: the scenario's merge reaches mean normalized accuracy ≥ ``value``.
* ``beats``: ``method`` beats ``over`` by ≥ ``by`` in mean normalized accuracy. Each runs at the
  scenario's weights, with λ from ``lambdas[method]`` (else the scenario's λ) and hyperparameters
  from ``hypers[method]`` (else the scenario's, when it is the scenario's method).
* ``best``: ``winner`` scores highest of ``among`` (settings as for ``beats``), by ≥ ``by`` (default 0).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from merging.errors import MergeError
from merging.registry import AGGREGATORS

ROOT = Path(__file__).resolve().parent.parent
CLAIM_KINDS = ("min_normalized", "beats", "best")


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    models: list[str]
    method: str
    lam: float
    weights: dict[str, float]
    hyper: dict[str, Any]
    explain: str
    claim: dict[str, Any]

    def weight_list(self) -> list[float]:
        return [float(self.weights.get(m, 1.0)) for m in self.models]

    def settings_for(self, method: str) -> tuple[float, dict[str, Any]]:
        """(λ, hyperparameters) the claim uses for `method`."""
        lam = float(self.claim.get("lambdas", {}).get(method, self.lam))
        hyper = self.claim.get("hypers", {}).get(method)
        if hyper is None:
            hyper = self.hyper if method == self.method else {}
        return lam, dict(hyper)

    def claim_methods(self) -> list[str]:
        """The aggregators the claim compares (each at settings_for's λ and hyperparameters)."""
        c = self.claim
        if c["kind"] == "min_normalized":
            return [self.method]
        return [c["method"], c["over"]] if c["kind"] == "beats" else list(c["among"])

    def claim_text(self) -> str:
        """The claim in words, as the app shows it."""
        c = self.claim
        where = f"on {c.get('split', 'test')} (n = {c.get('n', 50)} per task)"
        if c["kind"] == "min_normalized":
            return f"this merge keeps at least {c['value']:.0%} of the fine-tunes' accuracy (mean normalized) {where}"
        if c["kind"] == "beats":
            return (f"**{c['method']}** beats **{c['over']}** by at least {c['by']:.2f} mean normalized accuracy "
                    f"{where}")
        among = ", ".join(c["among"])
        return f"**{c['winner']}** scores highest among {among} {where}"


def scenarios_path() -> Path:
    env = os.environ.get("FEDMERGE_SCENARIOS")
    if env:
        return Path(env)
    from .session import zoo_dir

    own = zoo_dir() / "scenarios.json"
    return own if own.exists() else ROOT / "assets" / "zoo" / "scenarios.json"


def _need(entry: Mapping[str, Any], key: str, where: str):
    if key not in entry:
        raise MergeError(f"{where}: missing {key!r}")
    return entry[key]


def parse(entry: Mapping[str, Any]) -> Scenario:
    """One entry of the file, checked: a bad entry names itself and the field."""
    where = f"scenario {entry.get('id', '?')!r}"
    sid = str(_need(entry, "id", where))
    models = [str(m) for m in _need(entry, "models", where)]
    if not models or len(set(models)) != len(models):
        raise MergeError(f"{where}: 'models' must list distinct fine-tunes")
    method = str(_need(entry, "method", where))
    if method not in AGGREGATORS:
        raise MergeError(f"{where}: unknown method {method!r}")
    AGGREGATORS[method].check_model_count(len(models))
    weights = {str(k): float(v) for k, v in (entry.get("weights") or {}).items()}
    if set(weights) - set(models):
        raise MergeError(f"{where}: weights for models not in 'models': {sorted(set(weights) - set(models))}")
    hyper = dict(entry.get("hyper") or {})
    unknown = set(hyper) - {p.name for p in AGGREGATORS[method].params}
    if unknown:
        raise MergeError(f"{where}: {method} has no hyperparameter {sorted(unknown)}")
    claim = dict(_need(entry, "claim", where))
    kind = claim.get("kind")
    if kind not in CLAIM_KINDS:
        raise MergeError(f"{where}: claim kind must be one of {CLAIM_KINDS}, not {kind!r}")
    needed = {"min_normalized": ("value",), "beats": ("method", "over", "by"), "best": ("winner", "among")}[kind]
    for key in needed:
        _need(claim, key, f"{where} claim")
    for m in [claim.get("method"), claim.get("over"), claim.get("winner"), *claim.get("among", [])]:
        if m is not None and m not in AGGREGATORS:
            raise MergeError(f"{where} claim: unknown method {m!r}")
    return Scenario(sid, str(_need(entry, "title", where)), models, method, float(entry.get("lambda", 1.0)),
                    weights, hyper, str(entry.get("explain", "")), claim)


def load(path: str | os.PathLike | None = None) -> list[Scenario]:
    """All scenarios of the file, in file order (an absent file means none)."""
    path = Path(path) if path is not None else scenarios_path()
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    items = data["scenarios"] if isinstance(data, dict) else data
    out = [parse(e) for e in items]
    ids = [s.id for s in out]
    if len(set(ids)) != len(ids):
        raise MergeError(f"{path.name}: two scenarios share an id")
    return out


def by_id(scenario_id: str, scenarios: list[Scenario] | None = None) -> Scenario:
    known = scenarios if scenarios is not None else load()
    for s in known:
        if s.id == scenario_id:
            return s
    plain = isinstance(scenario_id, str) and re.fullmatch(r"[\w-]{1,40}", scenario_id)  # echo no markup, no essay
    raise MergeError(f"no scenario {repr(scenario_id) if plain else 'with that id'}; "
                     f"known: {', '.join(s.id for s in known)}")


# ---------------------------------------------------------------------------- claims

@dataclass
class ClaimResult:
    holds: bool
    scores: dict[str, float]  # method -> mean normalized accuracy
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> task -> accuracy
    text: str = ""


def score(session, scenario: Scenario, method: str, split: str, n: int) -> tuple[float, dict[str, float]]:
    """Mean normalized accuracy (and per-task accuracy) of `method` at the scenario's settings."""
    from .harness import evaluate, normalized

    lam, hyper = scenario.settings_for(method)
    session.select(scenario.models)
    session.apply(method, scenario.weight_list(), lam, hyper)
    res = evaluate(session.live_model.model, session.tokenizer, session.tasks, split=split, n=n)
    ft = session.finetuned_accuracy(split, n)
    return normalized(res.accuracy, ft).get("mean", 0.0), dict(res.accuracy)


def check_claim(scenario: Scenario, session=None) -> ClaimResult:
    """Run the scenario's merges and say whether its claim holds (on the session's zoo, default the app's)."""
    from .session import Session

    own = session is None
    session = session or Session(allow_hub=False).load_zoo()
    c = scenario.claim
    split, n = c.get("split", "test"), int(c.get("n", 50))
    try:
        methods = scenario.claim_methods()
        scores, per_task = {}, {}
        for m in methods:
            scores[m], per_task[m] = score(session, scenario, m, split, n)
    finally:
        if own:
            session.close()
    if c["kind"] == "min_normalized":
        s = scores[scenario.method]
        holds, text = s >= c["value"], f"{scenario.method}: {s:.2f} (needs ≥ {c['value']:.2f})"
    elif c["kind"] == "beats":
        gap = scores[c["method"]] - scores[c["over"]]
        holds = gap >= c["by"]
        text = f"{c['method']} {scores[c['method']]:.2f} vs {c['over']} {scores[c['over']]:.2f} (gap {gap:+.2f}, needs ≥ {c['by']:.2f})"
    else:
        others = [scores[m] for m in methods if m != c["winner"]]
        gap = scores[c["winner"]] - max(others) if others else 0.0
        holds = gap >= float(c.get("by", 0.0)) and gap > 0
        text = ", ".join(f"{m} {scores[m]:.2f}" for m in sorted(scores, key=lambda m: -scores[m]))
    return ClaimResult(bool(holds), scores, per_task, text)
