"""`fedmerge` (or `python -m merging`): merge from a mergekit-style YAML, inspect task vectors, list the methods.

Errors print one line (`error: ...`) and exit with status 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

from . import targets
from .errors import MergeError, os_error, shown, tolerant_console

_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1, "": 1}


def _size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("kmgb")
    try:
        size = float(num) * _UNITS[t[len(num):]]
        if not math.isfinite(size) or size < 1:
            raise ValueError
        return int(size)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a positive size, e.g. 2GB, 500MB)") from None


def _progress_bar(enabled: bool, desc: str):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=100, unit="%", file=sys.stderr, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, name: str) -> None:
        bar.n = round(100 * fraction)
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.refresh()

    return update, bar.close


def _spares_inputs(out_dir: Path, typed: str, cfg, config_path: str) -> None:
    """The output folder is replaced as a whole (--overwrite): refuse one that is, or holds, an input of
    the merge (a model, a LoRA adapter, the tokenizer's source, the YAML itself)."""
    tok = cfg.tokenizer_source or (cfg.tokenizer.source if cfg.tokenizer else None)
    refs = [("the config", config_path), ("tokenizer source", None if tok in ("base", "union") else tok)]
    for role, ref in [("base_model", cfg.base_model or "")] + [(f"models[{i}]", m.model)
                                                               for i, m in enumerate(cfg.models)]:
        for part in [ref, *ref.split("+")]:  # model+adapter: both folders
            refs += [(role, part), (role, part.partition("@")[0])]  # model@revision: the model's folder
    for role, ref in refs:
        path = Path(ref).expanduser() if ref else None
        if path is None or not path.exists():  # a Hub id, or nothing
            continue
        path = path.resolve()
        if path == out_dir or out_dir in path.parents:
            raise MergeError(f"output folder {shown(typed)}: holds {role} ({ref}), which writing the merge "
                             "there would delete; choose another folder")


def cmd_merge(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import merge_to_dir, uses_exact
    from .plan import plan_from_config

    import torch

    from .device import resolve_device

    from .writer import output_folder

    device = resolve_device(args.device)  # before any reading: a missing GPU fails at once
    out_dir = output_folder(args.out_dir, args.overwrite)  # and an unusable output folder
    cfg = load_config(args.config)
    _spares_inputs(out_dir, args.out_dir, cfg, args.config)
    plan = plan_from_config(cfg, allow_hub=not args.offline, trust_remote_code=args.trust_remote_code)
    # Once, for this process: the float32 pipeline runs single-threaded ops (reading overlaps on a
    # second thread); the exact path (mergekit's ops in bfloat16/float16) gains from intra-op threads
    # (0.5B bfloat16 task arithmetic, warm cache, 2 cores: 12.6 s on 1 thread, 9.0 s on 2).
    if not uses_exact(plan):
        torch.set_num_threads(1)
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    update, close = _progress_bar(not args.no_progress, f"{cfg.merge_method}")

    def step(fraction: float, name: str) -> None:  # after each tensor: where a Ctrl-C or SIGTERM stops it
        _raise_deferred()
        if update is not None:
            update(fraction, name)
    start = time.perf_counter()
    try:
        with _signals_between_tensors():
            out = merge_to_dir(plan, args.out_dir, overwrite=args.overwrite, shard_bytes=args.shard_size,
                               progress=step, device=device)
    finally:
        close()
    print(f"wrote {out} ({cfg.merge_method}, {len(plan.sources)} model(s), {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    from .plan import load_model, task_source
    from .similarity import similarity

    for option, target in (("--html", args.html), ("--json", args.json)):
        if target:
            targets.output_file(option, target)
    opts = dict(allow_hub=not args.offline)
    base = load_model(args.base, **opts)  # mergekit's model+adapter here too, as in merge
    sources = [task_source(m, base, args.base, name, **opts)
               for m, name in zip(args.models, distinct_names(args.models))]
    update, close = _progress_bar(not args.no_progress, "similarity")
    try:
        report = similarity(base, sources, progress=update)
    finally:
        close()
    print(report.to_text())
    for name, norm in zip(report.names, report.norms):
        if norm == 0:
            print(f"warning: {name}: zero task vector (the same weights as the base); its cosines are undefined "
                  "(n/a, null in JSON)", file=sys.stderr)
    if args.per_layer:
        for layer, mat in report.layer_cosine.items():
            pairs = ", ".join(f"{report.names[i]}~{report.names[j]} {mat[i, j]:.3f}" for i, j in report.pairs())
            print(f"{layer}: {pairs}")
    if args.html:
        from .report import similarity_heatmap

        fig = similarity_heatmap(report)
        with writing_file("--html", args.html) as path:
            fig.write_html(path, include_plotlyjs=True)
        print(f"wrote {args.html}")
    if args.json:
        import json

        with writing_file("--json", args.json) as path:
            path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False))
        print(f"wrote {args.json}")
    return 0


def distinct_names(refs: list[str]) -> list[str]:
    """Each model's folder name, with as many parent folders as it takes to tell apart two models
    whose folders share a name (a/ft and b/ft: the report's rows and pairs were both "ft"); a
    model+adapter is named model+adapter, each part told apart among the others in its place."""
    from .plan import split_adapter

    pairs = [split_adapter(r) for r in refs]
    models, adapters = _distinct([m for m, _ in pairs]), _distinct([a for _, a in pairs])
    return [m + (f"+{a}" if a else "") for m, a in zip(models, adapters)]


def _distinct(refs: list[str]) -> list[str]:
    parts = [Path(r).parts or (r,) for r in refs]
    names = []
    for r, p in zip(refs, parts):
        name = p[-1]  # the same path twice: one name
        for n in range(1, len(p) + 1 if r else 0):  # no adapter: no name
            if not any(q != p and q[-n:] == p[-n:] for q in parts):
                name = str(Path(*p[-n:]))
                break
        names.append(name)
    return names


@contextlib.contextmanager
def writing_file(option: str, target: str):
    """A hidden file to write, renamed onto `target` at the end (targets.replaced: never half a file); the
    folders made first, and what can still fail (a full disk) worded as one line."""
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with targets.replaced(Path(target)) as temp:
            yield temp
    except OSError as exc:
        raise os_error(f"{option} {shown(target)}: cannot write", exc) from None


def cmd_methods(args: argparse.Namespace) -> int:
    from .docs import methods_markdown, methods_text

    print(methods_markdown() if args.markdown else methods_text())
    return 0


def build_parser(prog: str = "fedmerge") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge models as a mergekit-style YAML describes")
    m.add_argument("config", help="YAML file (mergekit format, plus FedMerge's methods)")
    m.add_argument("out_dir", help="output folder (written atomically)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--shard-size", type=_size, default=_size("2GB"), help="max bytes per safetensors shard")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")
    m.add_argument("--device", default=None,
                   help="where tensors are merged: cpu, cuda[:N] or auto (default: $FEDMERGE_DEVICE, else cpu)")
    m.add_argument("--trust-remote-code", action="store_true", help="accept models that ship custom code")
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("similarity", help="cosine similarity, sign conflicts and norms of task vectors")
    s.add_argument("--base", required=True, help="base model (folder or Hub id; model+adapter as in merge)")
    s.add_argument("models", nargs="+", help="fine-tuned models, LoRA adapters, or model+adapter (mergekit's)")
    s.add_argument("--html", help="write a plotly heatmap here")
    s.add_argument("--json", help="write the matrices as JSON here")
    s.add_argument("--per-layer", action="store_true", help="print per-layer cosine similarities")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--offline", action="store_true")
    s.set_defaults(func=cmd_similarity)

    d = sub.add_parser("methods", help="list the merge methods and their hyperparameters")
    d.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    d.set_defaults(func=cmd_methods)
    return p


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so the same cleanup runs."""


_deferred: list[BaseException] = []  # while merging: a signal noted here, raised between tensors
_merging = False


def _on_signal(signum, frame):
    """Ctrl-C and SIGTERM stop the command. While tensors merge they are only noted and raised at the
    next tensor: raised inside a numba kernel's call they left it half done (a segfault, or
    "returned a result with an exception set")."""
    exc = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    if not _merging:
        raise exc
    _deferred.append(exc)


@contextlib.contextmanager
def _signals_between_tensors():
    global _merging
    _merging = True
    try:
        yield
    finally:
        _merging = False
        _deferred.clear()  # a signal after the last tensor: the merge was written whole


def _raise_deferred() -> None:
    if _deferred:
        raise _deferred[0]


def main(argv: list[str] | None = None, prog: str = "fedmerge") -> int:
    """Run one command; returns the exit status (the `fedmerge` console script's entry point)."""
    tolerant_console()
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals to whoever runs us
        previous = {}
    try:
        return args.func(args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"error: {'interrupted' if isinstance(exc, KeyboardInterrupt) else 'terminated'}; "
              "no output was written", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    except MemoryError:
        print("error: out of memory; nothing was written", file=sys.stderr)
    except Exception as exc:  # never a traceback to the user unless asked
        if args.debug or os.environ.get("FEDMERGE_DEBUG"):
            raise
        if isinstance(exc.__context__, (KeyboardInterrupt, Terminated)):  # raised inside compiled code (numba)
            print(f"error: {'interrupted' if isinstance(exc.__context__, KeyboardInterrupt) else 'terminated'}; "
                  "no output was written", file=sys.stderr)
            return 130 if isinstance(exc.__context__, KeyboardInterrupt) else 128 + signal.SIGTERM
        if isinstance(exc, OSError):  # a path the checks did not foresee: its words, not its errno
            where = shown(exc.filename) if exc.filename else "a file"
            print(f"error: {os_error(where, exc)} (run with --debug for details)", file=sys.stderr)
        else:
            print(f"error: internal error: {exc or 'unexpected failure'} (run with --debug for details)",
                  file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 2
