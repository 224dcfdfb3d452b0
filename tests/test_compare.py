"""`python -m evaluation compare` on a tiny zoo built by the real recipe: selections, table, figure."""
from __future__ import annotations

from evaluation import compare
from evaluation.session import read_zoo
from tests.conftest import build_tiny_zoo


def test_selections_swap_in_the_heterogeneous_variant(tmp_path_factory):
    zoo = build_tiny_zoo(tmp_path_factory)
    _, specs = read_zoo(zoo)
    plain, hetero = compare.selection(zoo, False), compare.selection(zoo, True)
    variants = {s.name: s.variant_of for s in specs if s.variant_of}
    assert variants and len(plain) == len(hetero) == len({s.task for s in specs})
    assert set(hetero) - set(plain) == set(variants)
    assert set(plain) - set(hetero) == set(variants.values())


def test_compare_writes_table_and_figure(tmp_path_factory, tmp_path):
    zoo = build_tiny_zoo(tmp_path_factory)
    out = compare.main(zoo, tmp_path, quick=True, methods=["task_arithmetic", "fednova", "slerp"], n_val=4, n_test=4)
    text = (out / "compare.md").read_text()
    assert text.count("`task_arithmetic`") == 2 and text.count("`fednova`") == 2
    assert "`slerp`" not in text  # slerp takes at most two models: skipped, not failed
    assert "λ=" in text
    html = (out / "compare.html").read_text()
    assert "heterogeneous fine-tune" in html and "plain zoo" in html


def test_command_line_refuses_bad_options_in_one_line_before_any_work(tmp_path, capsys):
    """`python -m evaluation compare`: counts within the splits, known methods, an output folder that can
    be written; each refused before the zoo is read (`--methods nope` would only be found after loading
    it), with one line naming the option and exit 2, and nothing created."""
    from evaluation.__main__ import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "res" / "compare.md").mkdir(parents=True)
    for bad, want in ((["--n-val", "-3"], "--n-val: a whole number from 1 to 300"),
                      (["--n-val", "0"], "--n-val: a whole number from 1 to 300"),
                      (["--n-val", "100000000"], "--n-val: a whole number from 1 to 300"),
                      (["--n-test", "0"], "--n-test: a whole number from 1 to 300"),
                      (["--methods", ""], "--methods: comma-separated names"),
                      (["--out", str(tmp_path / "file" / "x")], f"--out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file, not a folder"),
                      (["--out", str(tmp_path / "file")], "exists and is not a folder"),
                      (["--out", str(tmp_path / "res")], "compare.md in it is a folder"),
                      (["--out", "/"], "--out /: the file system's root"),
                      (["--out", "/proc/fedmerge-x"], "--out /proc/fedmerge-x: cannot write there"),  # was: after the work
                      (["--out", ""], "--out: empty")):
        assert main(["compare", "--methods", "nope", "--out", str(tmp_path / "no"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and want in err and "\n" not in err and "Error" not in err, (bad, err)
    assert not (tmp_path / "no").exists() and (tmp_path / "file").read_text() == "x"


def test_command_line_turns_a_file_system_error_into_one_line(tmp_path, capsys):
    """A zoo.json that cannot be read (here a folder) is one line naming --zoo and the system's reason,
    exit 2, not a traceback (it was main's last resort; the zoo check words it now)."""
    from evaluation.__main__ import main

    (tmp_path / "zoo" / "zoo.json").mkdir(parents=True)
    assert main(["compare", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --zoo {tmp_path / 'zoo'}: zoo.json: is a directory", err
