"""The zoo recipe end to end on a tiny configuration (`build-zoo --tiny`): loadable folders, records,
the measurements and claims the README is rendered from."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.tasks import TASKS
from evaluation.zoo import MODEL_FILES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # trains a tiny base and seven fine-tunes: ~30 CPU s
def test_tiny_recipe_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "zoo"
    out.mkdir()
    (out / "scenarios.json").write_text('{"scenarios": []}\n')  # hand-written: a rebuild keeps it
    subprocess.run([sys.executable, "-m", "evaluation", "build-zoo", "--tiny", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=300)
    assert not (tmp_path / "zoo.building").exists() and not (tmp_path / "zoo.old").exists()
    assert (out / "scenarios.json").read_text() == '{"scenarios": []}\n'
    zoo = json.loads((out / "zoo.json").read_text())
    folders = [zoo["base"]["folder"]] + [f["folder"] for f in zoo["finetunes"]]
    assert {f["task"] for f in zoo["finetunes"]} == set(TASKS)
    assert len(zoo["finetunes"]) > len(TASKS)  # the heterogeneous extra
    assert zoo["conflicts"] and all(len(c) == 2 and set(c) <= set(TASKS) for c in zoo["conflicts"])
    for name in folders:
        assert sorted(os.listdir(out / name)) == sorted(MODEL_FILES)  # what a rebuild may replace in it
        rec = json.loads((out / name / "training.json").read_text())
        assert {"task", "steps", "learning_rate", "batch_size", "seed", "train_seconds"} <= set(rec)
        if name != "base":
            assert rec["base"] == "base" and 0 <= rec["test_accuracy"] <= 1 and 0 <= rec["validation_accuracy"] <= 1
            # one-per-task fine-tunes replay the pretraining mixture; the heterogeneous extra does not
            assert (rec["replay"] > 0) == ("variant_of" not in rec)
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        assert next(model.parameters()).dtype.is_floating_point and tok.pad_token_id == model.config.pad_token_id
    report = json.loads((out / "report.json").read_text())
    k = len(zoo["finetunes"])
    cos = report["similarity"]["cosine"]
    assert len(cos) == k and abs(cos[0][0] - 1) < 1e-6
    n_primary = sum(1 for f in zoo["finetunes"] if "variant_of" not in f)
    assert len(report["pairs"]) == n_primary * (n_primary - 1) // 2
    assert set(report["all"]) >= {"task_arithmetic", "fednova", "fedgma", "median", "cclip"}
    assert [c["pair"] for c in report["conflict"]] == zoo["conflicts"]
    het = report["training_heterogeneity"]
    assert [(h["variant"], h["twin"]) for h in het] == [("reverse-long", "reverse")]
    assert len(het[0]["drop_interval"]) == 2 and len(het[0]["recovery_interval"]) == 2
    partners = [n for n in report["primary"] if n != "reverse"]
    assert het[0]["partners"] == partners  # reverse-long in place of reverse in each of reverse's pairs
    assert [r["models"] for r in het[0]["fednova"]["pairs"]] == [["reverse-long", x] for x in partners]
    assert [r["models"] for r in het[0]["plain_task_arithmetic"]["pairs"]] == [["reverse", x] for x in partners]
    assert {c["claim"] for c in report["claims"]} and all(isinstance(c["ok"], bool) for c in report["claims"])
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Built-in model zoo") and readme.endswith("\n") and "$" not in readme
    for c in report["claims"]:  # the README states every claim with its measured value
        assert c["value"] in readme


def test_tiny_recipe_is_deterministic(tmp_path):
    """Two in-process builds of the base give identical weights (fixed seeds, deterministic data)."""
    import dataclasses

    import torch

    from evaluation.zoo import TINY, pretrain

    cfg = dataclasses.replace(TINY, pretrain_steps=2)
    a, b = pretrain(cfg, log=lambda s: None), pretrain(cfg, log=lambda s: None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretraining_mixture_never_shows_a_task_keyword():
    """The base learns each task's skill under its base form and answers `?` to unknown keywords;
    no prompt of the mixture uses a task's own keyword (else the base would score on the tasks)."""
    from evaluation.zoo import BASE_FORMS, UNKNOWN, skill_example

    rng = random.Random(0)
    keywords = {t.keyword for t in TASKS.values()}
    seen_forms, unknown = set(), 0
    for _ in range(3000):
        prompt, answer = skill_example(rng)
        kw = prompt.split(": ", 1)[0]
        assert kw not in keywords, prompt
        seen_forms.add(kw)
        unknown += answer == UNKNOWN
    assert set(BASE_FORMS.values()) <= seen_forms and set(BASE_FORMS) == set(TASKS)
    assert 0.1 < unknown / 3000 < 0.4


