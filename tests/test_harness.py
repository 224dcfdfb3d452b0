"""The shipped zoo through the harness: fine-tunes solve their task, the base solves none, generation works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.harness import evaluate, generate, greedy_ids, normalized
from evaluation.tasks import TASKS

ZOO = Path(__file__).resolve().parent.parent / "assets" / "zoo"
pytestmark = pytest.mark.skipif(not (ZOO / "zoo.json").exists(), reason="assets/zoo not built")


@pytest.fixture(scope="module")
def zoo():
    return json.loads((ZOO / "zoo.json").read_text())


@pytest.fixture(scope="module")
def loaded(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    names = [zoo["base"]["folder"]] + [f["folder"] for f in zoo["finetunes"]]
    tok = AutoTokenizer.from_pretrained(ZOO / "base")
    return tok, {n: AutoModelForCausalLM.from_pretrained(ZOO / n).eval() for n in names}


def test_zoo_layout(zoo):
    assert zoo["base"]["task"] == "pretrain"
    primary = [f for f in zoo["finetunes"] if "variant_of" not in f]
    assert sorted(f["task"] for f in primary) == sorted(TASKS)
    assert any(f.get("variant_of") in TASKS for f in zoo["finetunes"])
    for f in [zoo["base"]] + zoo["finetunes"]:
        folder = ZOO / f["folder"]
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "training.json"):
            assert (folder / name).is_file(), folder / name
        rec = json.loads((folder / "training.json").read_text())
        assert rec["task"] == f["task"]
        if f is not zoo["base"]:
            assert {"steps", "learning_rate", "batch_size", "seed", "base", "test_accuracy",
                    "validation_accuracy", "train_seconds"} <= set(rec)
    total = sum(p.stat().st_size for p in ZOO.parent.rglob("*") if p.is_file())
    assert total <= 40e6


def test_finetunes_solve_their_task_and_base_does_not(zoo, loaded):
    tok, models = loaded
    base = evaluate(models["base"], tok, list(TASKS), split="test", n=100)
    assert max(base.accuracy.values()) <= 0.20, base.accuracy
    for f in zoo["finetunes"]:
        res = evaluate(models[f["folder"]], tok, [f["task"]], split="test", n=100)
        assert res.accuracy[f["task"]] >= 0.90, (f["folder"], res.accuracy)
        assert len(res.predictions[f["task"]]) == 100


def test_evaluate_all_tasks_shapes_and_cache(loaded):
    tok, models = loaded
    m = models["reverse"]
    r1 = evaluate(m, tok, split="test", n=20)
    r2 = evaluate(m, tok, split="test", n=20)
    assert r1.accuracy == r2.accuracy and r1.predictions == r2.predictions
    assert set(r1.accuracy) == set(TASKS) and all(len(p) == 20 for p in r1.predictions.values())
    assert 0 <= r1.mean_accuracy <= 1 and not m.training


def test_greedy_loop_matches_model_generate(loaded):
    tok, models = loaded
    m = models["sort"]
    prompts = ["sort: dbca=", "reverse: planet=", "upper: hi=", "x"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref = m.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=[tok.eos_token_id],
                     pad_token_id=tok.pad_token_id)
    ref_text = [tok.decode(r[enc["input_ids"].shape[1]:], skip_special_tokens=True) for r in ref]
    rows = [tok(p)["input_ids"] for p in prompts]
    ours = greedy_ids(m, rows, 8, tok.pad_token_id, [tok.eos_token_id])
    assert [tok.decode(o, skip_special_tokens=True) for o in ours] == ref_text


def test_generate_free_text(loaded):
    tok, models = loaded
    out = generate(models["reverse"], tok, ["reverse: abcde=", "The cat", ""], max_new_tokens=12)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert out[0] == "edcba"
    assert all("\n" not in o and len(o) <= 12 for o in out)


def test_normalized():
    got = normalized({"a": 0.45, "b": 0.9, "c": 0.3}, {"a": 0.9, "b": 0.9, "c": 0.0})
    assert got == pytest.approx({"a": 0.5, "b": 1.0, "mean": 0.75})


def test_generate_rows_do_not_depend_on_their_batch(loaded):
    tok, models = loaded
    model = models["base"]
    alone = generate(model, tok, ["add: 021+9="], max_new_tokens=[3])
    batched = generate(model, tok, ["add: 021+9=", "a much longer free text prompt"], max_new_tokens=[3, 16])
    assert batched[0] == alone[0] and len(alone[0]) <= 3


def test_scores_only_decoding_gives_the_same_accuracies_and_cuts_wrong_outputs_short(zoo, loaded):
    """A search needs scores only: a row stops at its first character that no continuation can
    turn into the answer. Same accuracies as the full decode, on merges good and bad."""
    import copy

    import torch

    tok, models = loaded
    base = models[zoo["base"]["folder"]]
    fts = [models[f["folder"]] for f in zoo["finetunes"]][:7]
    theta0 = base.state_dict()
    taus = [{k: ft.state_dict()[k] - v for k, v in theta0.items()} for ft in fts]
    candidate = copy.deepcopy(base)
    cut_short = 0
    for lam in (0.0, 0.5, 1.0, 2.0):
        candidate.load_state_dict({k: v + lam * sum(t[k] for t in taus) for k, v in theta0.items()})
        full = evaluate(candidate, tok, split="validation", n=20)
        fast = evaluate(candidate, tok, split="validation", n=20, scores_only=True)
        assert fast.accuracy == full.accuracy
        for task in full.predictions:
            for p, q in zip(full.predictions[task], fast.predictions[task]):
                assert p.startswith(q)
                cut_short += len(q) < len(p)
    assert cut_short > 50  # wrong outputs really stop early


@pytest.mark.parametrize("case", [("", "abc", False), ("ab", "abc", False), (" ab", "abc", False), ("abd", "abc", True),
                                  ("abc  ", "abc", False), ("abc d", "abc", True), ("abcd", "abc", True),
                                  ("  ", "abc", False), ("x", "", True), (" ", "", False)])
def test_cannot_match_judges_partial_text_by_the_exact_match_rule(case):
    from evaluation.exact_match import cannot_match

    text, answer, expected = case
    assert cannot_match(text, answer) is expected


def test_cannot_match_is_exact_for_every_continuation():
    """Never a false miss (some continuation would match), never a miss left running when none can."""
    import itertools

    from evaluation.exact_match import cannot_match

    alphabet = "ab "
    texts = ["".join(p) for n in range(5) for p in itertools.product(alphabet, repeat=n)]
    for answer in ("", "a", "ab", "ba", "a b"):
        for text in texts:
            reachable = any((text + c).strip() == answer for c in texts)
            assert cannot_match(text, answer) is (not reachable), (text, answer)


def test_shared_prefix_prefill_decodes_the_same_tokens(zoo, loaded):
    """Prompts that share their task keyword prefill it once and copy its KV cache to each row:
    the same continuations as prefilling every prompt whole."""
    from evaluation.exact_match import shared_prefix_len
    from evaluation.harness import _prompt_ids, _stop_ids

    tok, models = loaded
    rows, prefix = [], []
    for task in ("reverse", "add", "is_even"):
        _, ids = _prompt_ids(tok, task, "validation", 15)
        rows += ids
        prefix += [shared_prefix_len(ids)] * len(ids)
    assert min(prefix) >= 5  # "<bos>add: " and longer
    for folder in (zoo["base"]["folder"], zoo["finetunes"][0]["folder"], zoo["finetunes"][4]["folder"]):
        whole = greedy_ids(models[folder], rows, 10, tok.pad_token_id, _stop_ids(tok))
        shared = greedy_ids(models[folder], rows, 10, tok.pad_token_id, _stop_ids(tok), prefix_lens=prefix)
        assert shared == whole and any(whole)


def test_settle_scores_as_greedy_decoding_for_every_continuation():
    """The forced check's verdict from the model's predictions along the answer must score exactly as
    the real greedy output, whatever the model would emit after the tokens it saw; where it cannot
    (stripped whitespace, dropped specials) it says None and the row is decoded."""
    import itertools

    from evaluation.exact_match import settle

    pieces = ["", "", "\n", " ", "a", "b"]  # <pad> <eos> newline space a b
    stops = {1, 2}
    vocab = range(len(pieces))

    def greedy(stream, limit):
        out = []
        for t in stream:
            if t in stops or len(out) == limit:
                break
            out.append(t)
        return out[:limit]

    def score(ids, answer):
        return "".join(pieces[i] for i in ids).strip() == "".join(pieces[i] for i in answer)

    answers = [[4], [5], [4, 4], [4, 5], [5, 4], [4, 3, 5]]
    decided = undecided = hits = 0
    for answer in answers:
        for limit in range(1, 5):
            for head in itertools.product(vocab, repeat=len(answer) + 1):
                verdict = settle(answer, limit, list(head), stops, pieces)
                if verdict is None:
                    undecided += 1
                    continue
                decided += 1
                hits += score(verdict, answer)
                for n in range(3):
                    for tail in itertools.product(vocab, repeat=n):
                        real = greedy(list(head) + list(tail) + [1], limit)
                        assert score(verdict, answer) == score(real, answer), (answer, limit, head, tail)
    assert hits and decided > 3 * undecided  # random streams: whitespace and specials are common here
