"""`python -m evaluation heterogeneity|task-count|compare` pushed as a researcher would push it: empty
lists, methods that cannot merge the groups a command merges, odd zoos, SIGTERM and Ctrl-C mid-run,
report files written twice or over a symlink, --help against the code. Each case was found broken."""
from __future__ import annotations

import argparse
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

ZOO = ROOT / "assets" / "zoo"


def subset_zoo(root: Path, names: list[str], edit=None) -> Path:
    """The shipped base and the fine-tunes `names` (no variant unless named), as a zoo of their own."""
    index = json.loads((ZOO / "zoo.json").read_text())
    root.mkdir(parents=True)
    shutil.copytree(ZOO / index["base"]["folder"], root / index["base"]["folder"])
    index["finetunes"] = [e for e in index["finetunes"] if e["name"] in names]
    for e in index["finetunes"]:
        shutil.copytree(ZOO / e["folder"], root / e["folder"])
    (root / "zoo.json").write_text(json.dumps(index))
    return root


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from evaluation.__main__ import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_an_empty_list_is_refused_not_read_as_the_default(tmp_path, capsys):
    """`--models ""` ran the default selection (seven fine-tunes) and `--sizes ""` every size."""
    one = subset_zoo(tmp_path / "zoo", ["upper"])
    out = str(tmp_path / "out")
    for args, want in ((["heterogeneity", "--models", ""], "error: --models: comma-separated names, not ''"),
                       (["task-count", "--sizes", ""], "error: --sizes: comma-separated whole numbers, not ''")):
        assert run_main(capsys, *args, "--zoo", str(one), "--out", out)[::2] == (2, want)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, want", [
    (["heterogeneity", "--models", "reverse,upper,sort,add", "--methods", "task_arithmetic,slerp"],
     "error: --methods: slerp merges 1 to 2 models; heterogeneity merges 2 to 3 at once: leave it out"),
    (["task-count", "--methods", "slerp"],
     "error: --methods: slerp merges 1 to 2 models; task-count merges 2 to 7 at once: leave it out"),
    (["compare", "--methods", "passthrough,median,slerp"],
     "error: --methods: passthrough merges 1 model, slerp merges 1 to 2 models; compare merges 7 at once: "
     "leave them out"),
])
def test_a_method_that_cannot_merge_the_groups_is_refused_before_loading(tmp_path, capsys, args, want):
    """heterogeneity stopped at the first leave-one-out group (the pairs' work lost), task-count after
    loading the zoo, and compare ran all 18 methods when none named could merge seven models."""
    code, out, err = run_main(capsys, *args, "--n-val", "1", "--n-test", "1", "--out", str(tmp_path / "o"))
    assert (code, err) == (2, want)
    assert "Loading" not in out + err and not (tmp_path / "o").exists()


def test_the_study_refuses_such_a_method_before_scoring_anything():
    from evaluation import heterogeneity
    from evaluation.session import Session
    from merging.errors import MergeError

    session = Session(zoo=ZOO, allow_hub=False).load_zoo()
    try:
        session.select([0, 1, 2, 3])
        seen: list[str] = []
        with pytest.raises(MergeError, match=r"^slerp: cannot merge 2 to 3 models at once"):
            heterogeneity.run(session, ["task_arithmetic", "slerp"], n_val=1, n_test=1,
                              progress=lambda f, d: seen.append(d), workers=1)
        assert seen == []
    finally:
        session.close()


def test_compare_without_a_variant_runs_once_and_says_so(tmp_path):
    """A zoo with no `variant_of` fine-tune was run twice, the second table headed 'With the
    heterogeneous fine-tune' and drawn as a second series."""
    from evaluation import compare

    zoo = subset_zoo(tmp_path / "zoo", ["reverse", "upper"])
    out = compare.main(zoo, tmp_path / "out", quick=True, methods=["task_arithmetic"], n_val=1, n_test=1)
    text = (out / "compare.md").read_text()
    assert "heterogeneous fine-tune —" not in text and text.count("`task_arithmetic`") == 1
    assert "no training-heterogeneous fine-tune" in text
    assert "heterogeneous fine-tune" not in (out / "compare.html").read_text()


