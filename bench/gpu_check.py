"""The GPU paths, checked and timed against the CPU in one run (for a machine with a GPU).

Four parts, each comparing the same work on `--device` (default cuda) and on the CPU:
1. live merges (the app's `LiveModel` on the zoo's stack): every aggregator at its defaults and one
   sparsified setting; max |Δ| of every merged tensor (float32 rounding: ≤ 1e-5 of the tensor's
   largest entry) and the time per merge;
2. scoring (`evaluation.harness.evaluate`, the live view's decoding) of a task-arithmetic merge on the
   test split: accuracies and how many predictions differ, and the time;
3. a search (task arithmetic's λ grid, scores only) and compare-all with quick grids: chosen λ and
   scores, and the time; and on the device the same search with many λ per forward (batched) against
   one λ at a time;
4. disk merges (`python -m merging merge --device`) of the zoo for six methods: outputs compared
   and two in mergekit's bfloat16 arithmetic; outputs compared tensor by tensor, and the wall time of
   each CLI run.

    python bench/gpu_check.py [--device cuda] [--quick] [--no-record]

On a machine without a GPU `--device cpu` runs every part against itself (a smoke test of the
script; tests/test_bench_smoke.py does that with --quick). Appends to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ROOT, add_record_flag, append_results, best_of  # noqa: E402

DISK = (("task_arithmetic", "float32"), ("ties", "float32"), ("dare_ties", "float32"), ("breadcrumbs", "float32"),
        ("fednova", "float32"), ("median", "float32"), ("task_arithmetic", "bfloat16"), ("ties", "bfloat16"))
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}  # of the tensor's largest entry: one rounding of the dtype
SPARSE = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
          "breadcrumbs": {"density": 0.5, "gamma": 0.1}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
          "magnitude_prune": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.1},
          "della_linear": {"density": 0.5, "epsilon": 0.1}}


def timed(fn, repeat: int = 1):
    """`_common.best_of`, each timed call ending when the GPU's queued work has."""
    import torch

    def synced():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return best_of(synced, repeat)


def sessions(device: str):
    from evaluation.session import Session
    from merging.cache import StackCache

    cpu = Session(cache=StackCache(2 ** 32, device="cpu"), allow_hub=False).load_zoo()
    dev = Session(cache=StackCache(2 ** 32, device=device), allow_hub=False).load_zoo()
    return cpu, dev


def live_part(cpu, dev, quick: bool) -> list[str]:
    import torch

    from merging.registry import AGGREGATORS

    k = len(cpu.selected)
    lines = [f"{'method':18s} {'setting':26s} {'max |Δ| / max|θ|':>18s} {'cpu ms':>8s} {'dev ms':>8s}  ok"]
    methods = list(AGGREGATORS)
    if quick:
        methods = [m for m in methods if m in ("task_arithmetic", "ties", "fednova")]
    worst = 0.0
    for m in methods:
        n = next(c for c in (k, 2, 1) if AGGREGATORS[m].accepts(c))
        hp = SPARSE.get(m, {})
        sel = list(range(n))
        weights = [1.0 - 0.05 * i for i in range(n)]
        times = []
        for s in (cpu, dev):
            s.loaded()
            t, _ = timed(lambda s=s: s.merge.apply(m, weights, 0.7, hp, sel), repeat=2 if quick else 3)
            times.append(t * 1000)
        rel = 0.0
        for name, p in cpu.merge.targets.items():
            a, b = p.detach(), dev.merge.targets[name].detach().cpu()
            scale = float(a.abs().max()) or 1.0
            rel = max(rel, float((a - b).abs().max()) / scale)
        worst = max(worst, rel)
        setting = ", ".join(f"{a}={v}" for a, v in hp.items()) or "defaults"
        lines.append(f"{m:18s} {setting:26s} {rel:18.2e} {times[0]:8.1f} {times[1]:8.1f}  {'yes' if rel <= 1e-5 else 'NO'}")
    lines.append(f"worst relative difference: {worst:.2e} (float32 rounding: ≤ 1e-5)")
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return lines


def scoring_part(cpu, dev, quick: bool) -> list[str]:
    from evaluation.harness import evaluate

    k = len(cpu.selected)
    n = 10 if quick else 100
    out = []
    for s in (cpu, dev):
        s.apply("task_arithmetic", [1.0] * k, 0.5)
        out.append(timed(lambda s=s: evaluate(s.merge.model, s.tokenizer, s.tasks, split="test", n=n)))
    (tc, rc), (td, rd) = out
    differ = sum(a != b for t in rc.predictions for a, b in zip(rc.predictions[t], rd.predictions[t]))
    total = sum(len(v) for v in rc.predictions.values())
    return [f"task arithmetic λ 0.5, {len(cpu.tasks)} tasks × {n} test examples: mean accuracy cpu "
            f"{rc.mean_accuracy:.3f}, device {rd.mean_accuracy:.3f}; {differ} of {total} predictions differ; "
            f"cpu {tc:.2f} s, device {td:.2f} s (ratio {td / tc:.2f})"]


