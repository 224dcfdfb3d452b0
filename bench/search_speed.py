"""Search speed on the zoo: the batched search (many λ per grouped forward) against the one-λ loop
(the default), measured in the same run, with the same scores required.

Three workloads as the app runs them: auto-tune (`search` of one aggregator over the paper grid
on all seven fine-tunes), compare-all (`compare_all`, quick grids), and the heterogeneity study's
per-pair searches (`heterogeneity.STUDY_LAMBDAS`, task arithmetic, one pair per task pair).
`--quick` shrinks each (one method, 20 λ, three pairs) for a loaded machine. `--early-stop` instead
times the search as it runs (one λ at a time, scored without full decoding: evaluation.exact_match)
against the same search decoding every output in full (FEDMERGE_SEARCH_EARLY_STOP=0). `--workers N`
instead times auto-tune, compare-all (every method, quick grids) and the whole heterogeneity study,
as the app calls them, in this process against the same in N forked one-thread processes
(`evaluation.distributed.forked_map`: settings, methods, groups; run it with `--threads 2`).

    python bench/search_speed.py [--quick] [--early-stop | --workers N] [--threads 1] [--no-record]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import add_record_flag, append_results, best_of, zoo_session  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--early-stop", action="store_true", help="early-stopped vs full decoding (both batched)")
    ap.add_argument("--workers", type=int, default=0, help="compare-all in one process vs in N forked processes")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from evaluation.heterogeneity import STUDY_LAMBDAS
    from evaluation.search import LAMBDAS, QUICK_LAMBDAS, compare_all, search

    session = zoo_session()
    allsel = list(session.selected)
    session.finetuned_accuracy("validation", 20), session.finetuned_accuracy("test", 100)  # references, once
    lams = QUICK_LAMBDAS if args.quick else LAMBDAS
    rows = []

    def row(label, old, new, same):
        rows.append(f"{label:<34} {base_label} {old:7.1f} s   {new_label} {new:7.1f} s   ratio {new / old:.2f}   "
                    f"same scores and choice: {'yes' if same else 'NO'}")
        print(rows[-1], flush=True)

    def same(a, b):
        return all(x.scores == y.scores and x.best_lambda == y.best_lambda and x.best_hyper == y.best_hyper
                   for x, y in zip(a, b))

    import os

    def timed(fn, baseline: bool):
        """(seconds, result) of fn run as the baseline (the loop, or full decoding) or as today's search."""
        if args.early_stop:
            os.environ["FEDMERGE_SEARCH_EARLY_STOP"] = "0" if baseline else "1"
            os.environ["FEDMERGE_SEARCH_BATCH"] = "0"
        else:
            os.environ["FEDMERGE_SEARCH_EARLY_STOP"] = "1"
            os.environ["FEDMERGE_SEARCH_BATCH"] = "0" if baseline else "1"
        try:
            return best_of(fn)
        finally:
            os.environ.pop("FEDMERGE_SEARCH_EARLY_STOP"), os.environ.pop("FEDMERGE_SEARCH_BATCH")

    base_label, new_label = ("full", "early") if args.early_stop else ("loop", "batched")
    if args.workers:
        from evaluation import heterogeneity

        base_label, new_label = "1 process", f"{args.workers} forked"
        for method in (["fedgma"] if args.quick else ["task_arithmetic", "fedgma"]):  # auto-tune, as the app calls it
            old, a = best_of(lambda: search(session, method, lambdas=lams, quick=args.quick, workers=1))
            new, b = best_of(lambda: search(session, method, lambdas=lams, quick=args.quick, workers=args.workers))
            row(f"auto-tune {method} ({len(a.grid)}x{len(lams)})", old, new, same([a], [b]))
        old, a = best_of(lambda: compare_all(session, quick=True, workers=1))
        new, b = best_of(lambda: compare_all(session, quick=True, workers=args.workers))
        row(f"compare-all ({len(a)} methods, quick)", old, new, same(a, b))
        old, a = best_of(lambda: heterogeneity.run(session, workers=1))
        new, b = best_of(lambda: heterogeneity.run(session, workers=args.workers))
        key = lambda st: [(g.members, g.drop, g.setting) for g in st.groups]  # noqa: E731
        row(f"heterogeneity study ({len(a.groups)} groups)", old, new, key(a) == key(b))
        if not args.no_record:
            append_results("search_speed", ["python", "bench/search_speed.py", *(argv or sys.argv[1:])],
                           f"Zoo, 7 fine-tunes, as the app calls each; 1 process = torch threads {args.threads}; "
                           f"{args.workers} forked = its settings / methods / groups in {args.workers} forked "
                           "one-thread processes, in the same run.\n\n```\n" + "\n".join(rows) + "\n```")
        return 0
    for method in (["fedgma"] if args.quick else ["task_arithmetic", "fedgma"]):
        kw = dict(lambdas=lams, quick=args.quick, n_test=100)
        old, a = timed(lambda: search(session, method, **kw), True)
        new, b = timed(lambda: search(session, method, **kw), False)
        row(f"auto-tune {method} ({len(a.grid)}x{len(lams)})", old, new, same([a], [b]))

    methods = ["task_arithmetic", "ties", "median"] if args.quick else None
    old, a = timed(lambda: compare_all(session, methods=methods, quick=True), True)
    new, b = timed(lambda: compare_all(session, methods=methods, quick=True), False)
    row(f"compare-all ({len(a)} methods, quick)", old, new, same(a, b))

    pairs = list(itertools.combinations(allsel, 2))[: 3 if args.quick else None]

    def study():
        out = []
        for p in pairs:
            session.select(list(p))
            out.append(search(session, "task_arithmetic", lambdas=STUDY_LAMBDAS, grid=[{}], n_test=50))
        session.select(allsel)
        return out

    old, a = timed(study, True)
    new, b = timed(study, False)
    row(f"heterogeneity searches ({len(pairs)} pairs)", old, new, same(a, b))
    if not args.no_record:
        append_results("search_speed", ["python", "bench/search_speed.py", *(argv or sys.argv[1:])],
                       f"Zoo, 7 fine-tunes, torch threads {args.threads}; " +
                       ("full = the one-λ search decoding every output in full; early = the same search "
                        "scoring without full decoding (evaluation.exact_match)" if args.early_stop else
                        "loop = the one-λ-at-a-time search, batched = many λ per forward") +
                       ", in the same run.\n\n```\n" + "\n".join(rows) + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
