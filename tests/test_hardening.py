"""A public deployment: bounded inputs, clear one-line messages, no server paths, exports and
sessions freed. Each test drives the real app (in this process, on 127.0.0.1) through gradio_client
or the real Session / merge engine, and asserts the message or the bound."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def assert_clean(msg: str, *paths) -> None:
    """One line, no traceback, errno, exception repr or absolute server path."""
    assert "\n" not in msg.strip() or msg.count("\n") <= 2
    for bad in ("Traceback", "Errno", "IndexError", "OSError", "KeyError", "ValueError", str(ROOT)):
        assert bad not in msg, (bad, msg)
    for p in paths:
        assert str(p) not in msg, (p, msg)


def _path(x) -> Path:
    return Path(x["path"] if isinstance(x, dict) else x)


def live(c, **kwargs):
    """The /live endpoint (named arguments): html, accuracy, heatmap, status, data."""
    from evaluation.playground import live_kwargs

    return c.predict(**live_kwargs(**kwargs), api_name="/live")


def add_error(c, ref: str, name: str = "") -> str:
    """The Models tab's refusal of /on_add: one line in its message box, nothing else changes."""
    *_, msg = c.predict(ref, name, "(none)", api_name="/on_add")
    assert msg.startswith("⚠️ "), msg
    return msg.removeprefix("⚠️ ")


def app_error(fn, *args, **kwargs) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.fixture(scope="module")
def zoo_root(app_url):
    import os

    return Path(os.environ["FEDMERGE_ZOO"]).resolve()


# ---------------------------------------------------------------------------- prompts

def test_long_prompt_is_cut_to_the_context_with_a_note(app_url):
    long = "the quick brown fox jumps over the lazy dog " * 3  # 132 characters, the zoo reads 64 tokens
    _, _, _, status, data = live(client(app_url), weights=[1.0] * 7, prompts=f"reverse: abc=\n{long}")
    assert "⚠️" not in status and "prompt 2 cut to its last" in status and "64 tokens" in status
    shown = data["rows"][1][0]
    assert len(shown) < len(long.strip()) and long.strip().endswith(shown)
    assert data["rows"][0][1] == "cba"  # the other prompt untouched


def test_prompt_count_and_length_are_bounded_before_any_work(app_url):
    c = client(app_url)
    *_, status, data = live(c, weights=[1.0] * 7, prompts="\n".join(["hi"] * 5000))
    assert status.startswith("⚠️ prompts: 5000 lines; at most 16 prompts") and data is None
    *_, status, _ = live(c, weights=[1.0] * 7, prompts="x" * 300)
    assert "prompts: line 1 has 300 characters; at most 200" in status
    assert_clean(status)


def test_prompt_limits_follow_the_environment(app_url, monkeypatch):
    monkeypatch.setenv("FEDMERGE_MAX_PROMPTS", "2")
    *_, status, _ = live(client(app_url), weights=[1.0] * 7, prompts="a\nb\nc")
    assert "at most 2 prompts" in status


# ---------------------------------------------------------------------------- models and paths

def test_overlong_path_refused_unread_with_a_clear_message(app_url):
    msg = add_error(client(app_url), "/" + "x" * 1000)
    assert msg == "model: 1001 characters; at most 512"
    assert_clean(msg)


def test_path_checks_before_the_disk_in_the_library():
    from merging.checkpoints import resolve
    from merging.errors import MergeError

    with pytest.raises(MergeError, match="not a valid model path or Hub id"):
        resolve("/" + "x" * 1000, allowed_roots=[ROOT / "assets"])  # was: [Errno 36] File name too long
    with pytest.raises(MergeError, match="outside the allowed folders"):
        resolve(str(ROOT / "assets" / ".." / "app.py"), allowed_roots=[ROOT / "assets"])


