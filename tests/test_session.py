"""Session logic of the live app on a tiny zoo built by the real recipe (evaluation.zoo, TINY)."""
from __future__ import annotations


import pytest
import torch

from merging.cache import StackCache
from merging.errors import MergeError
from tests.conftest import build_tiny_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_tiny_zoo(tmp_path_factory)


@pytest.fixture()
def session(zoo):
    from evaluation.session import Session

    return Session(cache=StackCache(2 ** 30), zoo=zoo, allow_hub=False).load_zoo()


def test_zoo_defaults_one_finetune_per_task(session):
    from evaluation.tasks import TASKS

    names = [s.name for s in session.selected_specs]
    assert "reverse-long" not in names and "reverse-long" in [s.name for s in session.specs]
    assert session.tasks == list(TASKS)


def test_live_merges_scores_and_fills_the_table(session):
    k = len(session.selected)
    prompts = ["reverse: abc=", "add: 1+2=", "free text here"]
    res = session.live("task_arithmetic", [1.0] * k, 0.3, {}, prompts)
    assert res.headers == ["prompt", "expected", "base", *[s.name for s in session.selected_specs], "merged"]
    assert [r[0] for r in res.rows] == prompts
    from evaluation.tasks import TASKS

    assert res.rows[0][1] == "cba" and res.rows[1][1] == TASKS["add"].solve("1+2") and res.rows[2][1] == ""
    assert all(c[:1] in "✓✗" for c in res.rows[0][2:])  # marked where the answer is known
    assert set(res.accuracy) == {"base", "fine-tuned (own task)", "merged"}
    assert set(res.accuracy["merged"]) == set(session.tasks)
    # merging one fine-tune alone with w = λ = 1 reproduces that fine-tune exactly
    session.select([0])
    one = session.live("task_arithmetic", [1.0], 1.0, {}, prompts)
    assert [r[-1] for r in one.rows] == [r[3] for r in one.rows]


def test_fine_tune_scores_are_cached_once(session):
    session.live("task_arithmetic", [1.0] * len(session.selected), 1.0, {}, [])
    before = len(session.scorer.accuracies)
    session.live("fedgma", [0.5] * len(session.selected), 0.7, {"rho": 0.3}, [])
    assert len(session.scorer.accuracies) == before


def test_reference_scores_leave_the_users_merge_alone(session):
    """The base's and the fine-tunes' scores are computed on a scratch model: the user's merged
    model keeps every parameter and its settings (no re-merge afterwards)."""
    from merging.cache import BytesLRU

    from evaluation.scorer import Scorer

    k = len(session.selected)
    session.apply("fedgma", [1.0, 0.5] + [1.0] * (k - 2), 0.8, {"rho": 0.4})
    before = {n: p.detach().clone() for n, p in session.live_model.targets.items()}
    settings, model = session.settings, session.live_model.model
    # a scorer whose caches are empty: every reference is computed here
    scorer = Scorer(session.pool, BytesLRU(2 ** 20, lambda k, v: 100), BytesLRU(2 ** 20, lambda k, v: 100))
    scorer.prepare(["base", *session.selected], session.tasks, ["reverse: abc=", "free text"])
    assert len(scorer.accuracies) == (k + 1) * len(session.tasks) and len(scorer.outputs_cache) == 2 * (k + 1)
    session.scorer = scorer  # and the session's own path: the live view computing a new prompt's references
    session.prepare_references(["upper: ab="])
    assert session.settings is settings and session.live_model.model is model
    assert all(torch.equal(before[n], p) for n, p in session.live_model.targets.items())
    # the references are the models they name: a fine-tune alone merged with w = λ = 1 answers the same
    session.select([0])
    session.apply("task_arithmetic", [1.0], 1.0)
    from evaluation.harness import generate
    from evaluation.prompts import max_new_tokens

    prompts = ["reverse: abc=", "free text"]
    assert scorer.outputs(0, prompts) == generate(session.live_model.model, session.tokenizer, prompts,
                                                  max_new_tokens(prompts))


def test_live_merge_settings_are_numbers(session):
    from evaluation.live_merge import MergeSettings

    k = len(session.selected)
    assert session.settings is None
    session.live("fedgma", ["1", 0.5] + [1] * (k - 2), "0.8", {"rho": 0.4}, [])  # as a form would send them
    s = session.settings
    assert isinstance(s, MergeSettings) and s.method == "fedgma"
    assert s.lam == 0.8 and type(s.lam) is float and s.hyper == {"rho": 0.4}
    assert s.weights == (1.0, 0.5) + (1.0,) * (k - 2) and all(type(w) is float for w in s.weights)
    assert s.select == tuple(session.selected) and all(type(i) is int for i in s.select)
    assert s.describe() == "λ=0.8, rho=0.4"  # formatted for display only


