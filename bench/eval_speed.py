"""Evaluation speed on the zoo: every task × 100 test examples, and a full λ search (40 values).

Baselines, measured in the same run:
- the harness (`evaluation.harness.evaluate`: one left-padded batch, hand-written greedy loop
  with the KV cache, finished rows dropped) against transformers' `model.generate` on the same
  prompts (one batch per task, greedy, the same limits and stop tokens); the two must agree on
  every prediction;
- `evaluation.search.search` (the update U computed once per setting, each λ only rewrites
  θ₀ + λ·U; then the best setting scored on test) against the plain loop: for each λ a full
  `Session.apply` merge, then the same validation scoring. The first search also scores every
  fine-tune on validation and test (the normalisation); it is reported separately.

Targets (issue #5): all tasks × 100 under 2 s; a 40-value λ search under 90 s.

    python bench/eval_speed.py [--repeat 3] [--no-record]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import add_record_flag, append_results, best_of, zoo_session  # noqa: E402


def generate_baseline(model, tokenizer, tasks, n: int) -> dict[str, list[str]]:
    """transformers' generate, greedy, one left-padded batch per task."""
    from evaluation.harness import _stop_ids
    from evaluation.tasks import get_task

    preds = {}
    tokenizer.padding_side = "left"
    for name in tasks:
        task = get_task(name)
        exs = task.examples("test", n)
        enc = tokenizer([e.prompt for e in exs], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 eos_token_id=_stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        stops = set(_stop_ids(tokenizer))
        texts = []
        for row in new.tolist():
            end = next((j for j, t in enumerate(row) if t in stops), len(row))  # the harness drops the stop
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        preds[name] = texts
    return preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    add_record_flag(ap)
    args = ap.parse_args(argv)
    from evaluation.harness import evaluate
    from evaluation.search import LAMBDAS, SEARCH_N, search
    from evaluation.session import LIVE_SPLIT
    from evaluation.tasks import TASKS

    session = zoo_session()
    tasks = [t for t in TASKS if t in session.tasks]
    session.apply("task_arithmetic", [1.0] * len(session.selected), 0.3)
    model, tok = session.live_model.model, session.tokenizer
    print(f"zoo: {len(session.selected)} fine-tunes, tasks {tasks}; torch threads {torch.get_num_threads()}",
          flush=True)

    rows = []
    ours, res = best_of(lambda: evaluate(model, tok, tasks, split="test", n=100), args.repeat)
    theirs, preds = best_of(lambda: generate_baseline(model, tok, tasks, 100), args.repeat)
    same = sum(p == q for t in tasks for p, q in zip(res.predictions[t], preds[t]))
    total = sum(len(preds[t]) for t in tasks)
    rows.append(f"evaluate, {len(tasks)} tasks x 100 test   {ours:7.2f} s   model.generate {theirs:7.2f} s   "
                f"ratio {ours / theirs:.2f}   identical predictions {same}/{total}   target < 2 s: "
                f"{'met' if ours < 2 else 'NOT met'}")
    print(rows[-1], flush=True)

    first, _ = best_of(lambda: search(session, "task_arithmetic", lambdas=LAMBDAS))  # also scores each fine-tune
    ours, result = best_of(lambda: search(session, "task_arithmetic", lambdas=LAMBDAS))

    def plain_loop():
        for lam in LAMBDAS:
            session.apply("task_arithmetic", [1.0] * len(session.selected), lam)
            evaluate(session.live_model.model, tok, tasks, split=LIVE_SPLIT, n=SEARCH_N)

    theirs, _ = best_of(plain_loop, 1)
    rows.append(f"search task_arithmetic, {len(LAMBDAS)} λ   {ours:7.2f} s   per-λ merge loop {theirs:7.2f} s   "
                f"ratio {ours / theirs:.2f}   (first search, scoring the references too: {first:.2f} s)   "
                f"best λ {result.best_lambda:g}   target < 90 s: {'met' if first < 90 else 'NOT met'}")
    print(rows[-1], flush=True)
    if not args.no_record:
        append_results("eval_speed", ["python", "bench/eval_speed.py", *(argv or sys.argv[1:])],
                       f"Zoo, {len(tasks)} tasks; best of {args.repeat} for evaluate, one run for the searches "
                       f"(the search includes its final test scoring).\n\n```\n" + "\n".join(rows) + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