@pytest.mark.slow  # measures the shipped zoo twice (small splits): ~1 min
def test_zoo_measurements_in_forked_processes_equal_one_process(monkeypatch):
    """measure() tunes its merges and scores the chosen ones in forked processes: the same report as
    one process, on the shipped zoo (small splits and λ grid to keep it quick)."""
    from evaluation.zoo_report import measure

    zoo = ROOT / "assets" / "zoo"
    reports = []
    for workers in ("1", "2"):
        monkeypatch.setenv("FEDMERGE_SEARCH_WORKERS", workers)
        reports.append(measure(zoo, n_val=4, n_test=12, lambdas=(0.4, 1.0), log=lambda *a: None))
    one, two = reports
    assert json.dumps(two, sort_keys=True) == json.dumps(one, sort_keys=True)
    assert max(p["test_normalized"] for p in one["pairs"]) > 0.5  # real merges, not an all-zero report


def test_long_client_update_grows_with_its_steps():
    """The Learn tab's premise for FedNova on the shipped zoo: `reverse-long`'s task vector is ~5× the
    norm of `reverse`'s for 5.3× the steps (FedNova's rescaling gets its size right)."""
    import json

    import torch
    from safetensors.torch import load_file

    from evaluation.pool import zoo_dir

    zoo = zoo_dir()
    base = load_file(str(zoo / "base" / "model.safetensors"))

    def norm_and_steps(name):
        ft = load_file(str(zoo / name / "model.safetensors"))
        n = torch.sqrt(sum(((ft[k].double() - base[k].double()) ** 2).sum() for k in base)).item()
        return n, json.loads((zoo / name / "training.json").read_text())["steps"]

    (n_long, k_long), (n_twin, k_twin) = norm_and_steps("reverse-long"), norm_and_steps("reverse")
    assert k_long / k_twin > 5
    assert 0.8 < (n_long / n_twin) / (k_long / k_twin) < 1.25  # size ∝ steps, within 25%


def test_base_form_accuracies_are_what_the_base_does():
    """report.json's (and so the zoo README's) accuracy of the base on each base form is re-measured,
    and the figures the main README quotes are those."""
    import json
    from pathlib import Path

    from evaluation.pool import zoo_dir
    from evaluation.zoo_report import base_form_accuracy

    zoo = zoo_dir()
    recorded = json.loads((zoo / "report.json").read_text())["base_forms"]
    assert base_form_accuracy(zoo, 300) == recorded
    learnt = [v for t, v in recorded.items() if t not in ("add", "is_even")]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"{min(learnt):.0%}–{max(learnt):.0%} on their base forms".replace("%–", "–") in readme
    assert f"not `add`'s ({recorded['add']:.0%}" in readme
    assert f"({recorded['is_even']:.0%} on a yes/no answer)" in readme
    assert recorded["add"] < 0.2 and min(learnt) > 0.75


def _with_threads(n, fn):
    from evaluation.bitwise_threads import torch_threads

    with torch_threads(n):
        return fn()


