"""Disk-to-disk merges: `python -m merging merge` against `mergekit-yaml` on the SAME YAML.

For each method both tools run as subprocesses (mergekit in its own venv, CPU, HF_HUB_OFFLINE=1);
wall time and peak RSS (wait4's ru_maxrss) are measured the same way for both, and every output
tensor is compared (max abs difference, float32). dare_linear is random in both tools with
different generators: only its kept fraction and L1 norm per tensor are compared.

    python bench/mergekit_compare.py [--methods ties,linear] [--repeat 1] [--zoo] [--no-record]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (WORK, add_record_flag, append_results, mergekit_env, mergekit_venv, ours_env,  # noqa: E402
                     run_measured)

WEIGHTS = [1.0, 0.8, 0.6, 0.4]
METHODS = {  # name: (global parameters, per-model parameters, uses a base model)
    "task_arithmetic": ({"lambda": 0.7}, {}, True),
    "ties": ({}, {"density": 0.5}, True),
    "linear": ({}, {}, False),
    "breadcrumbs": ({}, {"density": 0.5, "gamma": 0.01}, True),
    "dare_linear": ({}, {"density": 0.5}, True),
}
EXACT_TOL = 1e-6


def write_yaml(path: Path, method: str, base: Path, models: list[Path]) -> None:
    glob, per, uses_base = METHODS[method]
    lines = [f"merge_method: {method}"]
    if uses_base:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for m, w in zip(models, WEIGHTS * len(models)):
        params = ", ".join(f"{k}: {v}" for k, v in {"weight": w, **per}.items())
        lines += [f"  - model: {m}", f"    parameters: {{{params}}}"]
    if glob:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in glob.items()) + "}")
    lines.append("dtype: float32")
    path.write_text("\n".join(lines) + "\n")


def _open_all(folder: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def tie_entries(key: str, base: Path, models: list[Path], method: str) -> torch.Tensor:
    """Entries where some model's |δ| equals exactly its magnitude cut (top-k or band edge): there
    an unstable sort (mergekit's argsort) and our selection may keep different tied entries."""
    glob, per, _ = METHODS[method]
    b_idx = _open_all(base)
    with safe_open(b_idx[key], framework="pt") as fb:
        t0 = fb.get_tensor(key).float()
    hit = torch.zeros(t0.shape, dtype=torch.bool)
    for m in models:
        with safe_open(_open_all(m)[key], framework="pt") as fm:
            a = (fm.get_tensor(key).float() - t0).abs()
        flat, n = a.reshape(-1).numpy(), a.numel()
        dens = per.get("density", 1.0)
        if method.startswith("breadcrumbs"):
            target, n_top = int(dens * n), int(per.get("gamma", 0.01) * n)
            lo = max(0, n - target - n_top)
            cuts = np.partition(flat, [lo, lo + target - 1])[[lo, lo + target - 1]]
        else:
            k = max(1, int(dens * n))
            cuts = np.partition(flat, n - k)[[n - k]]
        for c in cuts:
            hit |= a == float(c)
    return hit


def compare_outputs(ours: Path, theirs: Path, base: Path | None, random_method: bool,
                    method: str = "", models: list[Path] | None = None) -> dict:
    """Max abs difference over all tensors, or (random methods) kept fraction / L1 statistics."""
    a, b = _open_all(ours), _open_all(theirs)
    missing = sorted(set(b) - set(a)) + sorted(set(a) - set(b))
    missing = [k for k in missing if k != "lm_head.weight"]  # tied: optional in mergekit's output
    base_idx = _open_all(base) if base else {}
    worst, worst_name, n_diff, n_tie_diff = 0.0, "", 0, 0
    frac_gap = l1_gap = 0.0
    for k in sorted(set(a) & set(b)):
        with safe_open(a[k], framework="pt") as fa, safe_open(b[k], framework="pt") as fb:
            ta, tb = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        if ta.shape != tb.shape:
            missing.append(f"{k} (shape {tuple(ta.shape)} vs {tuple(tb.shape)})")
            continue
        if random_method:
            with safe_open(base_idx[k], framework="pt") as fbase:
                t0 = fbase.get_tensor(k).float()
            da, db = ta - t0, tb - t0
            fa_, fb_ = float((da != 0).float().mean()), float((db != 0).float().mean())
            la, lb = float(da.abs().sum()), float(db.abs().sum())
            frac_gap = max(frac_gap, abs(fa_ - fb_))
            if lb > 0:
                l1_gap = max(l1_gap, abs(la - lb) / lb)
            continue
        d = (ta - tb).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > EXACT_TOL and method in ("ties", "breadcrumbs") and base is not None:
            ties = tie_entries(k, base, models, method)
            n_tie_diff += int(((d > EXACT_TOL) & ties).sum())
            d = d.masked_fill(ties, 0)
            m = float(d.max())
        n_diff += int((d > EXACT_TOL).sum())
        if m > worst:
            worst, worst_name = m, k
    return {"max_abs": worst, "worst": worst_name, "n_over_tol": n_diff, "missing": missing, "n_tie_diff": n_tie_diff,
            "frac_gap": frac_gap, "l1_gap": l1_gap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(WORK / "ckpt-1x"), help="folder made by make_checkpoints.py")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method (the best is kept)")
    ap.add_argument("--zoo", action="store_true", help="also merge the model zoo in assets/zoo if present")
    add_record_flag(ap)
    args = ap.parse_args(argv)

    ckpt = Path(args.ckpt).resolve()
    if not (ckpt / "base" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_checkpoints.py"), "--out", str(ckpt)],
                       check=True)
    suites = [("gpt2-124M", ckpt / "base", sorted(p for p in ckpt.iterdir() if p.name.startswith("ft")))]
    if args.zoo:
        zoo = Path(__file__).resolve().parent.parent / "assets" / "zoo"
        if (zoo / "base").is_dir():
            fts = sorted(p for p in zoo.iterdir() if p.is_dir() and p.name != "base"
                         and any(p.glob("*.safetensors")))
            suites.append(("zoo", zoo / "base", fts[:4]))
        else:
            print("--zoo: assets/zoo/base not found, skipped")
    venv = mergekit_venv()
    mk = str(venv / "bin" / "mergekit-yaml")
    work = WORK / "compare"
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    header = (f"{'suite':10} {'method':16} {'mergekit s':>10} {'ours s':>8} {'time x':>7} "
              f"{'mergekit MiB':>12} {'ours MiB':>9} {'RSS x':>6}  outputs")
    print(header, flush=True)
    for suite, base, models in suites:
        for method in args.methods.split(","):
            cfg = work / f"{suite}-{method}.yml"
            write_yaml(cfg, method, base, models)
            out_mk, out_us = work / f"{suite}-{method}-mergekit", work / f"{suite}-{method}-ours"
            cmd_mk = [mk, str(cfg), str(out_mk), "--no-cuda", "--quiet"]
            cmd_us = [sys.executable, "-m", "merging", "merge", str(cfg), str(out_us), "--overwrite", "--no-progress"]
            best = {}
            for tool, cmd, env in (("mergekit", cmd_mk, mergekit_env()), ("ours", cmd_us, ours_env())):
                for r in range(args.repeat):
                    if tool == "mergekit":
                        shutil.rmtree(out_mk, ignore_errors=True)
                    wall, rss, rc = run_measured(cmd, env, log=work / f"{suite}-{method}-{tool}.log")
                    if rc != 0:
                        print(f"{tool} failed on {method} (exit {rc}); see {work / f'{suite}-{method}-{tool}.log'}")
                        return 1
                    prev = best.get(tool, (float("inf"), float("inf")))
                    best[tool] = (min(wall, prev[0]), min(rss, prev[1]))
            cmp = compare_outputs(out_us, out_mk, base, method.startswith("dare"), method, models)
            (w_mk, r_mk), (w_us, r_us) = best["mergekit"], best["ours"]
            if method.startswith("dare"):
                verdict = f"kept-fraction gap {cmp['frac_gap']:.4f}, L1 rel. gap {cmp['l1_gap']:.4f} (random: stats only)"
            else:
                verdict = f"max|Δ| {cmp['max_abs']:.2e}" + (
                    f" ({cmp['n_over_tol']} entries > {EXACT_TOL:g}, worst {cmp['worst']})" if cmp["n_over_tol"] else "")
                if cmp["n_tie_diff"]:
                    verdict += (f" outside exact ties; {cmp['n_tie_diff']} entries differ where |δ| ties"
                                " at the cut (argsort order)")
            if cmp["missing"]:
                verdict += f"; tensor sets differ: {cmp['missing'][:3]}"
            row = (f"{suite:10} {method:16} {w_mk:10.1f} {w_us:8.1f} {w_us / w_mk:7.2f} "
                   f"{r_mk:12.0f} {r_us:9.0f} {r_us / r_mk:6.2f}  {verdict}")
            print(row, flush=True)
            rows.append(row)
    table = "\n".join([header, *rows])
    print("\ntime x / RSS x: ours / mergekit (targets: time ≤ 0.5, RSS ≤ 1.0, max|Δ| ≤ 1e-6)")
    if not args.no_record:
        append_results("mergekit_compare", ["python", "bench/mergekit_compare.py", *(argv or sys.argv[1:])],
                       "```\n" + table + "\n```\n\ntime x / RSS x = ours / mergekit; best of "
                       f"{args.repeat} run(s); peak RSS = ru_maxrss of the subprocess.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
