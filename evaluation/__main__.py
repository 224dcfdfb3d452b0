"""``python -m evaluation <command>``: a small dispatch table of evaluation commands."""
from __future__ import annotations

import argparse
import sys
import tempfile


def _build_zoo(args: argparse.Namespace) -> int:
    from .zoo import DEFAULT_OUT, FULL, TINY, build_zoo

    if args.tiny:
        out = args.out or tempfile.mkdtemp(prefix="tinyzoo-")
        build_zoo(out, TINY, write_readme=True)
    else:
        build_zoo(args.out or DEFAULT_OUT, FULL, reuse_base=args.reuse_base)
    return 0


def _add_build_zoo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default assets/zoo; a temp folder with --tiny)")
    p.add_argument("--tiny", action="store_true", help="the whole recipe, a few steps on a tiny model (smoke test)")
    p.add_argument("--reuse-base", action="store_true", help="keep an existing base (development only)")


def _compare(args: argparse.Namespace) -> int:
    from .compare import main

    main(args.zoo, args.out, args.quick, args.methods.split(",") if args.methods else None, args.n_val, args.n_test,
         ray=args.ray)
    return 0


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", default=None, help="zoo folder (default assets/zoo)")
    p.add_argument("--out", default="evaluation/results", help="folder for compare.md and compare.html")
    p.add_argument("--quick", action="store_true", help="coarser grids (λ 0.1…2.0, fewer ρ / density values)")
    p.add_argument("--methods", default=None, help="comma-separated subset of methods")
    p.add_argument("--n-val", type=int, default=50, help="validation examples per task for tuning")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task for the report")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="spread each search over Ray workers: a local Ray, or the cluster at ADDRESS")
    _add_device(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where models are merged and scored: cpu, cuda[:N] or auto (default: $FEDMERGE_DEVICE, else auto)")


def _zoo_selection(args: argparse.Namespace):
    """The zoo in a session, with --models selected (default: one fine-tune per task)."""
    from .session import Session, read_zoo

    session = Session(zoo=args.zoo, allow_hub=False).load_zoo()
    if args.models:
        session.select(args.models.split(","))
    else:
        session.select([s.name for s in read_zoo(args.zoo)[1] if not s.variant_of])
    return session


def _write_report(out: str, stem: str, text: str, figure) -> None:
    """<out>/<stem>.md and <stem>.html, and the table on stdout."""
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(text)
    figure.write_html(folder / f"{stem}.html", include_plotlyjs="cdn")
    print(text)
    print(f"wrote {folder / (stem + '.md')} and {folder / (stem + '.html')}")


def _add_selection(p: argparse.ArgumentParser, reported: str) -> None:
    """The options the zoo studies share: which models and aggregators, where to write, how many examples."""
    p.add_argument("--zoo", default=None, help="zoo folder (default assets/zoo)")
    p.add_argument("--models", default=None, help="comma-separated fine-tunes (default: one per task)")
    p.add_argument("--methods", default="task_arithmetic,fedgma,median,fednova")
    p.add_argument("--out", default="evaluation/results")
    p.add_argument("--n-val", type=int, default=12, help="validation examples per task (λ tuning)")
    p.add_argument("--n-test", type=int, default=30, help=f"test examples per task (the reported {reported})")
    _add_device(p)


def _progress(fraction: float, desc: str) -> None:
    print(f"[{fraction:4.0%}] {desc}", flush=True)


def _heterogeneity(args: argparse.Namespace) -> int:
    from . import heterogeneity

    session = _zoo_selection(args)
    methods = args.methods.split(",")
    study = heterogeneity.run(session, methods, n_val=args.n_val, n_test=args.n_test, progress=_progress)
    _write_report(args.out, "heterogeneity", heterogeneity.to_markdown(study, methods),
                  heterogeneity.scatter_figures(study, methods))
    return 0


def _add_heterogeneity(p: argparse.ArgumentParser) -> None:
    _add_selection(p, "drop")


def _task_count(args: argparse.Namespace) -> int:
    from merging.errors import MergeError

    from . import task_count

    try:
        sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        raise MergeError(f"--sizes: comma-separated whole numbers, not {args.sizes[:40]!r}") from None
    session = _zoo_selection(args)
    curve = task_count.run(session, args.methods.split(","), per_size=args.per_size, n_val=args.n_val,
                           n_test=args.n_test, progress=_progress, sizes=sizes)
    _write_report(args.out, "task-count", task_count.to_markdown(curve), task_count.figure(curve))
    return 0


def _add_task_count(p: argparse.ArgumentParser) -> None:
    from .task_count import MAX_PER_SIZE, PER_SIZE

    _add_selection(p, "accuracy")
    p.add_argument("--per-size", type=int, default=PER_SIZE, help=f"groups merged per size (1-{MAX_PER_SIZE})")
    p.add_argument("--sizes", default=None, help="comma-separated group sizes (default: 2 to all selected)")


# name -> (help, add_arguments, run). Add commands here.
COMMANDS = {
    "build-zoo": ("rebuild the built-in model zoo deterministically", _add_build_zoo, _build_zoo),
    "heterogeneity": ("does heterogeneity predict merge failure? pairwise study with rank correlations",
                      _add_heterogeneity, _heterogeneity),
    "task-count": ("how many tasks does one merge hold? normalized accuracy against the number merged",
                   _add_task_count, _task_count),
    "compare": ("tune every aggregator on the zoo (plain, then heterogeneous) and tabulate", _add_compare, _compare),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    from merging.errors import MergeError

    try:
        if getattr(args, "device", None):
            from merging.cache import CACHE
            from merging.device import resolve_device

            CACHE.use_device(resolve_device(args.device))  # before any model is read: a missing GPU fails at once
        return COMMANDS[args.command][2](args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
