"""Scoring a candidate by exact match without decoding its outputs in full (what a search needs).

A search scores dozens of merged candidates on the same prompts and keeps only their accuracies.
Under greedy decoding an output equals its answer exactly when, fed the prompt and then the answer
(teacher forcing), the model's argmax at every answer position is the answer's next token and,
after the answer, a stop token (or the output limit is reached). So two forward passes decide
almost every row: the prompts (most wrong outputs are wrong from their first token), then the
answers of the rows still right. Only rows whose outcome hinges on what the exact-match rule
forgives (leading or trailing whitespace, a special token that decoding drops) are decoded for
real. Partial outputs are judged by their text, which needs a tokenizer that decodes by plain
concatenation (the zoo's character tokenizer); other tokenizers decode in full.

Prompts of one task share their keyword ("<bos>reverse: "): that prefix is prefilled once and its
KV cache copied to each row.

Bookkeeping (ids, masks, which rows run) stays on the CPU; what the model reads is moved to its
device at each call (`device_of`), and what decides the next step comes back as Python numbers.
"""
from __future__ import annotations

from typing import Sequence

import torch


def concatenative_pieces(tokenizer) -> list[str] | None:
    """Each token id's text when decoding is plain concatenation of them (a `Fuse` decoder, special
    tokens dropped), else None: only then can a partial output be judged by its text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "Fuse" or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if len(tokenizer) > 4096:
        return None
    special = set(tokenizer.all_special_ids)
    return ["" if i in special else tokenizer.convert_ids_to_tokens(i) or "" for i in range(len(tokenizer))]


def cannot_match(text: str, answer: str) -> bool:
    """Whether no continuation of `text` makes `text.strip() == answer` (answer already stripped)."""
    q = text.lstrip()
    if len(q) <= len(answer):
        return not answer.startswith(q)
    return not q.startswith(answer) or q[len(answer):].strip() != ""


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, width] left-padded with `pad_id`, and the attention mask."""
    width = max(len(p) for p in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, p in enumerate(seqs):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids, mask


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with (at least one left to each prompt's own part)."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return k


def device_of(model) -> torch.device:
    """Where a model's weights are (a grouped model holds them as buffers)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cache_of(res):
    """The KV cache a transformers forward returned (`cache` in 5.x, `past_key_values` before)."""
    past = getattr(res, "cache", None)
    return res.past_key_values if past is None else past


def continued(seqs: Sequence[Sequence[int]], starts: Sequence[int], prior_mask: torch.Tensor, pad_id: int):
    """Ids, positions and attention mask to run `seqs` on top of a cache whose rows hold `starts`
    tokens (left-padded to `prior_mask`'s width): each sequence left-padded, positions from its start."""
    ids, mask = left_padded(seqs, pad_id)
    pos = torch.tensor(list(starts)).unsqueeze(1) + (mask.cumsum(1) - 1).clamp(min=0)
    return ids, pos, torch.cat([prior_mask, mask], dim=1)


def shared_prefill(model, seqs: list[Sequence[int]], prefix_lens: list[int], pad_id: int, groups: int):
    """Prefill each distinct prefix once (per candidate block), copy its KV cache to the rows that
    start with it, and return (cache, rest ids, rest positions, attention mask over both): the
    caller's next forward runs the rest of each sequence on top of the cache."""
    index: dict[tuple, int] = {}
    which = [index.setdefault(tuple(p[:k]), len(index)) for p, k in zip(seqs, prefix_lens)]
    pre_ids, pre_mask = left_padded(list(index) * groups, pad_id)
    dev = device_of(model)
    past = cache_of(model(input_ids=pre_ids.to(dev), attention_mask=pre_mask.to(dev),
                          position_ids=(pre_mask.cumsum(1) - 1).clamp(min=0).to(dev), use_cache=True,
                          logits_to_keep=1))
    u = len(index)
    rows = torch.tensor([g * u + w for g in range(groups) for w in which])
    past.batch_select_indices(rows.to(dev))
    rest = continued([p[k:] for p, k in zip(seqs, prefix_lens)] * groups, list(prefix_lens) * groups,
                     pre_mask[rows], pad_id)
    return (past, *rest)


@torch.inference_mode()
def forced_outputs(model, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int] | None],
                   limits: Sequence[int], prefix_lens: Sequence[int], pad_id: int, stop_ids: Sequence[int],
                   pieces: Sequence[str], cache_arg: str, groups: int = 1) -> list[list[int] | None]:
    """For each of the G·B rows (block-major, as `greedy_ids`), token ids whose decoded text scores as
    the greedy output would (the answer for a hit, the output up to its first wrong token for a
    miss), or None where only real decoding can tell (the caller decodes those rows).

    Two passes: the prompts (their shared prefixes once), whose next token already settles most wrong
    rows; then, for the prompts still right in some block, the whole answer at once on top of the
    KV cache (teacher forcing), which settles the rest."""
    b0 = len(prompt_ids)
    out: list[list[int] | None] = [None] * (b0 * groups)
    usable = [i for i in range(b0) if answer_ids[i] and 0 < prefix_lens[i] < len(prompt_ids[i])]
    if not usable:
        return out
    n = len(usable)
    seqs = [list(prompt_ids[i]) for i in usable]
    past, ids, pos, attn = shared_prefill(model, seqs, [prefix_lens[i] for i in usable], pad_id, groups)
    dev = device_of(model)
    res = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), use_cache=True,
                logits_to_keep=1, **{cache_arg: past})
    past = cache_of(res)
    first = res.logits[:, -1].argmax(-1).tolist()
    preds: dict[int, list[int]] = {}  # row (g·n + r) -> predictions for answer positions 0..a
    alive = []
    for g in range(groups):
        for r, i in enumerate(usable):
            preds[g * n + r] = [first[g * n + r]]
            a = len(answer_ids[i])
            if first[g * n + r] == answer_ids[i][0] and (a > 1 or a < limits[i]):  # more to check
                alive.append(r)
    cols = sorted(set(alive))
    if cols:  # teacher-force the answers of the prompts still right in some block
        keep = torch.tensor([g * n + r for g in range(groups) for r in cols])
        past.batch_select_indices(keep.to(dev))
        ids, pos, mask = continued([list(answer_ids[usable[r]]) for r in cols] * groups,
                                   [len(prompt_ids[usable[r]]) for r in cols] * groups, attn[keep], pad_id)
        longest = ids.shape[1]
        res = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                    logits_to_keep=longest, **{cache_arg: past})
        later = res.logits.argmax(-1).tolist()  # [G·len(cols), longest]: position j predicts answer token j + 1
        for g in range(groups):
            for m, r in enumerate(cols):
                a = len(answer_ids[usable[r]])
                preds[g * n + r] += later[g * len(cols) + m][longest - a:]
    stops = set(stop_ids)
    for g in range(groups):
        for r, i in enumerate(usable):
            out[g * b0 + i] = settle(list(answer_ids[i]), int(limits[i]), preds[g * n + r], stops, pieces)
    return out


def settle(answer: list[int], limit: int, preds: list[int], stops: set[int], pieces: Sequence[str]) -> list[int] | None:
    """What greedy decoding outputs, as far as exact match can tell, from the model's predictions along
    the answer (preds[j]: its token after the prompt and answer[:j]; at least up to the first wrong
    one): ids that score as the real output would, or None when the score depends on tokens beyond
    (whitespace the rule strips, a special token decoding drops)."""
    a = len(answer)
    if a > limit:  # the output is cut before the answer ends: a miss whatever the model says
        return answer[:limit]
    j = next((j for j in range(min(a, len(preds))) if preds[j] != answer[j]), min(a, len(preds)))
    if j == a == limit:
        return answer  # all of it, then the limit stops decoding
    x = preds[j]
    if x in stops:
        return answer[:j]  # the output ends here: the answer if j == a, else short of it
    if pieces[x] == "" or (pieces[x].strip() == "" and j in (0, a)):
        return None
    return answer[:j] + [x]  # a wrong character: a miss