def test_a_path_under_a_typed_folder_keeps_its_slash():
    """A message about a file inside the folder the user typed shows the folder as typed, then /file."""
    from evaluation.limits import user_message
    from merging.errors import MergeError

    typed = "/srv/models/badcfg"
    text = user_message(MergeError(f"{typed}/config.json: not valid JSON (line 1)"), typed=[typed])
    assert text == "/srv/models/badcfg/config.json: not valid JSON (line 1)"  # was: …badcfgconfig.json
    assert user_message(MergeError("/srv/other/x.bin: refused")) == "x.bin: refused"  # not typed: the name only


def test_the_shipped_zoo_is_shown_repository_relative_from_any_directory(tmp_path, monkeypatch):
    """An exported YAML names zoo models as `assets/zoo/…`, re-runnable from the repository, wherever the
    server was started (it said `zoo/base` when started elsewhere)."""
    from evaluation.session import Session
    from merging.cache import StackCache

    monkeypatch.chdir(tmp_path)
    s = Session(cache=StackCache(2 ** 30), zoo=ROOT / "assets" / "zoo", allow_hub=False).load_zoo()
    s.select(["upper", "add"])
    s.apply("task_arithmetic", [1.0, 1.0], 1.0)
    text = s.export_config().to_yaml()
    assert "model: assets/zoo/upper" in text and "base_model: assets/zoo/base" in text, text
    s.close()


def test_paths_outside_the_allow_list_are_refused_lexically(app_url, tmp_path):
    c = client(app_url)
    secret = tmp_path / "secret-model"
    secret.mkdir()
    for ref in ("/etc/passwd", str(secret), "../../../../etc", str(tmp_path / "no-such-folder")):
        msg = add_error(c, ref)
        # the same answer whether or not the path exists: nothing outside was looked at
        assert msg == f"{ref}: local paths outside the allowed folders are not accepted here"  # as typed


def test_zoo_paths_in_messages_are_relative_to_the_zoo(app_url, zoo_root):
    import os

    c = client(app_url)
    for ref in (os.path.relpath(zoo_root / "zoo.json"), os.path.relpath(zoo_root)):  # typed relative
        msg = add_error(c, ref)
        assert_clean(msg, zoo_root)  # was: the server's absolute install path
        assert msg.startswith((ref, "zoo: ", "zoo/zoo.json: ")) and ("no weights found" in msg or "unsupported weight file" in msg)


def test_models_per_session_bounded(app_url, zoo_root, monkeypatch):
    monkeypatch.setenv("FEDMERGE_MAX_MODELS", "8")  # the tiny zoo has 8 fine-tunes already
    # (the base folder: not listed as a fine-tune yet, so only the cap can refuse it)
    msg = add_error(client(app_url), str(zoo_root / "base"), "again")
    assert "this session already has 8 models, at most 8" in msg


# ---------------------------------------------------------------------------- early validation

def test_bad_numbers_refused_before_any_work(app_url):
    from evaluation.limits import LAMBDA_RANGE

    c = client(app_url)
    *_, status, data = live(c, weights=[1.0] * 7)
    assert data is not None
    # out-of-range weights and λ, unknown aggregators and hyperparameters: one line naming the bound, no merge
    top = LAMBDA_RANGE[1]
    for kwargs, want in ((dict(weights=[1.0, 1e9] + [1.0] * 5), "is not a number between -1 and 2"),
                         (dict(lam=top + 1, weights=[1.0] * 7), f"λ: {top + 1:g}"),
                         (dict(method="no-such-method", weights=[1.0] * 7), "'no-such-method'"),
                         (dict(method="fedgma", weights=[1.0] * 7, hyper={"rho": 3.0}), "fedgma: rho")):
        *_, status, data = live(c, **kwargs)
        assert status.startswith("⚠️ ") and want in status and data is None, (kwargs, status)
        assert_clean(status)
    assert f"between 0 and {top:g}" in live(c, lam=top + 1, weights=[1.0] * 7)[3]
    # a long job with nothing to do is refused up front, not after a search
    t0 = time.perf_counter()
    _, md = c.predict([], api_name="/heterogeneity")
    assert "choose at least one aggregator" in md and time.perf_counter() - t0 < 20
    assert_clean(md)