def test_compare_of_one_fine_tune_and_of_an_unloadable_zoo(tmp_path, capsys):
    """One fine-tune was 'merged' and tabulated; a zoo that fails to load left an empty --out behind."""
    one = subset_zoo(tmp_path / "one", ["upper"])
    out = tmp_path / "out"
    assert run_main(capsys, "compare", "--zoo", str(one), "--out", str(out))[::2] == (
        2, "error: compare: needs at least two fine-tunes; the zoo has 1")

    def wider(root: Path) -> None:  # a fine-tune with 8 more tokens than the base
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(root / "upper")
        model.resize_token_embeddings(model.config.vocab_size + 8)
        model.save_pretrained(root / "upper")

    vocab = subset_zoo(tmp_path / "vocab", ["reverse", "upper"])
    wider(vocab)
    code, _, err = run_main(capsys, "compare", "--zoo", str(vocab), "--out", str(out), "--quick",
                            "--methods", "task_arithmetic", "--n-val", "1", "--n-test", "1")
    assert code == 2 and err.endswith("upper: vocabulary size 86 differs from the base's 78"), err
    assert not out.exists()


def test_a_bad_device_variable_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FEDMERGE_DEVICE", "tpu")
    code, _, err = run_main(capsys, "heterogeneity", "--out", str(tmp_path / "o"))
    assert (code, err) == (2, "error: FEDMERGE_DEVICE: unknown device 'tpu': use cpu, cuda, cuda:N or auto")


def test_help_states_every_default_the_code_uses():
    """compare's --out, --n-val and --n-test, the studies' counts and --per-size had no default in
    their help."""
    from evaluation.__main__ import COMMANDS, _Parser

    for name, (_, add, _) in COMMANDS.items():
        parser = _Parser(prog=name)
        add(parser)
        for action in parser._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.help:
                assert str(action.default) in action.help, (name, action.dest, action.help)


def test_the_report_is_replaced_whole_never_half_nor_through_a_symlink(tmp_path):
    """The report files were written in place: a write that failed midway left half of one, and a
    report file that was a symlink had its target overwritten."""
    import plotly.graph_objects as go

    from evaluation.plots import write_report

    write_report(tmp_path, "study", "old\n", go.Figure())
    old = (tmp_path / "study.html").read_bytes()
    broken = go.Figure()
    broken.layout.meta = object()  # cannot be written as JSON: fails inside write_html
    with pytest.raises(TypeError):
        write_report(tmp_path, "study", "new\n", broken)
    assert (tmp_path / "study.md").read_text() == "old\n" and (tmp_path / "study.html").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.html", "study.md"]  # no temporary left

    (tmp_path / "elsewhere.md").write_text("keep\n")
    (tmp_path / "study.md").unlink()
    (tmp_path / "study.md").symlink_to(tmp_path / "elsewhere.md")
    write_report(tmp_path, "study", "new\n", go.Figure())
    assert (tmp_path / "elsewhere.md").read_text() == "keep\n"
    assert not (tmp_path / "study.md").is_symlink() and (tmp_path / "study.md").read_text() == "new\n"


def test_the_same_command_writes_the_same_bytes(tmp_path, capsys):
    """plotly gave the figure a random element id: two identical runs wrote different HTML."""
    for run in ("a", "b"):
        code, _, err = run_main(capsys, "task-count", "--models", "reverse,upper,sort", "--methods", "task_arithmetic",
                                "--per-size", "1", "--n-val", "2", "--n-test", "2", "--out", str(tmp_path / run))
        assert code == 0, err
    assert (tmp_path / "a" / "task-count.html").read_bytes() == (tmp_path / "b" / "task-count.html").read_bytes()
    md = [(tmp_path / r / "task-count.md").read_text().rsplit("Time:", 1)[0] for r in "ab"]
    assert md[0] == md[1]  # all but the wall time


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "error: terminated"),
                                             (signal.SIGINT, 130, "error: interrupted")])