def search_part(cpu, dev, quick: bool) -> list[str]:
    from evaluation.search import LAMBDAS, compare_all, search

    lines = []
    grid = {"lambdas": [0.3, 0.6, 0.9], "n_val": 5, "n_test": 5} if quick else {}
    for s in (cpu, dev):  # reference scores (the fine-tunes' own) are computed once per session: not timed
        search(s, "task_arithmetic", workers=1, **{**grid, "lambdas": [0.5]})
    for label, fn in ((f"auto-tune task_arithmetic ({len(grid.get('lambdas', LAMBDAS))} λ)",
                       lambda s: search(s, "task_arithmetic", workers=1, **grid)),
                      ("compare-all, quick grids", lambda s: compare_all(s, quick=True, workers=1))):
        if quick and label.startswith("compare"):
            continue
        (tc, rc), (td, rd) = timed(lambda: fn(cpu)), timed(lambda: fn(dev))
        if isinstance(rc, list):  # compare-all: one result per method
            same = [(a.method, a.best_lambda, a.best_hyper) == (b.method, b.best_lambda, b.best_hyper)
                    for a, b in zip(rc, rd)]
            what = f"same choice in {sum(same)} of {len(same)} methods"
        else:
            what = f"best λ cpu {rc.best_lambda:g}, device {rd.best_lambda:g}; score {rc.best_score:.3f} / {rd.best_score:.3f}"
        lines.append(f"{label:34s} cpu {tc:7.1f} s   device {td:7.1f} s   ratio {td / tc:.2f}   {what}")
    # on the device: many λ per forward (evaluation.grouped) against the one-λ loop; off by default
    # (FEDMERGE_SEARCH_BATCH=1), because on the CPU it does not pay; a GPU is where it should
    (tl, rl), (tb, rb) = (timed(lambda b=b: search(dev, "task_arithmetic", workers=1, batched=b, **grid))
                          for b in (False, True))
    lines.append(f"{'same search on the device, batched':34s} loop {tl:6.1f} s   batched {tb:6.1f} s   "
                 f"ratio {tb / tl:.2f}   same choice and scores: {rl.best_lambda == rb.best_lambda and rl.scores == rb.scores}")
    return lines


def disk_part(device: str, quick: bool) -> list[str]:
    from safetensors.torch import load_file

    from evaluation.session import read_zoo

    base, specs = read_zoo()
    fts = [s.ref for s in specs if not s.variant_of]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, dtype in DISK[:1] if quick else DISK:
            cfg = Path(tmp) / f"{m}-{dtype}.yml"
            params = {"fednova": {"steps": [100.0] * len(fts)}}.get(m, SPARSE.get(m, {}))
            body = [f"merge_method: {m}", f"base_model: {base}", f"dtype: {dtype}", "models:"]
            body += [f"  - model: {f}\n    parameters: {{weight: 1.0}}" for f in fts]
            if params:
                body += ["parameters:"] + [f"  {a}: {v}" for a, v in params.items()]
            cfg.write_text("\n".join(body) + "\n")
            walls = []
            for dv, out in (("cpu", "host"), (device, "device")):
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "merging", "merge", str(cfg), f"{tmp}/{m}-{dtype}-{out}", "--device", dv,
                                    "--no-progress", "--offline"], cwd=ROOT, capture_output=True, text=True)
                walls.append(time.perf_counter() - t0)
                if r.returncode:
                    lines.append(f"{m:16s} --device {dv}: FAILED: {r.stderr.strip()[-300:]}")
            if all((Path(tmp) / f"{m}-{dtype}-{out}" / "model.safetensors").exists() for out in ("host", "device")):
                a = load_file(f"{tmp}/{m}-{dtype}-host/model.safetensors")
                b = load_file(f"{tmp}/{m}-{dtype}-device/model.safetensors")
                rel = max(float((a[k].float() - b[k].float()).abs().max()) / (float(a[k].float().abs().max()) or 1.0)
                          for k in a)
                lines.append(f"{m:16s} {dtype:8s} cpu {walls[0]:5.1f} s  --device {device} {walls[1]:5.1f} s  "
                             f"max |Δ| / max|θ| {rel:.2e}  {'ok' if rel <= TOLERANCE[dtype] else 'DIFFERENT'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer methods and examples (the smoke test)")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    import torch

    from merging.device import resolve_device

    device = str(resolve_device(args.device))
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}", flush=True)
    cpu, dev = sessions(device)  # a failure here is the first thing a GPU session must see: not caught
    sections = []
    for title, part in (("live merges", lambda: live_part(cpu, dev, args.quick)),
                        ("scoring", lambda: scoring_part(cpu, dev, args.quick)),
                        ("searches", lambda: search_part(cpu, dev, args.quick)),
                        ("disk merges (CLI)", lambda: disk_part(device, args.quick))):
        print(f"\n## {title}", flush=True)
        try:
            lines = part()
        except Exception as exc:  # one part failing on a new GPU must not cost the others (device time is scarce)
            import traceback

            lines = [f"FAILED: {type(exc).__name__}: {exc}", *traceback.format_exc().splitlines()[-12:]]
        print("\n".join(lines), flush=True)
        sections.append((title, lines))
    if not args.no_record:
        body = [f"Device {device} ({name}), torch {torch.__version__}; zoo `assets/zoo`, every row the same work "
                "on the CPU and on the device in this run."]
        for title, lines in sections:
            body += ["", f"{title}:", "", "```", *lines, "```"]
        append_results("gpu_check", ["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)], "\n".join(body))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