def test_scorer_cache_is_bounded(session):
    """Reference answers are cached under a byte budget: a crowd typing new prompts evicts the
    oldest, and an evicted answer is computed again, the same."""
    from merging.cache import BytesLRU

    from evaluation.scorer import Scorer, _entry_bytes

    outputs = BytesLRU(3000, _entry_bytes)
    scorer = Scorer(session.pool, BytesLRU(3000, _entry_bytes), outputs)
    first = scorer.outputs("base", ["0 reverse: abc="])
    for j in range(1, 40):  # distinct prompts
        scorer.outputs("base", [f"{j} " + "y" * 30])
        assert outputs.used <= outputs.budget
    assert outputs.evictions > 0 and len(outputs) < 40
    assert outputs.get((str(session.base_ref), "base", "0 reverse: abc=")) is None
    assert scorer.outputs("base", ["0 reverse: abc="]) == first


def test_bad_settings_refused_and_model_unchanged(session):
    k = len(session.selected)
    session.apply("task_arithmetic", [1.0] * k, 0.5)
    snap = {n: p.detach().clone() for n, p in session.live_model.targets.items()}
    with pytest.raises(MergeError, match="rho"):
        session.apply("fedgma", [1.0] * k, 1.0, {"rho": 7.0})
    with pytest.raises(MergeError):
        session.apply("task_arithmetic", [1.0] * k, float("nan"))
    assert all(torch.equal(snap[n], p) for n, p in session.live_model.targets.items())
    session.select([])
    with pytest.raises(MergeError, match="at least one"):
        session.apply("task_arithmetic", [], 1.0)


def test_sessions_share_the_stack_not_the_model(zoo):
    from evaluation.session import Session

    cache = StackCache(2 ** 30)
    a = Session(cache=cache, zoo=zoo, allow_hub=False).load_zoo()
    b = Session(cache=cache, zoo=zoo, allow_hub=False).load_zoo()
    assert a.stack is b.stack and cache.hits == 1 and cache.misses == 1
    assert a.live_model.model is not b.live_model.model
    a.apply("task_arithmetic", [2.0] * len(a.selected), 1.0)
    b.apply("task_arithmetic", [0.0] * len(b.selected), 1.0)
    name = a.stack.names[0]
    assert not torch.equal(a.live_model.targets[name], b.live_model.targets[name])
    assert torch.equal(b.live_model.targets[name], a.stack.base[name])
    a.close()
    assert a.live_model is None and b.live_model is not None


def test_cache_refuses_over_budget_before_loading(zoo):
    from evaluation.session import Session

    s = Session(cache=StackCache(budget_bytes=1000), zoo=zoo, allow_hub=False)
    with pytest.raises(MergeError, match="budget"):
        s.load_zoo()


def test_cache_evicts_least_recently_used(zoo):
    from evaluation.session import read_zoo

    base, specs = read_zoo(zoo)
    probe = StackCache(2 ** 30)
    one = probe.get_stack(base, [specs[0].ref])
    cache = StackCache(int(one.nbytes * 2.5))
    cache.get_stack(base, [specs[0].ref])
    cache.get_stack(base, [specs[1].ref])
    cache.get_stack(base, [specs[2].ref])
    assert len(cache.keys()) == 2 and all(specs[0].ref not in k for k in cache.keys())


def test_local_folders_outside_the_allow_list_are_refused(session, tmp_path):
    with pytest.raises(MergeError, match="allowed"):
        session.add_model(str(tmp_path))