def test_a_signal_mid_study_stops_the_forked_searches_and_writes_nothing(tmp_path, sig, code, line):
    """A real process, signalled while its forked search processes work. SIGTERM killed the parent
    alone: its children lived on, orphaned, for ever (holding the caller's pipes open)."""
    def defaults():  # a shell's background job ignores SIGINT; the command under test must not
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    env = {**os.environ, "FEDMERGE_SEARCH_WORKERS": "2", "FEDMERGE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "evaluation", "heterogeneity", "--n-val", "6", "--n-test", "6",
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=defaults, start_new_session=True)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 300  # loading and the similarity report first: slow on a busy machine
        while len(kids) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            kids = _children(proc.pid)
        assert len(kids) == 2, f"the study did not fork its searches (exit status {proc.poll()})"
        time.sleep(1)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == code and err.strip().splitlines()[-1] == line, (proc.returncode, err[-500:])
        assert "Traceback" not in err
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(k) for k in kids), "forked search processes outlived the command"
        assert not out.exists()
    finally:
        for pid in [proc.pid, *kids]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_the_recommendation_does_not_call_a_null_correlation_a_predictor():
    """'the best single predictor … ρ = +0.48, 95% CI [-0.02, +0.80]': the strongest of five measures,
    with an interval that holds no correlation at all, was reported as a finding."""
    from evaluation.heterogeneity import Correlation, GroupResult, Study, recommend
    from evaluation.live_merge import MergeSettings

    pair = GroupResult(["a", "b"], "pair", {"cosine": 0.2, "sign_conflict": 0.4}, {"task_arithmetic": 0.5},
                       {"task_arithmetic": MergeSettings("task_arithmetic", (1.0, 1.0), 1.0, {}, (0, 1))})
    for low, tail in ((-0.02, "; its interval includes 0: not a reliable predictor on these pairs."),
                      (0.12, ", 95% CI [+0.12, +0.80]).")):
        study = Study([pair], [Correlation("norm_ratio", "task_arithmetic", 0.48, low, 0.80, 21)], [])
        assert recommend(study, ["task_arithmetic"]).endswith(tail)


def test_a_pair_with_no_accuracy_to_normalize_is_not_the_worst_pair():
    """A pair whose fine-tunes answer none of their test prompts (a weak zoo, a small --n-test) has a NaN
    drop: it was printed as 'nan' and, first in the list, named the worst pair ('nan points')."""
    import math

    from evaluation.heterogeneity import MEASURES, GroupResult, Study, correlations, recommend, to_markdown
    from evaluation.live_merge import MergeSettings

    def pair(a, b, drop):
        setting = MergeSettings("task_arithmetic", (1.0, 1.0), 1.0, {}, (0, 1))
        return GroupResult([a, b], "pair", {m: 0.3 for m in MEASURES}, {"task_arithmetic": drop},
                           {"task_arithmetic": setting})

    groups = [pair("a", "b", math.nan), pair("a", "c", 0.5), pair("b", "c", 0.2)]
    study = Study(groups, correlations(groups, ["task_arithmetic"]), [])
    text = recommend(study, ["task_arithmetic"])
    assert text.startswith("a and c lose the most under Task Arithmetic (50 points"), text
    table = to_markdown(study, ["task_arithmetic"])
    assert "nan" not in table.lower() and "| a + b | " in table and " | n/a |" in table
    assert "n/a: groups whose fine-tunes answer none of their own test prompts" in table


def test_empty_device_or_ray_and_an_unreachable_cluster_are_refused_before_loading(tmp_path, capsys):
    """`--device ""` ran on the CPU and `--ray ""` without Ray, silently; a cluster address that does
    not answer was found only after the zoo was loaded."""
    out = str(tmp_path / "o")
    for args, want in ((["heterogeneity", "--device", " "], "error: --device: empty; use cpu, cuda, cuda:N or auto"),
                       (["compare", "--ray", ""], "error: --ray: an empty address; --ray alone starts a local Ray, "
                                                  "--ray ADDRESS uses a cluster")):
        assert run_main(capsys, *args, "--out", out)[::2] == (2, want)
    pytest.importorskip("ray")
    code, stdout, err = run_main(capsys, "compare", "--ray", "127.0.0.1:1", "--methods", "task_arithmetic",
                                 "--quick", "--n-val", "1", "--n-test", "1", "--out", out)
    assert code == 2 and err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1"), err
    assert "plain zoo" not in stdout and "Loading" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "error: terminated"),
                                             (signal.SIGINT, 130, "error: interrupted")])
def test_a_signal_during_the_start_up_imports_is_one_line(tmp_path, sig, code, line):
    """torch and transformers take seconds to import, inside main() but before its error handling: a
    Ctrl-C then printed a traceback, and SIGTERM killed the process without a word."""
    def defaults():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    env = {**os.environ, "FEDMERGE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evaluation", "task-count", "--out", str(tmp_path / "o")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=defaults, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:  # torch's library is mapped: it is importing
            try:
                if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                    break
            except OSError:
                pass
            time.sleep(0.01)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
        assert (proc.returncode, err.strip()) == (code, line), (proc.returncode, err[-600:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
