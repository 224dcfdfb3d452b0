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


def _concatenative_pieces(tokenizer) -> list[str] | None:
    """Each token id's text when decoding is plain concatenation of them (a `Fuse` decoder, as the
    zoo's character tokenizer has), else None: only then can a partial output be judged by its text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "Fuse" or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if len(tokenizer) > 4096:
        return None
    special = set(tokenizer.all_special_ids)
    return ["" if i in special else tokenizer.convert_ids_to_tokens(i) or "" for i in range(len(tokenizer))]


def _cannot_match(text: str, answer: str) -> bool:
    """Whether no continuation of `text` makes `text.strip() == answer` (answer already stripped)."""
    q = text.lstrip()
    if len(q) <= len(answer):
        return not answer.startswith(q)
    return not q.startswith(answer) or q[len(answer):].strip() != ""


def _left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, p in enumerate(seqs):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids, mask


def _shared_prefill(model, prompts: list[Sequence[int]], prefix_lens: list[int], pad_id: int, groups: int):
    """Prefill each distinct prefix once (per candidate block), copy its KV cache to the rows that
    start with it, and return (cache, suffix ids, suffix positions, attention mask over both) for the
    first step of the loop, which runs the suffixes on top of the cache."""
    index: dict[tuple, int] = {}
    which = [index.setdefault(tuple(p[:k]), len(index)) for p, k in zip(prompts, prefix_lens)]
    pre_ids, pre_mask = _left_padded(list(index) * groups, pad_id)
    res = model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=(pre_mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    past = getattr(res, "cache", None)
    if past is None:
        past = res.past_key_values
    u = len(index)
    rows = torch.tensor([g * u + w for g in range(groups) for w in which])
    past.batch_select_indices(rows)
    suffixes = [p[k:] for p, k in zip(prompts, prefix_lens)] * groups
    suf_ids, suf_mask = _left_padded(suffixes, pad_id)
    start = torch.tensor(list(prefix_lens) * groups).unsqueeze(1)
    suf_pos = start + (suf_mask.cumsum(1) - 1).clamp(min=0)
    return past, suf_ids, suf_pos, torch.cat([pre_mask[rows], suf_mask], dim=1)


def _shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with (at least one left to each prompt's own part)."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return k


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
    _concatenative_pieces), a row also stops as soon as its text can no longer match its answer
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
        past, step_ids, step_pos, attn = _shared_prefill(model, prompt_ids[:b0], list(prefix_lens), pad_id, groups)
    else:
        past = None
        step_ids, attn = _left_padded(prompt_ids, pad_id)
        step_pos = (attn.cumsum(1) - 1).clamp(min=0)
    for t in range(int(limits.max())):
        res = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True,
                    logits_to_keep=1, **{_CACHE_ARG: past} if past is not None else {})
        past = getattr(res, "cache", None)
        if past is None:
            past = res.past_key_values
        nxt = res.logits[:, -1, :].argmax(-1)
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
                    if _cannot_match(texts[r], answers[r]):
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
            past.batch_select_indices(keep)
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
    ``scores_only`` (a search): the same accuracies, but a wrong output stops at its first wrong
    character where the tokenizer allows judging partial text, so its prediction is cut short.
    """
    return _evaluate(model, tokenizer, task_names, split, n, batch_size, prompts, prompt_limits, 1, scores_only)[0]


def _evaluate(model, tokenizer, task_names, split, n, batch_size, prompts, prompt_limits, groups,
              scores_only=False) -> list[EvalResult]:
    import time

    t0 = time.perf_counter()
    names = list(TASKS) if task_names is None else list(task_names)
    exs_by_task, rows, limits, owner, answers, prefix = {}, [], [], [], [], []
    for name in names:
        exs, ids = _prompt_ids(tokenizer, name, split, n)
        exs_by_task[name] = exs
        rows += ids
        limits += [get_task(name).max_new_tokens] * len(ids)
        owner += [name] * len(ids)
        if scores_only:
            answers += [e.answer.strip() for e in exs]
            prefix += [_shared_prefix_len(ids)] * len(ids)
    if prompts:
        extra = _encode(tokenizer, prompts)
        wanted = list(prompt_limits) if prompt_limits is not None else [16] * len(extra)
        rows += extra
        limits += [max(1, min(m, _room(model, [r]))) for m, r in zip(wanted, extra)]
        owner += [None] * len(extra)
        if scores_only:
            answers += [None] * len(extra)
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
    for a, z in zip(bounds, bounds[1:]):
        idx = order[a:z]
        got = greedy_ids(model, [rows[i] for i in idx], [limits[i] for i in idx], tokenizer.pad_token_id,
                         _stop_ids(tokenizer), groups=groups,
                         answers=[answers[i] for i in idx] if scores_only else None, pieces=pieces,
                         prefix_lens=[prefix[i] for i in idx] if scores_only else None)
        for g in range(groups):
            new[g] += got[g * len(idx):(g + 1) * len(idx)]
    if was_training:
        model.train()
    return [_score(tokenizer, names, split, n, exs_by_task, order, owner, new[g], len(rows), t0) for g in range(groups)]


_PIECES: dict[tuple, list[str] | None] = {}


def _pieces(tokenizer) -> list[str] | None:
    key = _tok_key(tokenizer)
    if key not in _PIECES:
        _PIECES[key] = _concatenative_pieces(tokenizer)
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
