"""``python -m evaluation <command>``: a small dispatch table of evaluation commands."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _build_zoo(args: argparse.Namespace) -> int:
    from .zoo import DEFAULT_OUT, FULL, TINY, build_zoo, check_out

    cfg = TINY if args.tiny else FULL
    if args.out is not None:
        check_out(args.out, cfg, args.overwrite)  # before any work (build_zoo checks again)
    if args.tiny:
        out = args.out if args.out is not None else tempfile.mkdtemp(prefix="tinyzoo-")
        build_zoo(out, TINY, write_readme=True, overwrite=args.overwrite)
    else:
        build_zoo(args.out if args.out is not None else DEFAULT_OUT, FULL, reuse_base=args.reuse_base,
                  overwrite=args.overwrite)
    return 0


def _add_build_zoo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder (default assets/zoo; a temp folder with --tiny); it may be missing, empty "
                        "or hold a zoo, which is replaced; any other folder only with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds something other than a zoo (its contents are deleted)")
    p.add_argument("--tiny", action="store_true", help="the whole recipe, a few steps on a tiny model (smoke test)")
    p.add_argument("--reuse-base", action="store_true", help="keep an existing base (development only)")


def _compare(args: argparse.Namespace) -> int:
    from .compare import main

    main(args.zoo, args.out, args.quick, args.methods, args.n_val, args.n_test, ray=args.ray)
    return 0


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", default=None, help="zoo folder (default assets/zoo)")
    p.add_argument("--out", default="evaluation/results",
                   help="folder for compare.md and compare.html (default evaluation/results)")
    p.add_argument("--quick", action="store_true", help="coarser grids (λ 0.1…2.0, fewer ρ / density values)")
    p.add_argument("--methods", default=None,
                   help="comma-separated merge methods (default: every method that can merge the zoo's fine-tunes)")
    p.add_argument("--n-val", type=int, default=50, help="validation examples per task for tuning (1-300; default 50)")
    p.add_argument("--n-test", type=int, default=100,
                   help="test examples per task for the report (1-300; default 100)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="spread each search over Ray workers: a local Ray, or the cluster at ADDRESS")
    _add_device(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where models are merged and scored: cpu, cuda[:N] or auto (default: $FEDMERGE_DEVICE, else auto)")


def _zoo_selection(args: argparse.Namespace):
    """The zoo in a session, with --models selected (default: one fine-tune per task)."""
    from .session import Session, read_zoo

    specs = read_zoo(args.zoo)[1]
    known = [s.name for s in specs]
    models = _names("--models", args.models, known, "in the zoo") if args.models is not None else None
    session = Session(zoo=args.zoo, allow_hub=False).load_zoo()
    session.select(models or [s.name for s in specs if not s.variant_of])
    return session


def _names(option: str, text: str, known, where: str) -> list[str]:
    """Comma-separated names, each known and named once, or a MergeError naming `option`."""
    from merging.errors import MergeError

    names = [x.strip() for x in text.split(",")]
    if not all(names):
        raise MergeError(f"{option}: comma-separated names, not {text[:60]!r}")
    for i, x in enumerate(names):
        if x not in known:
            raise MergeError(f"{option}: no {x[:40]!r} {where}; known: {', '.join(known)}")
        if x in names[:i]:
            raise MergeError(f"{option}: {x!r} named twice")
    return names


def _count(option: str, value: int, high: int, what: str) -> None:
    from merging.errors import MergeError

    if not 1 <= value <= high:
        raise MergeError(f"{option}: a whole number from 1 to {high} ({what}), not {value}")


def _check_sizes(methods: list[str], sizes: list[int], command: str) -> None:
    """Every method named can merge every group size the command merges (it stopped midway, or
    compare ran every method instead of one that could not merge the zoo)."""
    from merging.errors import MergeError
    from merging.registry import AGGREGATORS

    bad = [m for m in methods if not all(AGGREGATORS[m].accepts(k) for k in sizes)]
    if bad:
        merged = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)} to {max(sizes)}"
        what = ", ".join(f"{m} merges {_model_count(m)}" for m in bad)
        raise MergeError(f"--methods: {what}; {command} merges {merged} at once: leave "
                         f"{'it' if len(bad) == 1 else 'them'} out")


def _model_count(method: str) -> str:
    """How many fine-tunes a method merges, in words."""
    from merging.registry import AGGREGATORS

    lo, hi = AGGREGATORS[method].min_models, AGGREGATORS[method].max_models
    return f"{lo}+ models" if hi is None else f"{lo} model{'s' * (lo > 1)}" if lo == hi else f"{lo} to {hi} models"


def _check_report_folder(out: str, stems: list[str]) -> None:
    """--out of a study, before any work (`merging.targets`): a folder that exists or can be made and
    takes files, and the report files in it not folders. Nothing is created yet."""
    from merging.errors import MergeError
    from merging.targets import output_folder, role

    path = output_folder("--out", out)
    for name in (f"{stem}.{ext}" for stem in stems for ext in ("md", "html")):
        if (path / name).is_dir():
            raise MergeError(f"{role('--out', out)}: {name} in it is a folder; the report is written there")


def _check_zoo(zoo: str | None) -> list[dict]:
    """--zoo (default the shipped zoo) before any work: its zoo.json as `pool.read_zoo` checks it, and a
    base with a tokenizer that fits its embedding (the studies decode with it). A MergeError naming
    what is wrong."""
    import json

    from merging.errors import MergeError, shown

    from .pool import read_zoo_index, zoo_dir

    root = Path(zoo) if zoo is not None else zoo_dir()
    where = f"--zoo {shown(str(root))}" if zoo is not None else f"the zoo at {shown(str(root))}"
    data = read_zoo_index(root, where)
    finetunes = data["finetunes"]
    base = root / data["base"]["folder"]
    vocab_files = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((base / f).is_file() for f in vocab_files):
        raise MergeError(f"{where}: the base ({data['base']['folder']}) has no tokenizer "
                         f"({', '.join(vocab_files)}); the studies decode with the base's tokenizer")
    try:
        config = json.loads((base / "config.json").read_text())
        from transformers import AutoTokenizer

        tokens = len(AutoTokenizer.from_pretrained(base))
    except Exception as exc:  # unreadable config or tokenizer: one line
        raise MergeError(f"{where}: the base ({data['base']['folder']}): cannot read its config and tokenizer "
                         f"({(str(exc).splitlines() or [type(exc).__name__])[0][:160]})") from None
    rows = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(rows, int) and tokens > rows:
        raise MergeError(f"{where}: the base's tokenizer has {tokens} tokens, its embedding {rows} rows: "
                         "not a tokenizer of this model")
    return finetunes


def _check(args: argparse.Namespace) -> None:
    """Every option of a study checked before any work; a bad one is a MergeError naming it."""
    from merging.errors import MergeError
    from merging.registry import AGGREGATORS

    from .scorer import LIVE_SPLIT
    from .tasks import DEFAULT_N

    if not hasattr(args, "n_val"):  # build-zoo: build_zoo checks its --out
        return
    if args.device is not None and not args.device.strip():  # it meant the CPU, silently
        raise MergeError("--device: empty; use cpu, cuda, cuda:N or auto")
    if getattr(args, "ray", None) is not None and not args.ray.strip():  # it meant no Ray at all
        raise MergeError("--ray: an empty address; --ray alone starts a local Ray, --ray ADDRESS uses a cluster")
    _count("--n-val", args.n_val, DEFAULT_N[LIVE_SPLIT], f"the {LIVE_SPLIT} examples per task")
    _count("--n-test", args.n_test, DEFAULT_N["test"], "the test examples per task")
    _check_report_folder(args.out, [args.command])
    if args.methods is not None:
        args.methods = _names("--methods", args.methods, list(AGGREGATORS), "merge method")
    if args.command == "task-count":
        from .task_count import MAX_PER_SIZE

        _count("--per-size", args.per_size, MAX_PER_SIZE, "groups merged per size")
        try:
            args.sizes = [int(k) for k in args.sizes.split(",")] if args.sizes is not None else None
        except ValueError:
            raise MergeError(f"--sizes: comma-separated whole numbers, not {args.sizes[:40]!r}") from None
    finetunes = _check_zoo(args.zoo)
    names = [e["name"] for e in finetunes]  # the commands merge fine-tunes: two at least
    picked = getattr(args, "models", None) is not None
    chosen = _names("--models", args.models, names, "in the zoo") if picked else \
        [e["name"] for e in finetunes if not e.get("variant_of")]
    if len(chosen) < 2:
        what = "--models names" if picked else "the zoo has"
        raise MergeError(f"{args.command}: needs at least two fine-tunes; {what} {len(chosen)}")
    n = len(chosen)
    if args.command == "task-count" and args.sizes and not all(2 <= k <= n for k in args.sizes):
        raise MergeError(f"--sizes: whole numbers from 2 to {n} (the selected fine-tunes)")
    if args.methods is not None:
        _check_sizes(args.methods, _group_sizes(args, n), args.command)


def _group_sizes(args: argparse.Namespace, n: int) -> list[int]:
    """How many fine-tunes a command merges at once, from `n` chosen: compare all of them, the
    heterogeneity study pairs and all but one, task-count each of --sizes (default 2 to n)."""
    if args.command == "heterogeneity":
        from .heterogeneity import group_sizes

        return group_sizes(n)
    if args.command == "task-count":
        return args.sizes or list(range(2, n + 1))
    return [n]


def _write_report(out: str, stem: str, text: str, figure) -> None:
    """<out>/<stem>.md and <stem>.html, and the table on stdout."""
    from .plots import write_report

    md, html = write_report(out, stem, text, figure)
    print(text)
    print(f"wrote {md} and {html}")


def _add_selection(p: argparse.ArgumentParser, reported: str) -> None:
    """The options the zoo studies share: which models and aggregators, where to write, how many examples."""
    p.add_argument("--zoo", default=None, help="zoo folder (default assets/zoo)")
    p.add_argument("--models", default=None, help="comma-separated fine-tunes (default: one per task)")
    p.add_argument("--methods", default="task_arithmetic,fedgma,median,fednova",
                   help="comma-separated merge methods (default: task_arithmetic,fedgma,median,fednova)")
    p.add_argument("--out", default="evaluation/results", help="folder for the report's .md and .html "
                   "(default evaluation/results)")
    p.add_argument("--n-val", type=int, default=12, help="validation examples per task (λ tuning; 1-300; default 12)")
    p.add_argument("--n-test", type=int, default=30,
                   help=f"test examples per task (the reported {reported}; 1-300; default 30)")
    _add_device(p)


def _progress(fraction: float, desc: str) -> None:
    print(f"[{fraction:4.0%}] {desc}", flush=True)


def _heterogeneity(args: argparse.Namespace) -> int:
    from . import heterogeneity

    session = _zoo_selection(args)
    methods = args.methods
    study = heterogeneity.run(session, methods, n_val=args.n_val, n_test=args.n_test, progress=_progress)
    _write_report(args.out, "heterogeneity", heterogeneity.to_markdown(study, methods),
                  heterogeneity.scatter_figures(study, methods))
    return 0


def _add_heterogeneity(p: argparse.ArgumentParser) -> None:
    _add_selection(p, "drop")


def _task_count(args: argparse.Namespace) -> int:
    from . import task_count

    session = _zoo_selection(args)
    curve = task_count.run(session, args.methods, per_size=args.per_size, n_val=args.n_val,
                           n_test=args.n_test, progress=_progress, sizes=args.sizes)
    _write_report(args.out, "task-count", task_count.to_markdown(curve), task_count.figure(curve))
    return 0


def _add_task_count(p: argparse.ArgumentParser) -> None:
    from .task_count import MAX_PER_SIZE, PER_SIZE

    _add_selection(p, "accuracy")
    p.add_argument("--per-size", type=int, default=PER_SIZE,
                   help=f"groups merged per size (1-{MAX_PER_SIZE}; default {PER_SIZE})")
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


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: the same cleanup runs (the
    forked search processes are stopped; killed outright they lived on, orphaned, for ever)."""


