"""The paper's experiment on the zoo: tune every aggregator on validation, report on test.

Run twice — on the plain zoo (one fine-tune per task) and with the training-heterogeneous
fine-tune in place of its sibling — to see whether FedNova and friends fix what Task
Arithmetic (FedAvg) loses. Writes a markdown table and a plotly HTML figure.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from merging.errors import MergeError
from merging.registry import AGGREGATORS

from .search import LAMBDAS, QUICK_LAMBDAS, SearchResult, compare_all, search
from .session import Session, read_zoo


def selection(zoo: str | Path | None, heterogeneous: bool) -> list[str]:
    """Model names: one fine-tune per task; with `heterogeneous`, each variant replaces its sibling."""
    _, specs = read_zoo(zoo)
    plain = [s for s in specs if not s.variant_of]
    if not heterogeneous:
        return [s.name for s in plain]
    variants = {s.variant_of: s for s in specs if s.variant_of}
    return [variants[s.name].name if s.name in variants else s.name for s in plain]


def run(zoo: str | Path | None = None, heterogeneous: bool = False, methods: Sequence[str] | None = None,
        quick: bool = False, n_val: int = 50, n_test: int = 100, log=print, ray: str | bool | None = None,
        workers: int | None = None) -> list[SearchResult]:
    """Every applicable method tuned on one zoo variant: on Ray workers, else in forked local processes
    (`search.compare_all`; `workers` as there). Methods named that cannot merge that many models are
    skipped, with a line saying so; none left is a MergeError (it ran every method instead)."""
    session = Session(zoo=zoo, allow_hub=False).load_zoo()
    try:
        session.select(selection(zoo, heterogeneous))
        k = len(session.selected)
        asked = list(methods or AGGREGATORS)
        methods = [m for m in asked if AGGREGATORS[m].accepts(k)]
        if not methods:
            raise MergeError(f"none of {', '.join(asked)} can merge {k} models at once")
        if methods != asked and asked != list(AGGREGATORS):  # named ones, not the default "all"
            log(f"skipped (cannot merge {k} models at once): {', '.join(m for m in asked if m not in methods)}")
        lambdas = QUICK_LAMBDAS if quick else LAMBDAS
        if ray:
            results = [search(session, m, lambdas=lambdas, quick=quick, n_val=n_val, n_test=n_test, ray=ray)
                       for m in methods]
        else:
            failed: list[tuple[str, str]] = []
            results = compare_all(session, methods, quick=quick, n_val=n_val, n_test=n_test, failed=failed,
                                  workers=workers, progress=lambda frac, text: log(f"  {text}"))
            for m, why in failed:
                log(f"{m:18s} skipped: {why}")
        for r in results:
            log(f"{r.method:18s} {r.describe():40s} val {r.best_score:.3f}  "
                f"test {r.test_normalized.get('mean', float('nan')):.3f}  ({r.seconds:.0f} s)")
        return results
    finally:
        session.close()


def markdown_table(results: Sequence[SearchResult], title: str) -> str:
    """Per-task test accuracy, average absolute and normalized accuracy, the chosen hyperparameters."""
    tasks = results[0].tasks if results else []
    head = ["method", "chosen (on validation)"] + tasks + ["avg acc", "avg normalized", "val normalized"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: -r.test_normalized.get("mean", 0.0)):
        acc = [r.test_accuracy.get(t, float("nan")) for t in tasks]
        avg = sum(acc) / max(1, len(acc))
        cells = [f"`{r.method}`", r.describe()] + [f"{a:.0%}" for a in acc] + [
            f"{avg:.1%}", f"{r.test_normalized.get('mean', float('nan')):.3f}", f"{r.best_score:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(plain: Sequence[SearchResult], hetero: Sequence[SearchResult] | None = None):
    """Bars of the mean normalized test accuracy per aggregator, one series per run."""
    from . import plots

    methods = [r.method for r in sorted(plain, key=lambda r: -r.test_normalized.get("mean", 0.0))]
    series = {"plain zoo": {r.method: r.test_normalized.get("mean", float("nan")) for r in plain}}
    if hetero:
        series["heterogeneous fine-tune"] = {r.method: r.test_normalized.get("mean", float("nan")) for r in hetero}
    fig = plots.accuracy_bars(methods, series)
    fig.update_layout(title=dict(text="Tuned aggregators: mean normalized test accuracy"))
    fig.update_yaxes(title="merged ÷ own fine-tune", range=None)
    return fig


def main(zoo: str | Path | None, out: str | Path, quick: bool, methods: Sequence[str] | None,
         n_val: int, n_test: int, ray: str | bool | None = None) -> Path:
    """Both runs, then <out>/compare.md and compare.html (the folder is made only then: an interrupted
    or failed run leaves nothing). A zoo without a heterogeneous variant gets the plain run only (it
    ran it twice and reported the second as the heterogeneous one)."""
    from .plots import write_report

    if ray:  # a missing Ray or a cluster that does not answer: one line at once, not after loading the zoo
        from .distributed import connect

        connect(ray)
    t0 = time.perf_counter()
    names = selection(zoo, False), selection(zoo, True)
    print("plain zoo:", ", ".join(names[0]))
    plain = run(zoo, False, methods, quick, n_val, n_test, ray=ray)
    hetero = None
    if names[1] != names[0]:
        print("heterogeneous:", ", ".join(names[1]))
        hetero = run(zoo, True, methods, quick, n_val, n_test, ray=ray)
    grid = ("quick grid (λ 0.1…2.0" if quick else "full grid (λ 0.05…2.00") + ", ×K for fednova and median)"
    second = (markdown_table(hetero, f"With the heterogeneous fine-tune — {grid}") if hetero is not None else
              "The zoo has no training-heterogeneous fine-tune (no zoo.json entry with `variant_of`): "
              "the plain zoo only.\n")
    text = (markdown_table(plain, f"Plain zoo — {grid}, validation n={n_val}, test n={n_test}") + "\n"
            + second + "\n" + f"Wall time: {time.perf_counter() - t0:.0f} s.\n")
    md, html = write_report(out, "compare", text, figure(plain, hetero))
    print(text)
    print(f"wrote {md} and {html}")
    return Path(out)
