"""What a built zoo does, measured through the library, and the claims its README makes.

``measure(zoo)`` tunes merges as the paper does (λ and each method's grid chosen on validation,
reported on test) with :func:`evaluation.search.search` on a :class:`~evaluation.session.Session`,
so the zoo README, the app and ``python -m evaluation compare`` share one code path.
``claims(report)`` turns the measurements into the zoo's checked statements; the slow test
re-evaluates the shipped models at the recorded settings and asserts them again. Differences are
claimed only with a paired bootstrap interval over the test examples that excludes zero.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .distributed import session_map
from .harness import evaluate
from .scorer import LIVE_SPLIT
from .tasks import Task, get_task

PAIR_LAMBDAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(2, 21))  # 0.2 … 2.0
ALL_METHODS = ("task_arithmetic", "fednova", "fedgma", "median", "cclip", "ties")
FL_ROBUST = ("fedgma", "median", "cclip")  # the aggregators that answer data heterogeneity
N_VAL, N_TEST = 50, 300  # 300 = every test example of a task

# The zoo's targets (issue 11); claims() checks each against the measurements.
TARGETS = {"base_max": 0.10, "finetune_min": 0.95, "pairs_mean": 0.85, "pairs_share": 0.8, "pair_good": 0.8,
           "pair_bad": 0.6, "all_ta": 0.5, "all_best": 0.6, "conflict_loss": 0.3, "conflict_win": 0.1,
           "hetero_drop": 0.1, "hetero_recover": 0.5, "size_mb": 40.0, "rebuild_min": 30.0}


@dataclass(frozen=True)
class Setting:
    """One merge: which fine-tunes, which method, λ and hyperparameters."""
    models: tuple[str, ...]
    method: str
    lam: float
    hyper: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "method": self.method, "lambda": self.lam, "hyper": dict(self.hyper)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Setting":
        return cls(tuple(d["models"]), d["method"], float(d["lambda"]), tuple(sorted(d.get("hyper", {}).items())))


def hits(session, setting: Setting, n: int = N_TEST) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(task -> per-example correctness on test, task -> own fine-tune test accuracy) of one merge."""
    session.select(list(setting.models))
    own = session.finetuned_accuracy("test", n)
    session.apply(setting.method, [1.0] * len(setting.models), setting.lam, dict(setting.hyper))
    res = evaluate(session.live_model.model, session.tokenizer, session.tasks, split="test", n=n)
    out = {}
    for t in session.tasks:
        exs = res.examples[t]
        out[t] = np.array([Task.score(p, e.answer) for p, e in zip(res.predictions[t], exs)], dtype=float)
    return out, own


def normalized_mean(h: Mapping[str, np.ndarray], own: Mapping[str, float]) -> float:
    """Mean over tasks of merged ÷ own accuracy (NaN when no fine-tune scores at all, as in the tiny recipe)."""
    ratios = [h[t].mean() / own[t] for t in h if own.get(t)]
    return float(np.mean(ratios)) if ratios else float("nan")