def _on_sigterm(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked search process (it inherits this handler): die as SIGTERM does
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise _Terminated()


_MAIN_PID = os.getpid()  # set again by main(): the process whose SIGTERM stops the command


def _use_device(option: str | None) -> None:
    """--device, else FEDMERGE_DEVICE, else auto, before any model is read (a missing GPU fails at once);
    a bad value names where it came from."""
    from merging.cache import CACHE
    from merging.device import resolve_device
    from merging.errors import MergeError

    name = option if option is not None else os.environ.get("FEDMERGE_DEVICE") or "auto"
    try:
        CACHE.use_device(resolve_device(name))
    except MergeError as exc:
        raise MergeError(f"{'--device' if option is not None else 'FEDMERGE_DEVICE'}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Ctrl-C and SIGTERM are one line from the first moment
    (the imports take seconds: a Ctrl-C during them printed a traceback)."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return _run(argv)
    except (KeyboardInterrupt, _Terminated) as exc:
        return _stopped(exc)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    from merging.errors import tolerant_console  # imports torch: inside main's Ctrl-C handling

    tolerant_console()
    parser = _Parser(prog="python -m evaluation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    from merging.errors import MergeError

    try:
        _check(args)
        if hasattr(args, "device"):
            _use_device(args.device)
        return COMMANDS[args.command][2](args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the last resort: one line, no errno or traceback
        what = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        print(f"error: {exc.filename}: {what}" if exc.filename else f"error: {what}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback (FEDMERGE_DEBUG=1 shows it)
        if isinstance(exc.__context__, (KeyboardInterrupt, _Terminated)):  # raised inside compiled code
            return _stopped(exc.__context__)
        if os.environ.get("FEDMERGE_DEBUG"):
            raise
        line = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        print(f"error: internal error: {line} (FEDMERGE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def _stopped(exc: BaseException) -> int:
    """Ctrl-C: 130, SIGTERM: 143, with one line (nothing was written: the reports are written whole at the end)."""
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    print("error: terminated", file=sys.stderr)
    return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