def test_bad_selection_is_an_error_for_api_callers(app_url):
    c = client(app_url)
    *_, status, data = live(c, selection=["upper", "not-a-model"], weights=[1.0, 1.0])
    assert "models: unknown model 'not-a-model'" in status and data is None
    *_, status, data = live(c, selection=[], weights=[1.0] * 99)  # more weights than models
    assert status.startswith("⚠️ weights: 99 given for") and data is None


def test_nan_weight_refused_by_the_session(tmp_path_factory):
    from evaluation.session import Session
    from merging.cache import StackCache
    from merging.errors import MergeError
    from tests.conftest import build_tiny_zoo

    s = Session(cache=StackCache(2 ** 30), zoo=build_tiny_zoo(tmp_path_factory), allow_hub=False).load_zoo()
    s.select([0, 1])
    with pytest.raises(MergeError, match=r"weight of \w+: nan is not a number between -1 and 2"):
        s.check_request("task_arithmetic", [1.0, math.nan], 1.0, {})
    with pytest.raises(MergeError, match="fedgma: rho"):
        s.check_request("fedgma", [1.0, 1.0], 1.0, {"rho": 3.0})


# ---------------------------------------------------------------------------- exports and sessions

def test_exports_live_in_the_session_folder_and_go_with_the_session(app_url, zoo_root):
    import zipfile

    from evaluation.exports import EXPORTS

    c = client(app_url)
    live(c, lam=0.5, weights=[1.0] * 7)
    zipped = _path(c.predict(api_name="/zip"))
    yml, text = c.predict(api_name="/yaml")
    yml = _path(yml)
    card = zipfile.ZipFile(zipped).read("README.md").decode()
    assert "merge_config.yml" in zipfile.ZipFile(zipped).namelist() and "## Live scores" in card  # the app's card
    assert card.endswith(".\n") and not card.endswith("\n\n")  # one final newline
    # the model references, without the server's install path
    assert str(zoo_root) not in text and "model: zoo/reverse" in text and "base_model: zoo/base" in text
    assert str(zoo_root) not in card and "base model: `zoo/base`" in card
    root = EXPORTS.root
    assert zipped.is_relative_to(root) and yml.is_relative_to(root)
    session_dir = root / zipped.relative_to(root).parts[0]
    assert yml.is_relative_to(session_dir)
    # the zip only: the merged folder it was built from is gone
    assert sorted(p.name for p in zipped.parent.iterdir()) == ["merged-model.zip"]
    c.close()  # the client disconnects: its session and exports are freed (Gradio's unload)
    deadline = time.time() + 30
    while session_dir.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not session_dir.exists()


def test_export_cap_refuses_and_leaves_nothing(app_url, monkeypatch):
    from evaluation.exports import EXPORTS

    c = client(app_url)
    live(c, weights=[1.0] * 7)
    before = EXPORTS.used()
    monkeypatch.setenv("FEDMERGE_EXPORT_GB", "0.000001")
    msg = app_error(c.predict, api_name="/zip")
    assert "exports: the server's space for downloads is full" in msg
    assert EXPORTS.used() == before


def test_failed_export_and_ttl_leave_nothing(tmp_path, monkeypatch):
    from evaluation.exports import ExportStore
    from merging.errors import MergeError

    store = ExportStore(tmp_path / "exports")
    with pytest.raises(MergeError):
        with store.export("s1") as folder:
            (folder / "half.safetensors").write_bytes(b"x" * 1000)
            raise MergeError("failed midway")
    assert store.used() == 0 and not any((tmp_path / "exports" / "s1").glob("*"))
    with store.export("s2") as folder:
        (folder / "model.zip").write_bytes(b"x" * 1000)
    assert store.used() == 1000
    time.sleep(1.1)
    assert store.sweep(ttl=1) == 1 and store.used() == 0


