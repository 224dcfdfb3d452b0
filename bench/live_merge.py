"""In-memory merges (the live app's path) per aggregator, against a copy bound measured in the same run.

Cold = the weight-independent step (trim / drop masks) recomputed: each run asks for a new
density, as when the user moves the density slider; "first" = the very first merge of a method,
whose buffers are freshly allocated (page faults included).

Bound = time of a plain torch copy of the K stacked task vectors' bytes plus one model's bytes (the
least a merge of K tasks must touch), measured per K in the same run. Each aggregator runs `LiveModel.apply` (merge written into the
parameters of a loaded GPT2LMHeadModel) with all weights changed between repeats (no
incremental shortcut); the best of --repeat runs is reported with its ratio to the bound.

    python bench/live_merge.py [--methods ties,median] [--repeat 3] [--no-record]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import WORK, add_record_flag, append_results  # noqa: E402

HYPER = {"ties": {"density": 0.5}, "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
         "breadcrumbs": {"density": 0.5, "gamma": 0.01}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
         "magnitude_prune": {"density": 0.5}, "fedgma": {"rho": 0.5}}


def best_of(fn, repeat: int) -> float:
    times = []
    for r in range(repeat):
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(WORK / "ckpt-1x"))
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--repeat", type=int, default=3)
    add_record_flag(ap)
    args = ap.parse_args(argv)
    from transformers import GPT2LMHeadModel

    from merging import AGGREGATORS, Checkpoint, LiveModel, TaskVectorStack, kernels, load_source

    ckpt = Path(args.ckpt)
    if not (ckpt / "ft3" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_checkpoints.py"), "--out", str(ckpt)],
                       check=True)
    fts = sorted(p for p in ckpt.iterdir() if p.name.startswith("ft"))
    t0 = time.perf_counter()
    stack = TaskVectorStack(Checkpoint(ckpt / "base"), [load_source(p) for p in fts])
    model = GPT2LMHeadModel.from_pretrained(ckpt / "base").float().eval()
    live = LiveModel(model, stack)
    print(f"stack: {stack.nbytes / 1e9:.2f} GB, loaded in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    bounds: dict[int, float] = {}

    def bound_for(k: int) -> float:
        """The bound for a merge of k tasks: copy k stacked task vectors and one model (warm buffers)."""
        if k not in bounds:
            srcs = [stack.deltas[n][:k] for n in stack.names] + [stack.base[n] for n in stack.names]
            dsts = [torch.empty_like(t) for t in srcs]

            def copy_all(_):
                for d, s in zip(dsts, srcs):
                    d.copy_(s)

            copy_all(0)  # first touch of the destination pages is not part of the bound
            bounds[k] = best_of(copy_all, max(3, args.repeat))
            print(f"bound for {k} tasks (copy of {sum(t.numel() * 4 for t in srcs) / 1e9:.2f} GB): "
                  f"{bounds[k]:.3f} s", flush=True)
        return bounds[k]

    names = args.methods.split(",") if args.methods else list(AGGREGATORS)
    k = len(fts)
    rows = []
    header = f"{'method':18} {'K':>2} {'bound':>6} {'seconds':>8} {'x bound':>8}"
    print(header, flush=True)
    for method in names:
        agg = AGGREGATORS[method]
        sel = list(range(min(k, agg.max_models or k)))
        hyper = HYPER.get(method, {})
        bound = bound_for(len(sel))

        def run(r, sel=sel, method=method, hyper=hyper):
            w = [1.0 - 0.1 * ((i + r) % 3) for i in range(len(sel))]  # every weight changes each repeat
            live.apply(method, w, 1.0, sel, **hyper)

        first = best_of(lambda _: run(-1), 1)  # warm-up: masks computed into freshly allocated memory
        s = best_of(run, args.repeat)
        row = f"{method:18} {len(sel):2d} {bound:6.3f} {s:8.3f} {s / bound:8.1f}"
        if agg.sparsifier is not None:  # cold: a new density each run, so the masks are recomputed
            def cold(r, method=method, sel=sel, hyper=hyper):
                w = [1.0 - 0.1 * ((i + r) % 3) for i in range(len(sel))]
                live.apply(method, w, 1.0, sel, **{**hyper, "density": hyper.get("density", 0.5) - 0.01 * (r + 2)})

            cold(-1)  # the cache now holds two settings: the next ones reuse the evicted buffers
            c = best_of(cold, args.repeat)
            row += f"   cold {c:.3f} s = {c / bound:.1f}x bound (first, fresh memory: {first / bound:.1f}x)"
        if agg.coefficients is not None:  # one slider moved: only that task's coefficient changes
            base_w = [1.0] * len(sel)
            live.apply(method, base_w, 1.0, sel, **hyper)

            def one(r, sel=sel, method=method, hyper=hyper):
                live.apply(method, [0.5 + 0.1 * (r % 2 + 1)] + [1.0] * (len(sel) - 1), 1.0, sel, **hyper)

            o = best_of(one, args.repeat)
            row += f"   one slider {o:.3f} s = {o / s:.2f}x full merge"
        print(row, flush=True)
        rows.append(row)
    live.reset_to_base()
    if not args.no_record:
        append_results("live_merge", ["python", "bench/live_merge.py", *(argv or sys.argv[1:])],
                       f"Bound: torch copy of the K stacked task vectors + one model (best of "
                       f"{max(3, args.repeat)}), per K. Times: best of {args.repeat}; torch threads "
                       f"{torch.get_num_threads()}; fused kernels {'on' if kernels.enabled() else 'off'}."
                       f"\n\n```\n" + "\n".join([header, *rows]) + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