def test_pretraining_on_two_threads_gives_one_threads_bits():
    """The build pretrains on 2 threads; the base must be the one a 1-thread run makes, bit for bit."""
    from dataclasses import replace

    import torch

    from evaluation.zoo import FULL, pretrain

    cfg = replace(FULL, n_layer=1, pretrain_steps=3)  # the zoo's shapes, one block, three steps: ~3 s
    one = _with_threads(1, lambda: pretrain(cfg, log=lambda s: None).state_dict())
    two = _with_threads(2, lambda: pretrain(cfg, log=lambda s: None).state_dict())
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


def test_layer_norm_backward_rounds_by_thread_count_unless_kept_on_one():
    """Why the mode exists: LayerNorm's weight gradient sums over rows split across threads."""
    import contextlib

    import torch

    from evaluation.bitwise_threads import OneThreadReductions

    torch.manual_seed(0)
    x, ln = torch.randn(96, 31, 128), torch.nn.LayerNorm(128)

    def grad(mode):
        ln.zero_grad()
        with mode:
            ln(x).pow(2).sum().backward()
        return ln.weight.grad.clone()

    one = _with_threads(1, lambda: grad(contextlib.nullcontext()))
    assert not torch.equal(one, _with_threads(2, lambda: grad(contextlib.nullcontext())))
    assert torch.equal(one, _with_threads(2, lambda: grad(OneThreadReductions())))


def test_a_rebuild_says_which_models_it_reproduced(tmp_path):
    """build-zoo compares each new weight file with the one it replaces (the README's bit-for-bit claim)."""
    import shutil

    from evaluation.zoo import same_weights

    zoo = ROOT / "assets" / "zoo"
    new = tmp_path / "new"
    for name in ("base", "upper", "sort"):
        shutil.copytree(zoo / name, new / name)
    raw = bytearray((new / "sort" / "model.safetensors").read_bytes())
    raw[-1] ^= 1  # one bit of the last weight
    (new / "sort" / "model.safetensors").write_bytes(bytes(raw))
    (new / "extra").mkdir()
    (new / "extra" / "model.safetensors").write_bytes(b"x")  # a model the old zoo lacks: not compared
    assert same_weights(new, zoo) == {"base": True, "sort": False, "upper": True}
    assert same_weights(new, tmp_path / "nothing") == {}


def _zoo_layout(folder: Path) -> Path:
    """A folder shaped like the shipped zoo: its zoo.json, model folders and built files (no weights needed)."""
    folder.mkdir(parents=True)
    (folder / "zoo.json").write_text((ROOT / "assets" / "zoo" / "zoo.json").read_text())
    for name in ("base", *(f["folder"] for f in json.loads((folder / "zoo.json").read_text())["finetunes"])):
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_bytes(b"w")
    for name in ("README.md", "report.json", "scenarios.json"):
        (folder / name).write_text("{}")
    return folder


