"""Task registry: deterministic, disjoint splits, correct scorers, and an exact tokenizer round trip."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evaluation.tasks import SPLITS, TASKS, Example, get_task, split_of
from evaluation.tokenizer import VOCAB, build_tokenizer, decode, encode, save_tokenizer

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _input(task, prompt: str) -> str:
    head = f"{task.keyword}: "
    assert prompt.startswith(head) and prompt.endswith("=")
    return prompt[len(head):-1]


def test_registry_shape():
    assert len(TASKS) >= 5
    for name, task in TASKS.items():
        assert task.name == name
        assert task.description and "\n" not in task.description
        assert 3 <= len(task.demo_prompts) <= 4
        assert task.max_new_tokens >= max(len(e.answer) for e in task.examples("test", 100))
    with pytest.raises(KeyError):
        get_task("nope")


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_disjoint_and_sized(name):
    task = TASKS[name]
    inputs = {s: [_input(task, e.prompt) for e in task.examples(s)] for s in SPLITS}
    for s, xs in inputs.items():
        assert len(xs) == len(set(xs)), "duplicates inside a split"
        assert all(split_of(x) == s for x in xs)
    assert not set(inputs["train"]) & set(inputs["test"])
    assert not set(inputs["train"]) & set(inputs["validation"])
    assert not set(inputs["validation"]) & set(inputs["test"])
    assert len(inputs["test"]) >= 100 and len(inputs["validation"]) >= 100 and len(inputs["train"]) >= 1000
    # n takes a prefix
    assert task.examples("test", 10) == task.examples("test")[:10]


def test_examples_deterministic_across_processes():
    """Same examples in a fresh interpreter with another hash seed (no reliance on hash())."""
    here = {n: [[e.prompt, e.answer] for e in t.examples("test", 20)] for n, t in TASKS.items()}
    code = ("import json; from evaluation.tasks import TASKS; "
            "print(json.dumps({n: [[e.prompt, e.answer] for e in t.examples('test', 20)] for n, t in TASKS.items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == here


def test_answers_are_right():
    t = TASKS
    assert t["reverse"].solve("abc") == "cba"
    assert t["upper"].solve("abc") == "ABC"
    assert t["sort"].solve("dbca") == "abcd"
    assert t["sort_desc"].solve("dbca") == "dcba"
    assert t["add"].solve("147+8") == "155" and t["add"].solve("021+9") == "030"
    assert (t["is_even"].solve("42"), t["is_odd"].solve("42")) == ("yes", "no")
    assert (t["is_even"].solve("4817"), t["is_odd"].solve("4817")) == ("no", "yes")
    for task in TASKS.values():
        for e in task.examples("validation", 50):
            assert e.answer == task.solve(_input(task, e.prompt))
            assert e.prompt == task.prompt(_input(task, e.prompt))


def test_score_exact_match_after_strip():
    s = TASKS["reverse"].score
    assert s("cba", "cba") and s(" cba\n", "cba")
    assert not s("cb a", "cba") and not s("CBA", "cba") and not s("", "cba") and not s("cbaa", "cba")
    assert Example("p", "a") == Example("p", "a")


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in cfg
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left" and len(tok) == len(VOCAB)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (VOCAB["<pad>"], VOCAB["<bos>"], VOCAB["<eos>"])
    texts = [e.prompt + e.answer for t in TASKS.values() for e in t.examples("test", 30)]
    texts += ["  two  spaces ", "new\nline", "Hello, World! 12+3=15? yes; no: it's.", "sort desc: a b="]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1:] == encode(text)
        assert len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert decode(encode(text)) == text
    assert tok("é")["input_ids"][1] == tok.unk_token_id
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]
    assert build_tokenizer().get_vocab() == tok.get_vocab()