def test_session_long_jobs_bounded(tmp_path_factory):
    from evaluation.session import Session
    from merging.cache import StackCache
    from merging.errors import MergeError
    from tests.conftest import build_tiny_zoo

    s = Session(cache=StackCache(2 ** 30), zoo=build_tiny_zoo(tmp_path_factory), allow_hub=False).load_zoo()
    with s.job("auto-tune"):
        with pytest.raises(MergeError, match="already runs 1 long job"):
            with s.job("compare all"):
                pass
    with s.job("compare all"):  # the slot came back
        pass
    s.close()
    assert s.live_model is None and s.stack is None


# ---------------------------------------------------------------------------- caches and threads

def test_reference_caches_are_bounded_by_bytes(tmp_path_factory):
    import evaluation.session as sm
    from merging.cache import BytesLRU, StackCache
    from tests.conftest import build_tiny_zoo

    lru = BytesLRU(1000, lambda k, v: len(k) + len(v))
    for i in range(100):
        lru.put(f"key{i:03d}", "v" * 50)
    assert lru.used <= 1000 and len(lru) == 1000 // 56 and lru.get("key099") and lru.get("key000") is None

    s = sm.Session(cache=StackCache(2 ** 30), zoo=build_tiny_zoo(tmp_path_factory), allow_hub=False).load_zoo()
    s.select([0])
    budget = s.scorer.outputs_cache.budget
    for j in range(40):  # distinct prompts, as a crowd would type them
        s.scorer.outputs("base", [f"{j} " + "y" * 30])
    assert s.scorer.outputs_cache.used <= budget


def test_disk_merge_leaves_torch_threads_alone(tiny_zoo, tmp_path):
    from merging.engine import merge_to_dir
    from merging.plan import plan_from_objects
    from merging.checkpoints import Checkpoint
    from merging.task_vectors import load_source

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        plan = plan_from_objects(Checkpoint(tiny_zoo["base"]), [load_source(tiny_zoo["ft0"]), load_source(tiny_zoo["ft1"])],
                                 "ties", [1.0, 1.0], 1.0, {"density": 0.5})
        merge_to_dir(plan, tmp_path / "out", progress=lambda f, name: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cclip_with_a_zero_task_vector_and_compare_all_carries_on(tmp_path_factory):
    from evaluation.search import compare_all, hyper_grid, search
    from evaluation.session import Session
    from merging.cache import StackCache
    from tests.conftest import build_tiny_zoo

    assert all(g["rho"] > 0 for g in hyper_grid("cclip", norms=[0.0, 1.0, 3.0]))
    s = Session(cache=StackCache(2 ** 30), zoo=build_tiny_zoo(tmp_path_factory), allow_hub=False).load_zoo()
    s.select([0, 1, 2])
    r = search(s, "cclip", weights=[1, 0, 1], lambdas=[0.5, 1.0], n_val=3, n_test=3)
    assert r.best_hyper["rho"] > 0
    results = compare_all(s, methods=["task_arithmetic", "cclip"], weights=[1, 0, 1], n_val=3, n_test=3)
    assert [x.method for x in results] == ["task_arithmetic", "cclip"]

    # a method that cannot run on this selection is reported and the others still run
    from merging.errors import MergeError
    from merging.registry import AGGREGATORS, aggregator

    @aggregator("refuses_zero", "test only")
    def refuses(deltas, weights):
        raise MergeError("needs positive weights")

    try:
        failed: list = []
        results = compare_all(s, methods=["refuses_zero", "task_arithmetic"], weights=[1, 0, 1], n_val=3,
                              n_test=3, failed=failed)
    finally:
        AGGREGATORS.remove("refuses_zero")
    assert [x.method for x in results] == ["task_arithmetic"]
    assert failed[0][0] == "refuses_zero" and "needs positive weights" in failed[0][1]
