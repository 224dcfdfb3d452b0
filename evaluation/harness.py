"""Exact-match evaluation of (merged) models on the task registry.

The app evaluates many merges of the same-shaped model, so this module keeps per-call work to
the model's forward passes: prompts are tokenized once per (task, split, n) and cached, all
tasks' prompts go through left-padded batches of similar lengths, and decoding is a hand-written
greedy loop that reuses the KV cache and drops finished rows (bench/eval_speed.py checks it
against ``model.generate``: the same predictions, a little faster).
Functions take an already loaded model and tokenizer and never reload anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .exact_match import (cache_of, cannot_match, concatenative_pieces, device_of, forced_outputs, left_padded,
                          shared_prefill, shared_prefix_len)
from .tasks import TASKS, Example, get_task


@dataclass
class EvalResult:
    split: str
    n: int
    accuracy: dict[str, float]  # task -> exact-match accuracy in [0, 1]
    predictions: dict[str, list[str]]  # task -> one prediction per example
    examples: dict[str, list[Example]] = field(default_factory=dict)
    seconds: float = 0.0
    generations: list[str] = field(default_factory=list)  # continuations of evaluate(prompts=...)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / max(1, len(self.accuracy))


def _tok_key(tokenizer) -> tuple:
    return (tokenizer.__class__.__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id, getattr(tokenizer, "name_or_path", ""))


_PROMPT_CACHE: dict[tuple, list[list[int]]] = {}


def _prompt_ids(tokenizer, task: str, split: str, n: int) -> tuple[list[Example], list[list[int]]]:
    exs = get_task(task).examples(split, n)
    key = (_tok_key(tokenizer), task, split, n)
    if key not in _PROMPT_CACHE:
        _PROMPT_CACHE[key] = _encode(tokenizer, [e.prompt for e in exs])
    return exs, _PROMPT_CACHE[key]


def _encode(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids with the tokenizer's own specials (the zoo's prepends <bos>)."""
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def _stop_ids(tokenizer) -> list[int]:
    stops = [tokenizer.eos_token_id]
    nl = tokenizer.convert_tokens_to_ids("\n")
    if isinstance(nl, int) and nl != tokenizer.unk_token_id:
        stops.append(nl)
    return [s for s in stops if s is not None]


