"""Two users loading the same selection at once share one task-vector stack (merging.cache.StackCache),
through the cache itself and through evaluation.Session; both get correct values and no error."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from merging import Checkpoint
from merging.cache import StackCache
from tests.conftest import perturbed, save_model, tiny_config


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and two fine-tunes of a tiny GPT-2 with the playground's character tokenizer."""
    from transformers import GPT2LMHeadModel

    from evaluation.tokenizer import VOCAB, save_tokenizer

    root = tmp_path_factory.mktemp("sharedzoo")
    torch.manual_seed(2)
    base = GPT2LMHeadModel(tiny_config(vocab=len(VOCAB))).eval()
    paths = {"base": save_model(base, root / "base")}
    for i in range(2):
        paths[f"ft{i}"] = save_model(perturbed(base, seed=40 + i), root / f"ft{i}")
    for p in paths.values():
        save_tokenizer(p)
    paths["root"] = root
    return paths


def run_together(fn, n: int) -> list:
    """fn(i) on n threads released at the same instant; their results, or the first exception raised."""
    gate = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def one(i):
        try:
            gate.wait()
            results[i] = fn(i)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def slow_progress(calls: list):
    """A progress callback that holds the loading thread a moment, so the others arrive while it loads."""
    def progress(fraction, text):
        calls.append(threading.get_ident())
        if len(calls) == 1:
            time.sleep(0.3)
    return progress


def expected_deltas(zoo) -> dict[str, torch.Tensor]:
    base = Checkpoint(zoo["base"])
    fts = [Checkpoint(zoo[f"ft{i}"]) for i in range(2)]
    return {k: torch.stack([ft.get(k).float() - base.get(k).float() for ft in fts])
            for k in base.keys() if base.is_float(k)}


def test_concurrent_get_stack_loads_once_and_shares_it(zoo):
    cache = StackCache(2 ** 30)
    calls: list = []
    refs = [str(zoo["ft0"]), str(zoo["ft1"])]
    stacks = run_together(lambda i: cache.get_stack(str(zoo["base"]), refs, ["a", "b"],
                                                    progress=slow_progress(calls)), 4)
    assert all(s is stacks[0] for s in stacks)
    assert cache.misses == 1 and cache.hits == 3 and len(cache.keys()) == 1
    assert len(set(calls)) == 1  # one thread read the checkpoints; the others waited for it
    want = expected_deltas(zoo)
    assert set(stacks[0].names) == set(want)
    for k, d in want.items():
        assert torch.equal(stacks[0].deltas[k], d), k


def test_two_sessions_loading_one_selection_share_the_stack(zoo):
    from evaluation.session import ModelSpec, Session

    cache = StackCache(2 ** 30)
    specs = [ModelSpec("a", str(zoo["ft0"])), ModelSpec("b", str(zoo["ft1"]))]
    sessions = [Session(cache=cache, zoo=zoo["root"], allow_hub=False) for _ in range(2)]
    calls: list = []
    run_together(lambda i: sessions[i].set_models(str(zoo["base"]), specs, progress=slow_progress(calls)), 2)
    a, b = sessions
    assert a.stack is b.stack and cache.misses == 1 and cache.hits == 1
    assert a.live_model.model is not b.live_model.model  # each user merges into a model of its own
    # both merge at once, with different settings: each model holds its own merge, exactly
    settings = [([1.0, 0.0], 1.0), ([0.5, 1.0], 0.6)]
    run_together(lambda i: sessions[i].apply("task_arithmetic", *settings[i]), 2)
    base = Checkpoint(zoo["base"])
    want = expected_deltas(zoo)
    for s, (w, lam) in zip(sessions, settings):
        for k, d in want.items():
            expected = base.get(k).float() + lam * (w[0] * d[0] + w[1] * d[1])
            torch.testing.assert_close(s.live_model.targets[k].detach(), expected, rtol=0, atol=1e-6, msg=k)
