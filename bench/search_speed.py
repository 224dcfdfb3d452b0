"""Search speed on the zoo: the batched search (many λ per grouped forward) against today's loop
(one λ at a time, `batched=False`), measured in the same run, with the same scores required.

Three workloads as the app runs them: auto-tune (`search` of one aggregator over the paper grid
on all seven fine-tunes), compare-all (`compare_all`, quick grids), and the heterogeneity study's
per-pair searches (`heterogeneity.STUDY_LAMBDAS`, task arithmetic, one pair per task pair).
`--quick` shrinks each (one method, 20 λ, three pairs) for a loaded machine.

    python bench/search_speed.py [--quick] [--threads 1] [--no-record]
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
        rows.append(f"{label:<34} loop {old:7.1f} s   batched {new:7.1f} s   ratio {new / old:.2f}   "
                    f"same scores and choice: {'yes' if same else 'NO'}")
        print(rows[-1], flush=True)

    def same(a, b):
        return all(x.scores == y.scores and x.best_lambda == y.best_lambda and x.best_hyper == y.best_hyper
                   for x, y in zip(a, b))

    for method in (["fedgma"] if args.quick else ["task_arithmetic", "fedgma"]):
        kw = dict(lambdas=lams, quick=args.quick, n_test=100)
        old, a = best_of(lambda: search(session, method, batched=False, **kw))
        new, b = best_of(lambda: search(session, method, batched=True, **kw))
        row(f"auto-tune {method} ({len(a.grid)}x{len(lams)})", old, new, same([a], [b]))

    methods = ["task_arithmetic", "ties", "median"] if args.quick else None
    import os
    os.environ["FEDMERGE_SEARCH_BATCH"] = "0"
    old, a = best_of(lambda: compare_all(session, methods=methods, quick=True))
    os.environ["FEDMERGE_SEARCH_BATCH"] = "1"
    new, b = best_of(lambda: compare_all(session, methods=methods, quick=True))
    row(f"compare-all ({len(a)} methods, quick)", old, new, same(a, b))

    pairs = list(itertools.combinations(allsel, 2))[: 3 if args.quick else None]

    def study(batched):
        out = []
        for p in pairs:
            session.select(list(p))
            out.append(search(session, "task_arithmetic", lambdas=STUDY_LAMBDAS, grid=[{}], n_test=50,
                              batched=batched))
        session.select(allsel)
        return out

    old, a = best_of(lambda: study(False))
    new, b = best_of(lambda: study(True))
    row(f"heterogeneity searches ({len(pairs)} pairs)", old, new, same(a, b))
    if not args.no_record:
        append_results("search_speed", ["python", "bench/search_speed.py", *(argv or sys.argv[1:])],
                       f"Zoo, 7 fine-tunes, torch threads {args.threads}; loop = today's one-λ-at-a-time "
                       f"search in the same run.\n\n```\n" + "\n".join(rows) + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