def _cache_arg() -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` in forward(); accept both."""
    import inspect

    from transformers import GPT2LMHeadModel

    return "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_arg()


@torch.inference_mode()
def greedy_ids(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int] | int,
               pad_id: int, stop_ids: Sequence[int], groups: int = 1,
               answers: Sequence[str | None] | None = None, pieces: Sequence[str] | None = None,
               prefix_lens: Sequence[int] | None = None) -> list[list[int]]:
    """Batched greedy decoding with left padding and the KV cache; returns new ids (stop token excluded).

    Rows stop at any of ``stop_ids`` or after their own ``max_new_tokens``; the loop ends when all rows have.
    Once a quarter of the running rows have stopped they leave the batch and the KV cache.
    With ``groups`` G > 1 (a `grouped.GroupedModel`), the batch is G blocks of the same prompts and
    the result is G·len(prompt_ids) rows, block-major; a prompt leaves only when every block has finished it.
    With ``answers`` (stripped, one per prompt) and the tokenizer's ``pieces`` (see
    exact_match.concatenative_pieces), a row also stops as soon as its text can no longer match its answer
    exactly (a search needs only the score: wrong outputs cost one token, not their whole length).
    With ``prefix_lens`` (one per prompt, each ≥ 1 and shorter than its prompt), prompts that start
    with the same first k tokens share one prefill of them: the prefixes run first, their KV cache is
    copied to every row that starts with them, then the rest of each prompt runs on top (a task's
    prompts share their keyword, ~60% of the zoo's prompt tokens).
    """
    b0 = len(prompt_ids)
    if b0 == 0:
        return []
    prompt_ids = list(prompt_ids) * groups
    b = len(prompt_ids)
    limits = torch.tensor([max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens) * groups)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    out = torch.full((b, int(limits.max())), pad_id, dtype=torch.long)
    done = limits <= 0
    lengths = torch.zeros(b, dtype=torch.long)
    rows = torch.arange(b)  # which original row each row of the running batch is
    judge = answers is not None and pieces is not None
    if judge:
        answers, texts = list(answers) * groups, [""] * b
    if prefix_lens is not None and all(0 < k < len(p) for p, k in zip(prompt_ids, list(prefix_lens) * groups)):
        past, step_ids, step_pos, attn = shared_prefill(model, prompt_ids[:b0], list(prefix_lens), pad_id, groups)
    else:
        past = None
        step_ids, attn = left_padded(prompt_ids, pad_id)
        step_pos = (attn.cumsum(1) - 1).clamp(min=0)
    dev = device_of(model)  # the model's inputs go there; the loop's bookkeeping stays on the CPU
    for t in range(int(limits.max())):
        res = model(input_ids=step_ids.to(dev), attention_mask=attn.to(dev), position_ids=step_pos.to(dev),
                    use_cache=True, logits_to_keep=1, **{_CACHE_ARG: past} if past is not None else {})
        past = cache_of(res)
        nxt = res.logits[:, -1, :].argmax(-1).cpu()
        stop = torch.isin(nxt, stops)
        finished = done[rows]
        live = ~finished & ~stop
        out[rows[live], t] = nxt[live]
        lengths[rows[live]] += 1
        finished = finished | stop | (lengths[rows] >= limits[rows])
        if judge:
            for j in live.nonzero().flatten().tolist():
                r = int(rows[j])
                if answers[r] is not None:
                    texts[r] += pieces[int(nxt[j])]
                    if cannot_match(texts[r], answers[r]):
                        finished[j] = True
        done[rows] = finished
        if bool(finished.all()):
            break
        step_ids = nxt.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=attn.dtype)], dim=1)
        if groups == 1:
            keep = (~finished).nonzero().flatten()
        else:  # keep a prompt in every block while any block still runs it
            cols = (~finished).view(groups, -1).any(0).nonzero().flatten()
            n = len(rows) // groups
            keep = (torch.arange(groups).unsqueeze(1) * n + cols.unsqueeze(0)).flatten()
        if keep.numel() <= 0.75 * len(rows) and hasattr(past, "batch_select_indices"):
            # drop finished rows from the batch (and the KV cache): they no longer cost a forward
            past.batch_select_indices(keep.to(dev))
            rows, step_ids, step_pos, attn = rows[keep], step_ids[keep], step_pos[keep], attn[keep]
    return [out[i, :int(lengths[i])].tolist() for i in range(b)]


def evaluate_grouped(grouped, tokenizer, task_names: Sequence[str] | None = None, split: str = "test",
                     n: int = 100, batch_size: int = 128, scores_only: bool = False) -> list[EvalResult]:
    """`evaluate` for each of a `grouped.GroupedModel`'s candidates, decoded together (same batches per candidate)."""
    return _evaluate(grouped.model, tokenizer, task_names, split, n, batch_size, (), None, grouped.groups,
                     scores_only)


def evaluate(model, tokenizer, task_names: Sequence[str] | None = None, split: str = "test", n: int = 100,
             batch_size: int = 128, prompts: Sequence[str] = (),
             prompt_limits: Sequence[int] | None = None, scores_only: bool = False) -> EvalResult:
    """Exact-match accuracy of ``model`` on each task's first ``n`` examples of ``split`` (greedy decoding).

    ``prompts`` (free text, each with its own limit in ``prompt_limits``) are decoded in the same
    batches and returned in ``generations``: the live view scores and fills its prompts table with
    one decoding loop (on a big model each decoding step reads every weight once, whatever the batch).
    ``scores_only`` (a search): the same accuracies, found without decoding every output in full
    where the tokenizer allows judging partial text (`exact_match`): predictions are then cut short
    (a hit's is its answer, a miss's ends at its first wrong character).
    """
    return _evaluate(model, tokenizer, task_names, split, n, batch_size, prompts, prompt_limits, 1, scores_only)[0]


def _evaluate(model, tokenizer, task_names, split, n, batch_size, prompts, prompt_limits, groups,
              scores_only=False) -> list[EvalResult]:
    import time

    t0 = time.perf_counter()
    names = list(TASKS) if task_names is None else list(task_names)
    exs_by_task, rows, limits, owner, answers, answer_ids, prefix = {}, [], [], [], [], [], []
    for name in names:
        exs, ids = _prompt_ids(tokenizer, name, split, n)
        exs_by_task[name] = exs
        rows += ids
        limits += [get_task(name).max_new_tokens] * len(ids)
        owner += [name] * len(ids)
        if scores_only:
            answers += [e.answer.strip() for e in exs]
            answer_ids += _answer_ids(tokenizer, name, split, n)
            prefix += [shared_prefix_len(ids)] * len(ids)
    if prompts:
        extra = _encode(tokenizer, prompts)
        wanted = list(prompt_limits) if prompt_limits is not None else [16] * len(extra)
        rows += extra
        limits += [max(1, min(m, _room(model, [r]))) for m, r in zip(wanted, extra)]
        owner += [None] * len(extra)
        if scores_only:
            answers += [None] * len(extra)
            answer_ids += [None] * len(extra)
            prefix += [0] * len(extra)
    pieces = _pieces(tokenizer) if scores_only else None
    was_training = model.training
    model.eval()
    new: list[list[list[int]]] = [[] for _ in range(groups)]
    # Sort by length so padding stays small inside each batch; restore order afterwards. Batches of
    # about `batch_size` rows keep the activations in cache: on the zoo they beat one batch of 700 by
    # 1.5x. The rows are cut into equal batches (7 tasks x 20 = 140 rows: one batch, not 128 + 12,
    # which costs a second decoding loop for 12 rows).
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    n_batches = max(1, round(len(order) / batch_size))
    bounds = [round(j * len(order) / n_batches) for j in range(n_batches + 1)]
    stop_ids = _stop_ids(tokenizer)

    def decode(idx: list[int]) -> list[list[int]]:
        return greedy_ids(model, [rows[i] for i in idx], [limits[i] for i in idx], tokenizer.pad_token_id, stop_ids,
                          groups=groups, answers=[answers[i] for i in idx] if scores_only else None, pieces=pieces,
                          prefix_lens=[prefix[i] for i in idx] if scores_only else None)

    for a, z in zip(bounds, bounds[1:]):
        idx = order[a:z]
        if pieces is not None:  # scores only: one forced pass decides most rows; the rest are decoded
            got = forced_outputs(model, [rows[i] for i in idx], [answer_ids[i] for i in idx], [limits[i] for i in idx],
                                 [prefix[i] for i in idx], tokenizer.pad_token_id, stop_ids, pieces, _CACHE_ARG, groups)
            unsure = sorted({k % len(idx) for k, ids in enumerate(got) if ids is None})
            if unsure:
                decoded = decode([idx[k] for k in unsure])
                for g in range(groups):
                    for m, k in enumerate(unsure):
                        if got[g * len(idx) + k] is None:
                            got[g * len(idx) + k] = decoded[g * len(unsure) + m]
        else:
            got = decode(idx)
        for g in range(groups):
            new[g] += got[g * len(idx):(g + 1) * len(idx)]
    if was_training:
        model.train()
    return [_score(tokenizer, names, split, n, exs_by_task, order, owner, new[g], len(rows), t0) for g in range(groups)]


_PIECES: dict[tuple, list[str] | None] = {}
_ANSWER_CACHE: dict[tuple, list[list[int] | None]] = {}


def _answer_ids(tokenizer, task: str, split: str, n: int) -> list[list[int] | None]:
    """Each example's answer as token ids, where they decode back to exactly the answer (else None:
    that row is decoded for real)."""
    key = (_tok_key(tokenizer), task, split, n)
    if key not in _ANSWER_CACHE:
        pieces = _pieces(tokenizer)
        out: list[list[int] | None] = []
        for e in get_task(task).examples(split, n):
            ids = list(tokenizer(e.answer.strip(), add_special_tokens=False)["input_ids"])
            out.append(ids if pieces is not None and "".join(pieces[i] for i in ids) == e.answer.strip() else None)
        _ANSWER_CACHE[key] = out
    return _ANSWER_CACHE[key]


def _pieces(tokenizer) -> list[str] | None:
    key = _tok_key(tokenizer)
    if key not in _PIECES:
        _PIECES[key] = concatenative_pieces(tokenizer)
    return _PIECES[key]


def _score(tokenizer, names, split, n, exs_by_task, order, owner, new, nrows, t0) -> EvalResult:
    import time

    texts = [""] * nrows
    for i, ids in zip(order, new):
        texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    preds: dict[str, list[str]] = {name: [] for name in names}
    generations = []
    for name, text in zip(owner, texts):
        (preds[name] if name is not None else generations).append(text)
    acc = {}
    for name in names:
        task = get_task(name)
        hits = [task.score(p, e.answer) for p, e in zip(preds[name], exs_by_task[name])]
        acc[name] = sum(hits) / max(1, len(hits))
    return EvalResult(split, n, acc, preds, exs_by_task, time.perf_counter() - t0, generations)


def normalized(acc_merged: Mapping[str, float], acc_finetuned: Mapping[str, float]) -> dict[str, float]:
    """Per-task merged accuracy ÷ that task's own fine-tune accuracy, plus ``"mean"`` over the shared tasks.

    Tasks whose fine-tune scores 0 are skipped (the ratio is undefined).
    """
    out = {t: acc_merged[t] / acc_finetuned[t] for t in acc_merged if acc_finetuned.get(t)}
    if out:
        out["mean"] = sum(out.values()) / len(out)
    return out


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int | Sequence[int] = 16) -> list[str]:
    """Greedy continuations of free-text prompts (stops at <eos> or a newline), for the UI.

    `max_new_tokens` may be one limit per prompt: each row's output then depends on its prompt
    alone, not on which other prompts share the batch.
    """
    rows = _encode(tokenizer, prompts)
    wanted = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    limits = [max(1, min(m, _room(model, [r]))) for m, r in zip(wanted, rows)]
    was_training = model.training
    model.eval()
    new = greedy_ids(model, rows, limits, tokenizer.pad_token_id, _stop_ids(tokenizer))
    if was_training:
        model.train()
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


def _room(model, rows: list[list[int]]) -> int:
    """New tokens that still fit the model's position table after the longest of `rows`."""
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 10 ** 9)
    return n_pos - max((len(r) for r in rows), default=0)