def test_an_output_folder_is_replaced_only_if_it_holds_a_zoo_or_nothing_else(tmp_path):
    """build-zoo replaces a missing or empty folder, one holding only the files a rebuild keeps, or a zoo and
    nothing else (the documented rebuild of assets/zoo needs no flag); anything else only with --overwrite.
    A stale `<out>.building` is removed only if it is an interrupted build's (our marker, or empty)."""
    from evaluation.zoo import DEFAULT_OUT, FULL, MARKER, TINY, check_out
    from merging.errors import MergeError

    assert check_out(DEFAULT_OUT, FULL) == DEFAULT_OUT  # python -m evaluation build-zoo, as documented
    assert check_out(tmp_path / "new" / "zoo", TINY) == tmp_path / "new" / "zoo"
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty", TINY) == tmp_path / "empty"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "scenarios.json").write_text("{}")
    check_out(tmp_path / "kept", TINY)
    zoo = _zoo_layout(tmp_path / "zoo")
    check_out(zoo, FULL)
    (zoo / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match=r"^--out .*zoo: holds a zoo and also 'notes.txt', which a rebuild would delete"):
        check_out(zoo, FULL)
    check_out(zoo, FULL, overwrite=True)
    (zoo / "notes.txt").unlink()
    (zoo / "base" / "notes.txt").write_text("mine")  # inside a model folder: deleted too (was: not looked at)
    with pytest.raises(MergeError, match=r"^--out .*zoo: holds a zoo and also 'base/notes.txt', which a rebuild"):
        check_out(zoo, FULL)
    (zoo / "base" / "notes.txt").unlink()
    check_out(zoo, FULL)
    (zoo / "zoo.json").write_text("not json")  # no zoo any more: its folders are someone's
    with pytest.raises(MergeError, match=r"^--out .*zoo: not empty and holds no zoo \(no zoo.json\)"):
        check_out(zoo, FULL)
    work = tmp_path / "kept.building"
    work.mkdir()
    check_out(tmp_path / "kept", TINY)  # empty: removable
    (work / "data.txt").write_text("mine")
    with pytest.raises(MergeError, match=r"^--out .*kept: .*kept.building is in the way and is not an interrupted build"):
        check_out(tmp_path / "kept", TINY)
    with pytest.raises(MergeError, match="is in the way"):  # --overwrite is about --out, not its neighbours
        check_out(tmp_path / "kept", TINY, overwrite=True)
    (work / MARKER).touch()
    check_out(tmp_path / "kept", TINY)
    (tmp_path / "f").write_text("x")
    for bad, want in ((tmp_path / "f", "exists and is not a folder"),
                      (tmp_path / "f" / "zoo", "is a file, not a folder"),
                      ("/", "the file system's root"), ("", "empty"), ("/proc/zoo", "cannot write there")):
        with pytest.raises(MergeError, match=f"^--out.*: .*{want}"):
            check_out(bad, TINY, overwrite=True)


def test_build_zoo_refuses_a_users_folder_in_one_line_and_keeps_it(tmp_path, capsys):
    """The data-loss bug: `build-zoo --tiny --out DIR` with someone's files in DIR used to build, then
    delete them. Now one line naming --out, exit 2, before any training, and DIR as it was."""
    from evaluation.__main__ import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mydata.txt").write_text("precious\n")
    (tmp_path / "f").write_text("x")
    for out, want in ((mine, f"--out {mine}: not empty and holds no zoo"),
                      (tmp_path / "f" / "zoo", f"--out {tmp_path / 'f' / 'zoo'}: {tmp_path / 'f'} is a file, not a folder"),
                      (tmp_path / "f", f"--out {tmp_path / 'f'}: exists and is not a folder"),
                      ("/", "--out /: the file system's root")):
        assert main(["build-zoo", "--tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err and "Error" not in err, err
    assert (mine / "mydata.txt").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "mine"]  # no build folder was made


@pytest.mark.slow  # one tiny build: ~30 CPU s
def test_rebuilding_a_zoo_in_place_needs_no_flag_and_spares_the_neighbours(tmp_path_factory, tmp_path):
    """`build-zoo --out ZOO` on an existing zoo replaces it (as the documented rebuild of assets/zoo does),
    removes a stale build folder of ours, and leaves alone a user's `ZOO.old`, which the swap used to
    delete (or fail on, after the whole build)."""
    import shutil

    from tests.conftest import build_tiny_zoo

    out = tmp_path / "zoo"
    shutil.copytree(build_tiny_zoo(tmp_path_factory), out)
    (out / "scenarios.json").write_text('{"scenarios": []}\n')
    (tmp_path / "zoo.building").mkdir()
    (tmp_path / "zoo.building" / ".fedmerge-zoo-build").touch()
    (tmp_path / "zoo.building" / "base").mkdir()
    (tmp_path / "zoo.old").mkdir()
    (tmp_path / "zoo.old" / "mydata.txt").write_text("precious\n")
    subprocess.run([sys.executable, "-m", "evaluation", "build-zoo", "--tiny", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo", "zoo.old"]
    assert (tmp_path / "zoo.old" / "mydata.txt").read_text() == "precious\n"
    assert (out / "scenarios.json").read_text() == '{"scenarios": []}\n'
    assert json.loads((out / "report.json").read_text())["claims"] and not (out / ".fedmerge-zoo-build").exists()