def test_incompatible_model_is_refused_by_name(zoo, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from evaluation.session import Session

    odd = tmp_path / "odd-shape"
    GPT2LMHeadModel(GPT2Config(vocab_size=70, n_embd=8, n_layer=1, n_head=2, n_positions=64)).save_pretrained(odd)
    monkeypatch.setenv("FEDMERGE_ALLOWED_DIRS", str(tmp_path))
    s = Session(cache=StackCache(2 ** 30), zoo=zoo, allow_hub=False).load_zoo()
    before = [x.name for x in s.specs]
    with pytest.raises(MergeError, match="odd-shape"):
        s.add_model(str(odd))
    assert [x.name for x in s.specs] == before  # the session is unchanged and still works
    s.live("task_arithmetic", [1.0] * len(s.selected), 1.0, {}, [])
    # an allowed, compatible folder is accepted, with its task from training.json
    spec = s.add_model(str(zoo / "reverse-long"), name="extra")
    assert spec.task == "reverse" and s.selected_specs[-1].name == "extra"


def test_similarity_has_a_merged_row(session):
    k = len(session.selected)
    assert len(session.similarity_live().names) == k  # nothing merged yet
    # linear merges (from the Gram matrix, no pass) and non-linear ones (one pass over the model)
    for method, hyper in [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("median", {})]:
        session.apply(method, [1.0, -0.5, 2.0][:k] + [1.0] * (k - 3), 0.7, hyper)
        rep = session.similarity_live()
        assert rep.names[-1] == "merged" and rep.cosine.shape == (k + 1, k + 1)
        full = session.similarity(with_merged=True)
        assert abs(full.cosine[-1, :-1] - rep.cosine[-1, :-1]).max() < 1e-5, method
        assert abs(full.norms[-1] - rep.norms[-1]) < 1e-4 * full.norms[-1], method


def test_export_yaml_and_merged_folder_match_the_live_model(session, tmp_path):
    from transformers import AutoModelForCausalLM

    from evaluation.harness import generate
    from merging.config import parse_config

    k = len(session.selected)
    session.apply("fedgma", [1.0] * k, 0.8, {"rho": 0.4})
    text = session.export_config().to_yaml()
    cfg = parse_config(__import__("yaml").safe_load(text))
    assert cfg.merge_method == "fedgma" and cfg.parameters["rho"] == 0.4 and len(cfg.models) == k
    out = session.write_merged(tmp_path / "merged")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists() and list(out.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for n, p in session.live_model.targets.items():
        assert torch.allclose(dict(model.named_parameters())[n], p, atol=1e-6), n
    prompts = ["reverse: abc=", "upper: xy="]
    assert generate(model, session.tokenizer, prompts, 8) == generate(session.live_model.model, session.tokenizer, prompts, 8)


def test_a_new_export_replaces_the_sessions_previous_one(session, tmp_path, monkeypatch):
    """A session's zip (or YAML) replaces its previous one: the page offers only the newest, and the old ones
    held the server's export space until their TTL (here room for one zip at a time: the second press was
    refused, "the server's space for downloads is full")."""
    from evaluation.exports import ExportStore

    session.exports = ExportStore(tmp_path / "exports")
    session.apply("task_arithmetic", [1.0] * len(session.selected), 1.0)
    zips = [session.export_zip()]
    room = session.export_bytes() + zips[0].stat().st_size // 2  # one export's peak, not one more zip besides
    monkeypatch.setenv("FEDMERGE_EXPORT_GB", str(room / 2 ** 30))
    zips += [session.export_zip() for _ in range(3)]
    assert [z.exists() for z in zips] == [False, False, False, True]
    yamls = [session.export_yaml()[0] for _ in range(3)]
    assert [y.exists() for y in yamls] == [False, False, True] and zips[-1].exists()
    session.close()
    assert not zips[-1].exists() and not yamls[-1].exists()


def test_push_offline_says_the_hub_cannot_be_reached(session, monkeypatch):
    from evaluation.session import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    session.apply("task_arithmetic", [1.0] * len(session.selected), 1.0)
    with pytest.raises(MergeError, match="cannot reach the Hugging Face Hub") as err:
        push_to_hub(session, "me/merged", "hf_secret_token")
    assert "hf_secret_token" not in str(err.value)


def test_a_prompt_shared_by_two_tasks_names_both_answers():
    """sort and sort_desc share the keyword `sort` (the zoo's designed conflict): the table shows
    both answers, either counts as right, and the default prompts list the shared prompt once."""
    from evaluation.prompts import default_prompts, expected_answer, mark

    shown, right = expected_answer("sort: dbca=")
    assert shown == "abcd (sort) / dcba (sort_desc)" and right == ["abcd", "dcba"]
    assert mark("dcba", right).startswith("✓") and mark("abdc", right).startswith("✗")
    assert expected_answer("reverse: abc=") == ("cba", ["cba"]) and expected_answer("hello") == (None, [])
    prompts = default_prompts(["sort", "sort_desc", "upper"])
    assert len(prompts) == len(set(prompts)) == 2
