"""The zoo's pretraining on two threads with one thread's bits, against one thread, in the same run.

`python -m evaluation build-zoo` pretrains on 2 threads; the kernels whose sums split by thread
count run on one (`evaluation/bitwise_threads.py`), so the base is the one a 1-thread run makes.
This runs the first N steps of the full recipe both ways, checks every tensor is bit-identical and
prints the time per step and the ratio (target of issue #11: a clean rebuild ≤ 30 min on 2 cores).

    python bench/zoo_pretrain.py [--steps 40] [--no-record]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import add_record_flag, append_results, best_of  # noqa: E402


def pretrain_on(threads: int, steps: int):
    from evaluation.bitwise_threads import torch_threads
    from evaluation.zoo import FULL, pretrain

    with torch_threads(threads):
        secs, model = best_of(lambda: pretrain(replace(FULL, pretrain_steps=steps), log=lambda s: None))
    return secs / steps, model.state_dict()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="pretraining steps per run (the recipe has 2000)")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    one, ref = pretrain_on(1, args.steps)
    two, out = pretrain_on(2, args.steps)
    same = all(torch.equal(ref[k], out[k]) for k in ref)
    body = (f"Zoo pretraining, the full recipe's first {args.steps} steps (of 2000); baseline = 1 thread, same run.\n\n"
            f"```\n1 thread                          {one * 1000:6.0f} ms/step\n"
            f"2 threads, one thread's rounding  {two * 1000:6.0f} ms/step   ratio {two / one:.2f}   "
            f"bit-identical base: {'yes' if same else 'NO'}\n```\n")
    print(body)
    if not args.no_record:
        append_results("zoo_pretrain", ["python", "bench/zoo_pretrain.py"] + (argv if argv is not None else sys.argv[1:]), body)
    if not same:
        sys.exit("the 2-thread base differs from the 1-thread one")


if __name__ == "__main__":
    main()
