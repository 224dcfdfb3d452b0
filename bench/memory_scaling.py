"""Peak RSS of `python -m merging merge` on the 1x and 2x synthetic GPT-2 models (target: ratio <= 1.25).

Merging streams tensor by tensor, so peak memory follows the largest tensor (the embedding),
not the model: a model twice as deep should barely raise it.

    python bench/memory_scaling.py [--methods task_arithmetic,ties] [--no-record]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, add_record_flag, append_results, ours_env, run_measured  # noqa: E402
from mergekit_compare import write_yaml  # noqa: E402

TARGET = 1.25


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="task_arithmetic,ties")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    work = WORK / "memory"
    work.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    header = f"{'method':16} {'1x MiB':>8} {'2x MiB':>8} {'ratio':>6} {'1x s':>6} {'2x s':>6}"
    print(header, flush=True)
    for method in args.methods.split(","):
        res = {}
        for scale in ("1", "2"):
            ckpt = WORK / f"ckpt-{scale}x"
            if not (ckpt / "ft3" / "model.safetensors").exists():
                subprocess.run([sys.executable, str(Path(__file__).parent / "make_checkpoints.py"),
                                "--scale", scale, "--out", str(ckpt)], check=True)
            cfg = work / f"{method}-{scale}x.yml"
            write_yaml(cfg, method, ckpt / "base", sorted(p for p in ckpt.iterdir() if p.name.startswith("ft")))
            cmd = [sys.executable, "-m", "merging", "merge", str(cfg), str(work / f"out-{scale}x"),
                   "--overwrite", "--no-progress"]
            wall, rss, rc = run_measured(cmd, ours_env(), log=work / f"{method}-{scale}x.log")
            if rc:
                print(f"merge failed ({method}, {scale}x); see {work / f'{method}-{scale}x.log'}")
                return 1
            res[scale] = (wall, rss)
        ratio = res["2"][1] / res["1"][1]
        ok &= ratio <= TARGET
        row = f"{method:16} {res['1'][1]:8.0f} {res['2'][1]:8.0f} {ratio:6.2f} {res['1'][0]:6.1f} {res['2'][0]:6.1f}"
        print(row, flush=True)
        rows.append(row)
    verdict = f"target: 2x/1x peak RSS <= {TARGET} -> {'met' if ok else 'MISSED'}"
    print(verdict)
    if not args.no_record:
        append_results("memory_scaling", ["python", "bench/memory_scaling.py", *(argv or sys.argv[1:])],
                       "```\n" + "\n".join([header, *rows]) + "\n```\n\n" + verdict +
                       " (1x = 124M params, 2x = 252M params, 4 fine-tunes, float32; peak RSS = ru_maxrss)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
