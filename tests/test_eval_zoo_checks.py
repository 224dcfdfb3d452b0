"""`python -m evaluation heterogeneity|task-count|compare --zoo FOLDER` on a malformed zoo: one line
naming what is wrong, exit 2, before any work (each of these was a traceback: a JSONDecodeError, a
TypeError, a KeyError, a UnicodeDecodeError, or torch's reshape error deep in decoding for a base
without a tokenizer), and a fine-tune with an unknown task is refused (it was studied as if it had none)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_models

ZOO = ROOT / "assets" / "zoo"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 (40-token vocabulary, no tokenizer files) and one fine-tune."""
    return tiny_models(tmp_path_factory.mktemp("zoo-checks"), 0, [1])


def zoo(root: Path, index, folders: dict[str, Path]) -> Path:
    root.mkdir()
    for name, src in folders.items():
        shutil.copytree(src, root / name)
    (root / "zoo.json").write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    return root


def entry(name, folder=None, task="upper", **extra):
    return {"name": name, "folder": folder or name, "task": task, **extra}


def cases(tiny):
    shipped = {"base": ZOO / "base", "upper": ZOO / "upper"}
    ok_base = {"name": "base", "folder": "base"}
    return [
        (b"{not json", {}, "zoo.json is not valid JSON"),
        (b"\xff\xfe{}", {}, "zoo.json is not UTF-8 text"),
        ([], {}, 'expected a mapping with "base" and "finetunes"'),
        ({"base": {"folder": "base"}}, shipped, "finetunes: expected a non-empty list"),
        ({"base": ok_base, "finetunes": [entry("upper")]}, {"upper": ZOO / "upper"}, "base: no folder 'base'"),
        ({"base": "base", "finetunes": [entry("upper")]}, shipped, 'base: expected a mapping with a "folder"'),
        ({"base": ok_base, "finetunes": [entry("upper"), entry("rev", task="reverse")]}, shipped,
         "finetunes[1]: no folder 'rev' in the zoo"),
        ({"base": ok_base, "finetunes": [entry("upper"), entry("x", "upper", task="nosuch")]}, shipped,
         "finetunes[1] (x): task 'nosuch' is not one of the evaluation tasks"),
        ({"base": ok_base, "finetunes": [entry("upper"), entry("upper")]}, shipped, "the name 'upper' is given twice"),
        ({"base": ok_base, "finetunes": [entry("upper", variant_of="nobody")]}, shipped,
         "variant_of 'nobody' is not a fine-tune"),
        ({"base": ok_base, "finetunes": [entry("ft0")]}, {"base": tiny["base"], "ft0": tiny["ft0"]},
         "the base (base) has no tokenizer"),
    ]


@pytest.mark.parametrize("command", ["heterogeneity", "task-count", "compare"])
def test_a_malformed_zoo_is_one_line_before_any_work(tiny, tmp_path, capsys, command):
    from evaluation.__main__ import main

    for i, (index, folders, want) in enumerate(cases(tiny)):
        root = zoo(tmp_path / f"zoo{i}", index, folders)
        args = [command, "--zoo", str(root), "--out", str(tmp_path / "out"), "--n-val", "2", "--n-test", "2",
                "--methods", "task_arithmetic"]
        assert main(args) == 2, want
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --zoo {root}: ") and want in err, (want, err)
        assert "\n" not in err and "Traceback" not in err, err
    assert main([command, "--zoo", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --zoo {tmp_path / 'none'}: not a folder"
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_of_another_model_is_refused(tiny, tmp_path, capsys):
    """The shipped zoo's tokenizer (78 tokens) on a model of 40 embedding rows: refused, not an index
    error in the middle of scoring."""
    from evaluation.__main__ import main

    root = zoo(tmp_path / "zoo", {"base": {"name": "base", "folder": "base"}, "finetunes": [entry("ft0")]},
               {"base": tiny["base"], "ft0": tiny["ft0"]})
    for f in ZOO.joinpath("base").glob("tokenizer*"):
        shutil.copy(f, root / "base" / f.name)
    assert main(["heterogeneity", "--zoo", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the base's tokenizer has 78 tokens, its embedding 40 rows" in err and "\n" not in err, err


@pytest.mark.parametrize("command", ["heterogeneity", "task-count"])
def test_a_study_of_fewer_than_two_fine_tunes_is_refused_before_loading(tmp_path, capsys, command):
    """One fine-tune (a zoo of one, or --models naming one) was refused only after the models loaded."""
    from evaluation.__main__ import main

    root = zoo(tmp_path / "zoo", {"base": {"name": "base", "folder": "base"}, "finetunes": [entry("upper")]},
               {"base": ZOO / "base", "upper": ZOO / "upper"})
    for args, want in ((["--zoo", str(root)], "the zoo has 1"), (["--models", "upper"], "--models names 1")):
        assert main([command, *args, "--out", str(tmp_path / "out")]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == f"error: {command}: needs at least two fine-tunes; {want}", captured.err
        assert "Loading" not in captured.err + captured.out  # nothing was loaded


def test_the_app_reads_a_zoo_by_the_same_checks(tiny, tmp_path):
    """The app and a Session read the zoo with `pool.read_zoo` (FEDMERGE_ZOO): a malformed zoo.json
    is the same one line as in the CLIs (it was a KeyError or JSONDecodeError at start-up or on load)."""
    from evaluation.pool import read_zoo
    from merging.errors import MergeError

    for i, (index, folders, want) in enumerate(cases(tiny)[:-1]):  # the last needs a tokenizer: the studies'
        root = zoo(tmp_path / f"z{i}", index, folders)
        with pytest.raises(MergeError, match=r"^the zoo at .*: ") as err:
            read_zoo(root)
        assert want in str(err.value), (want, str(err.value))


def test_the_app_stops_on_a_malformed_zoo_before_serving(tmp_path, monkeypatch):
    """`FEDMERGE_ZOO=… python app.py` on a malformed zoo: one line and a stop before anything is built
    or served (it started, then every visitor's page load failed)."""
    import app

    root = zoo(tmp_path / "z", {"base": {"folder": "base"}, "finetunes": []}, {})
    monkeypatch.setenv("FEDMERGE_ZOO", str(root))
    monkeypatch.setenv("FEDMERGE_DEVICE", "cpu")
    with pytest.raises(SystemExit) as stop:
        app.main()
    text = str(stop.value.code)
    assert text.startswith("app.py: FEDMERGE_ZOO: the zoo at ") and "base: no folder 'base'" in text, text
    assert "\n" not in text