def bootstrap_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], own: Mapping[str, float],
                   own_b: Mapping[str, float] | None = None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired percentile interval of normalized_mean(a) − normalized_mean(b) (scipy.stats.bootstrap):
    both merges are scored on the same test examples, so each task's per-example differences are
    one sample, resampled within its task."""
    from scipy.stats import bootstrap

    own_b = own_b or own
    tasks = [t for t in a if own.get(t) and own_b.get(t)]
    if not tasks:
        return float("nan"), float("nan")
    diffs = [a[t] / own[t] - b[t] / own_b[t] for t in tasks]
    mean_of_means = lambda *d, axis: np.mean([x.mean(axis) for x in d], axis=0)  # noqa: E731
    res = bootstrap(diffs, mean_of_means, n_resamples=n_boot, vectorized=True, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def tune(session, models: Sequence[str], method: str, lambdas: Sequence[float] | None = None,
         n_val: int = N_VAL, quick: bool = True) -> tuple[Setting, float]:
    """The (setting, validation normalized mean) that search() picks for `method` on `models`."""
    from .search import QUICK_LAMBDAS, search

    session.select(list(models))
    r = search(session, method, lambdas=lambdas or QUICK_LAMBDAS, quick=quick, n_val=n_val, n_test=1)
    return Setting(tuple(models), method, r.best_lambda, tuple(sorted(r.best_hyper.items()))), r.best_score


def zoo_index(zoo: str | Path) -> dict[str, Any]:
    return json.loads((Path(zoo) / "zoo.json").read_text())


class _Scorer:
    """Scores settings on one session's test split (the claims' numbers). Each setting's per-example
    hits are computed once; `prefetch` computes many in forked processes (`evaluation.distributed`)."""

    def __init__(self, session, n_test: int):
        self.session, self.n_test = session, n_test
        self._hits: dict[Setting, tuple[dict[str, np.ndarray], dict[str, float]]] = {}

    def prefetch(self, settings: Sequence[Setting]) -> None:
        todo = list(dict.fromkeys(s for s in settings if s not in self._hits))
        self.session.select(list(range(len(self.session.specs))))  # every model's reference scores, once
        for i, h in session_map(self.session, _hits_job, [(s, self.n_test) for s in todo], [("test", self.n_test)]):
            self._hits[todo[i]] = h

    def hits(self, setting: Setting) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if setting not in self._hits:
            self._hits[setting] = hits(self.session, setting, self.n_test)
        return self._hits[setting]

    def scored(self, setting: Setting, val: float | None = None) -> dict[str, Any]:
        h, own = self.hits(setting)
        return {**setting.to_dict(), "validation_normalized": val,
                "test_accuracy": {t: float(v.mean()) for t, v in h.items()}, "test_normalized": normalized_mean(h, own)}

    def interval(self, a: Setting | Sequence[Setting], b: Setting | Sequence[Setting]) -> list[float]:
        """95% interval of normalized(a) − normalized(b); a list of pair merges counts as one pooled merge."""
        ha, own_a = self.pooled(a)
        hb, own_b = self.pooled(b)
        return list(bootstrap_diff(ha, hb, own_a, own_b))

    def pooled(self, settings: Setting | Sequence[Setting]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Hits of several merges as one: keyed "merge index/task", so each merge's tasks count once."""
        if isinstance(settings, Setting):
            return self.hits(settings)
        h, own = {}, {}
        for i, st in enumerate(settings):
            hi, oi = self.hits(st)
            h.update({f"{i}/{t}": v for t, v in hi.items()})
            own.update({f"{i}/{t}": v for t, v in oi.items()})
        return h, own

    def group(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Scored pair merges and their pooled normalized mean (the mean over the pairs)."""
        h, own = self.pooled([Setting.from_dict(r) for r in rows])
        return {"pairs": list(rows), "test_normalized": normalized_mean(h, own)}


def _hits_job(session, job: tuple[Setting, int]):
    return hits(session, *job)


def _tune_job(session, job: tuple[tuple[str, ...], str, tuple[float, ...], int]) -> tuple[Setting, float]:
    return tune(session, *job)


def _open(zoo: Path):
    from .session import Session

    return Session(zoo=zoo, allow_hub=False).load_zoo()


def base_form_accuracy(zoo: str | Path, n: int = N_TEST) -> dict[str, float]:
    """The base's exact-match accuracy on each task asked under its base form (``mirror: abc=``), on the
    task's first `n` test inputs: whether the base has the skill a fine-tune is meant to elicit."""
    from .zoo import BASE_FORMS, load

    model, tok = load(Path(zoo) / "base")
    prompts, answers, owner = [], [], []
    for task, form in BASE_FORMS.items():
        t = get_task(task)
        for ex in t.examples("test", n):
            prompts.append(form + ex.prompt[len(t.keyword):])  # "reverse: abc=" -> "mirror: abc="
            answers.append(ex.answer)
            owner.append(task)
    gen = evaluate(model, tok, [], prompts=prompts, prompt_limits=[get_task(o).max_new_tokens for o in owner]).generations
    hits = {task: [] for task in BASE_FORMS}
    for o, g, a in zip(owner, gen, answers):
        hits[o].append(Task.score(g, a))
    return {task: float(np.mean(h)) for task, h in hits.items()}


def measure(zoo: str | Path, n_val: int = N_VAL, n_test: int = N_TEST, lambdas: Sequence[float] | None = None,
            log=print) -> dict[str, Any]:
    """Every merge measurement the zoo README reports (see the module docstring).

    `lambdas` replaces both λ grids (pairs: 0.2…2.0, groups: 0.1…2.0), for the tiny test recipe.
    """
    from .search import QUICK_LAMBDAS

    zoo = Path(zoo)
    index = zoo_index(zoo)
    primary = [f["name"] for f in index["finetunes"] if not f.get("variant_of")]
    variants = {f["variant_of"]: f["name"] for f in index["finetunes"] if f.get("variant_of")}
    conflicts = [tuple(c) for c in index.get("conflicts", [])]
    pair_lams, group_lams = tuple(lambdas or PAIR_LAMBDAS), tuple(lambdas or QUICK_LAMBDAS)
    session = _open(zoo)
    sc = _Scorer(session, n_test)
    rep: dict[str, Any] = {"primary": primary, "variants": variants, "conflicts": [list(c) for c in conflicts],
                           "n_val": n_val, "n_test": n_test}

    session.select([s.name for s in session.specs])
    sim = session.similarity(with_merged=False)
    rep["base_forms"] = base_form_accuracy(zoo, n_test)
    rep["similarity"] = {"names": sim.names, "cosine": sim.cosine.tolist(), "sign_conflict": sim.sign_conflict.tolist(),
                         "norms": sim.norms.tolist()}

    # Every merge to tune, tuned first (in forked processes where that helps), then every chosen
    # setting scored on test once; the report below only assembles them.
    pairs = list(itertools.combinations(primary, 2))
    # training heterogeneity: each variant in place of its twin in the twin's pairs (where merging works)
    het = {twin: [n for n in primary if n != twin] for twin in variants if twin in primary}
    jobs = list(dict.fromkeys(  # the long ones (all fine-tunes at once) first
        [(tuple(primary), m, group_lams) for m in ALL_METHODS]
        + [((variants[twin], x), m, pair_lams) for twin, xs in het.items() for x in xs
           for m in ("task_arithmetic", "fednova")]
        + [((a, b), m, pair_lams) for a, b in conflicts for m in ("task_arithmetic", *FL_ROBUST)]
        + [((a, b), "task_arithmetic", pair_lams) for a, b in pairs]))
    log(f"tuning {len(jobs)} merges on validation (pairs, all fine-tunes at once, conflicts, training heterogeneity)")
    chosen: dict[tuple, tuple[Setting, float]] = {}
    for i, st in session_map(session, _tune_job, [(*j, n_val) for j in jobs], [(LIVE_SPLIT, n_val)]):
        chosen[jobs[i]] = st
    sc.prefetch([st[0] for st in chosen.values()])

    def tuned(models, method, lams):
        return chosen[(tuple(models), method, lams)]

    log("pairs: task arithmetic, λ tuned on validation")
    rep["pairs"] = []
    for a, b in pairs:
        row = sc.scored(*tuned([a, b], "task_arithmetic", pair_lams))
        i, j = sim.names.index(a), sim.names.index(b)
        row.update(cosine=float(sim.cosine[i, j]), sign_conflict=float(sim.sign_conflict[i, j]),
                   conflict=(a, b) in conflicts or (b, a) in conflicts)
        rep["pairs"].append(row)
        log(f"  {a} + {b}: λ {row['lambda']:g} test {row['test_normalized']:.2f}")

    log("all one-per-task fine-tunes at once")
    rep["all"] = {}
    for m in ALL_METHODS:
        rep["all"][m] = sc.scored(*tuned(primary, m, group_lams))
        log(f"  {m}: {rep['all'][m]['test_normalized']:.3f}")

    rep["conflict"] = []
    for a, b in conflicts:
        ta = tuned([a, b], "task_arithmetic", pair_lams)
        entry = {"pair": [a, b], "task_arithmetic": sc.scored(*ta)}
        for m in FL_ROBUST:
            s = tuned([a, b], m, pair_lams)
            entry[m] = {**sc.scored(*s), "interval_vs_task_arithmetic": sc.interval(s[0], ta[0])}
        rep["conflict"].append(entry)
        log(f"  conflict {a} + {b}: " + ", ".join(f"{m} {entry[m]['test_normalized']:.2f}"
                                                  for m in ("task_arithmetic", *FL_ROBUST)))

    rep["training_heterogeneity"] = []
    for twin, partners in het.items():
        variant = variants[twin]
        plain = [p for p in rep["pairs"] if twin in p["models"]]
        pairs_of = {m: [sc.scored(*tuned([variant, x], m, pair_lams)) for x in partners]
                    for m in ("task_arithmetic", "fednova")}
        entry = {"variant": variant, "twin": twin, "partners": partners, "plain_task_arithmetic": sc.group(plain),
                 **{m: sc.group(rows) for m, rows in pairs_of.items()}}
        entry.update(_het_intervals(sc, entry))
        rep["training_heterogeneity"].append(entry)
        log(f"  {variant} for {twin} in its pairs: TA {entry['plain_task_arithmetic']['test_normalized']:.3f} → "
            f"{entry['task_arithmetic']['test_normalized']:.3f}, FedNova {entry['fednova']['test_normalized']:.3f}")
    session.close()
    return rep


def _het_intervals(sc: _Scorer, h: Mapping[str, Any]) -> dict[str, list[float]]:
    """The drop (plain − with the variant) and FedNova's recovery (FedNova − TA), pooled over the pairs."""
    group = {k: [Setting.from_dict(r) for r in h[k]["pairs"]] for k in ("plain_task_arithmetic", "task_arithmetic", "fednova")}
    return {"drop_interval": sc.interval(group["plain_task_arithmetic"], group["task_arithmetic"]),
            "recovery_interval": sc.interval(group["fednova"], group["task_arithmetic"])}


def rescore(zoo: str | Path, rep: Mapping[str, Any]) -> dict[str, Any]:
    """`rep` with every recorded setting evaluated again on the models in `zoo` (no tuning): what
    the slow test asserts the claims on."""
    import copy

    session = _open(Path(zoo))
    sc = _Scorer(session, rep["n_test"])
    new = copy.deepcopy(dict(rep))
    rows = [*rep["pairs"], *rep["all"].values(), *(c[k] for c in rep["conflict"] for k in ("task_arithmetic", *FL_ROBUST)),
            *(r for h in rep["training_heterogeneity"] for k in ("task_arithmetic", "fednova") for r in h[k]["pairs"])]
    sc.prefetch([Setting.from_dict(r) for r in rows])

    def again(row):
        return {**row, **sc.scored(Setting.from_dict(row), row.get("validation_normalized"))}

    new["pairs"] = [again(p) for p in rep["pairs"]]
    new["all"] = {m: again(r) for m, r in rep["all"].items()}
    for c in new["conflict"]:
        ta = Setting.from_dict(c["task_arithmetic"])
        c["task_arithmetic"] = again(c["task_arithmetic"])
        for m in FL_ROBUST:
            c[m] = {**again(c[m]), "interval_vs_task_arithmetic": sc.interval(Setting.from_dict(c[m]), ta)}
    for h in new["training_heterogeneity"]:
        for k in ("plain_task_arithmetic", "task_arithmetic", "fednova"):
            h[k] = sc.group([again(r) for r in h[k]["pairs"]])
        h.update(_het_intervals(sc, h))
    session.close()
    return new


def claims(rep: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target of the zoo as {claim, value, ok}: what the README states and the slow test asserts."""
    T = TARGETS
    out = []

    def add(claim: str, value: str, ok: bool) -> None:
        out.append({"claim": claim, "value": value, "ok": bool(ok)})

    acc = rep["accuracy"]
    base_max = max(acc["base"].values())
    add(f"the base scores ≤ {T['base_max']:.0%} on every task", f"max {base_max:.0%}", base_max <= T["base_max"])
    own = {n: acc[n][rep["task_of"][n]] for n in rep["task_of"]}
    worst = min(own, key=own.get)
    add(f"every fine-tune scores ≥ {T['finetune_min']:.0%} on its own task", f"min {own[worst]:.0%} ({worst})",
        own[worst] >= T["finetune_min"])
    pairs = rep["pairs"]
    scores = [p["test_normalized"] for p in pairs]
    mean = float(np.mean(scores))
    add(f"pairwise Task Arithmetic keeps ≥ {T['pairs_mean']:.2f} normalized on average", f"{mean:.3f}",
        mean >= T["pairs_mean"])
    share = float(np.mean([s >= T["pair_good"] for s in scores]))
    add(f"≥ {T['pairs_share']:.0%} of the pairs reach {T['pair_good']}", f"{share:.0%} of {len(pairs)}",
        share >= T["pairs_share"])
    bad = {tuple(sorted(p["models"])) for p in pairs if p["test_normalized"] < T["pair_bad"]}
    designed = {tuple(sorted(c)) for c in rep["conflicts"]}
    add(f"the pairs below {T['pair_bad']} are exactly the designed conflicts",
        ", ".join(" + ".join(b) for b in sorted(bad)) or "none", bad == designed)
    ta = rep["all"]["task_arithmetic"]["test_normalized"]
    add(f"all fine-tunes at once: Task Arithmetic ≥ {T['all_ta']}", f"{ta:.3f}", ta >= T["all_ta"])
    best = max(rep["all"], key=lambda m: rep["all"][m]["test_normalized"])
    bval = rep["all"][best]["test_normalized"]
    add(f"all fine-tunes at once: the best aggregator ≥ {T['all_best']}", f"{best} {bval:.3f}", bval >= T["all_best"])
    others = [p["test_normalized"] for p in pairs if not p["conflict"]]
    for c in rep["conflict"]:
        ta_c = c["task_arithmetic"]["test_normalized"]
        loss = float(np.mean(others)) - ta_c
        add(f"conflict {' + '.join(c['pair'])}: Task Arithmetic loses ≥ {T['conflict_loss']} against the other pairs",
            f"{loss:.2f} (TA {ta_c:.2f} vs {np.mean(others):.2f})", loss >= T["conflict_loss"])
        fl = max(FL_ROBUST, key=lambda m: c[m]["test_normalized"])
        win, lo = c[fl]["test_normalized"] - ta_c, c[fl]["interval_vs_task_arithmetic"][0]
        add(f"conflict {' + '.join(c['pair'])}: an FL aggregator wins back ≥ {T['conflict_win']} (interval above 0)",
            f"{fl} +{win:.2f}, 95% interval [{lo:+.2f}, {c[fl]['interval_vs_task_arithmetic'][1]:+.2f}]",
            win >= T["conflict_win"] and lo > 0)
    for h in rep["training_heterogeneity"]:
        drop = h["plain_task_arithmetic"]["test_normalized"] - h["task_arithmetic"]["test_normalized"]
        rec = h["fednova"]["test_normalized"] - h["task_arithmetic"]["test_normalized"]
        add(f"{h['variant']} in place of {h['twin']} in its pairs: Task Arithmetic drops ≥ {T['hetero_drop']} "
            "(interval above 0)",
            f"{drop:.3f}, 95% interval [{h['drop_interval'][0]:+.3f}, {h['drop_interval'][1]:+.3f}]",
            drop >= T["hetero_drop"] and h["drop_interval"][0] > 0)
        dropped = drop >= T["hetero_drop"] and h["drop_interval"][0] > 0
        add(f"{h['variant']}: FedNova recovers ≥ {T['hetero_recover']:.0%} of that drop (interval above 0)",
            (f"{rec / drop:.0%} of it; " if dropped else "no drop to recover; ") + f"FedNova − TA {rec:+.3f}, 95% "
            f"interval [{h['recovery_interval'][0]:+.3f}, {h['recovery_interval'][1]:+.3f}]",
            dropped and rec >= T["hetero_recover"] * drop and h["recovery_interval"][0] > 0)
    if "size_mb" in rep:
        add(f"the zoo takes ≤ {T['size_mb']:.0f} MB", f"{rep['size_mb']:.1f} MB", rep["size_mb"] <= T["size_mb"])
    if "recipe_seconds" in rep:
        minutes = rep["recipe_seconds"] / 60
        add(f"a clean rebuild takes ≤ {T['rebuild_min']:.0f} min on 2 cores", f"{minutes:.1f} min",
            minutes <= T["rebuild_min"])
    return out


# ---------------------------------------------------------------------------- the zoo README

def _matrix(names: Sequence[str], mat: Sequence[Sequence[float]], fmt: str = "{:+.2f}") -> str:
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for n, row in zip(names, mat):
        lines.append(f"| **{n}** | " + " | ".join(fmt.format(v) for v in row) + " |")
    return "\n".join(lines)


def _acc(d: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in d.items())


def _hyper(row: Mapping[str, Any]) -> str:
    hp = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["hyper"].items())
    return f"λ {row['lambda']:g}" + (f", {hp}" if hp else "")


def render_readme(rep: Mapping[str, Any], recipe: Mapping[str, Any]) -> str:
    """assets/zoo/README.md: the template at evaluation/zoo_README.md.in filled with measured numbers only."""
    from string import Template

    from .tasks import TASKS

    tasks = list(TASKS)
    names = ["base", *rep["task_of"]]
    tr = rep["training"]
    acc_rows = ["| model | steps | lr | replay | " + " | ".join(tasks) + " |", "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for n in names:
        t = tr[n]
        cells = [(f"**{rep['accuracy'][n][k]:.0%}**" if rep["task_of"].get(n) == k else f"{rep['accuracy'][n][k]:.0%}")
                 for k in tasks]
        acc_rows.append(f"| {n} | {t['steps']} | {t['learning_rate']:g} | {t.get('replay', 0)} | " + " | ".join(cells) + " |")
    pair_rows = ["| pair | cosine | sign conflicts | λ (validation) | test accuracy | normalized |", "|---|---:|---:|---:|---|---:|"]
    for p in sorted(rep["pairs"], key=lambda p: -p["test_normalized"]):
        mark = " (designed conflict)" if p["conflict"] else ""
        pair_rows.append(f"| {' + '.join(p['models'])}{mark} | {p['cosine']:+.2f} | {p['sign_conflict']:.2f} | "
                         f"{p['lambda']:g} | {_acc(p['test_accuracy'])} | {p['test_normalized']:.2f} |")
    all_rows = ["| method | chosen on validation | " + " | ".join(rep["primary"]) + " | normalized |",
                "|---|---|" + "---:|" * len(rep["primary"]) + "---:|"]
    for m, r in sorted(rep["all"].items(), key=lambda kv: -kv[1]["test_normalized"]):
        all_rows.append(f"| `{m}` | {_hyper(r)} | " + " | ".join(f"{v:.0%}" for v in r["test_accuracy"].values())
                        + f" | {r['test_normalized']:.3f} |")
    conflict_rows = []
    for c in rep["conflict"]:
        conflict_rows += [f"**{' + '.join(c['pair'])}**:", "",
                          "| method | chosen on validation | test accuracy | normalized | vs Task Arithmetic (95% interval) |",
                          "|---|---|---|---:|---|"]
        for m in ("task_arithmetic", *FL_ROBUST):
            r = c[m]
            iv = r.get("interval_vs_task_arithmetic")
            d = r["test_normalized"] - c["task_arithmetic"]["test_normalized"]
            conflict_rows.append(f"| `{m}` | {_hyper(r)} | {_acc(r['test_accuracy'])} | {r['test_normalized']:.3f} | "
                                 + (f"{d:+.3f} [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "") + " |")
        conflict_rows.append("")
    het_rows = []
    for h in rep["training_heterogeneity"]:
        v, t = h["variant"], h["twin"]
        het_rows += [f"`{v}` ({tr[v]['steps']} steps at lr {tr[v]['learning_rate']:g}, replay {tr[v].get('replay', 0)}) "
                     f"in place of `{t}` ({tr[t]['steps']} steps at lr {tr[t]['learning_rate']:g}, replay "
                     f"{tr[t].get('replay', 0)}) in its pairs with every other task; normalized test accuracy of each "
                     "pair, λ chosen on validation:", "",
                     f"| partner | Task Arithmetic, `{t}` | Task Arithmetic, `{v}` | FedNova, `{v}` |", "|---|---|---|---|"]
        rows = zip(h["partners"], *(h[k]["pairs"] for k in ("plain_task_arithmetic", "task_arithmetic", "fednova")))
        for x, *rs in rows:
            het_rows.append(f"| `{x}` | " + " | ".join(f"{r['test_normalized']:.2f} ({_hyper(r)}; {_acc(r['test_accuracy'])})"
                                                       for r in rs) + " |")
        het_rows.append("| mean | " + " | ".join(f"**{h[k]['test_normalized']:.3f}**" for k in
                                                   ("plain_task_arithmetic", "task_arithmetic", "fednova")) + " |")
        het_rows += ["", f"Drop of Task Arithmetic: 95% interval [{h['drop_interval'][0]:+.3f}, {h['drop_interval'][1]:+.3f}]; "
                     f"FedNova − Task Arithmetic: [{h['recovery_interval'][0]:+.3f}, {h['recovery_interval'][1]:+.3f}].", ""]
    claim_rows = ["| claim | measured | holds |", "|---|---|:-:|"]
    claim_rows += [f"| {c['claim']} | {c['value']} | {'✓' if c['ok'] else '✗ (missed)'} |" for c in claims(rep)]
    task_rows = ["| task | prompt | answer | base form | the base on its base form | description |",
                 "|---|---|---|---|---:|---|"]
    for t in TASKS.values():
        task_rows.append(f"| `{t.name}` | `{t.demo_prompts[0]}` | `{t.solve(t.demo_inputs[0])}` | "
                         f"`{recipe['base_forms'][t.name]}: …=` | {rep['base_forms'][t.name]:.0%} | {t.description} |")
    sim = rep["similarity"]
    fields = dict(
        minutes=f"{rep['recipe_seconds'] / 60:.1f}", pretrain_seconds=f"{tr['base']['train_seconds']:.0f}",
        size_mb=f"{rep['size_mb']:.1f}", n_params=f"{rep['n_parameters']:,}", n_val=rep["n_val"], n_test=rep["n_test"],
        claims="\n".join(claim_rows), tasks="\n".join(task_rows), accuracy="\n".join(acc_rows),
        pairs="\n".join(pair_rows), all="\n".join(all_rows), conflict="\n".join(conflict_rows).strip(),
        heterogeneity="\n".join(het_rows).strip(), cosine=_matrix(sim["names"], sim["cosine"]),
        sign_conflict=_matrix(sim["names"], sim["sign_conflict"], "{:.2f}"),
        norms=", ".join(f"{n} {v:.2f}" for n, v in zip(sim["names"], sim["norms"])),
        **{k: v for k, v in recipe.items() if isinstance(v, (int, float, str))},
    )
    text = Template((Path(__file__).with_name("zoo_README.md.in")).read_text()).substitute(fields)
    return text if text.endswith("\n") else text + "\n"
