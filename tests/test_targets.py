"""Every command checks where it writes by the same rules (`merging.targets`): the same mistake
gets the same reason whichever command it was typed into, before any work."""
from __future__ import annotations

import pytest

from merging.errors import MergeError, shown


def _checks():
    from evaluation.__main__ import _check_report_folder
    from evaluation.zoo import TINY, check_out
    from merging import targets
    from merging.writer import output_folder

    return {"merge": lambda p: output_folder(p),
            "similarity --json": lambda p: targets.output_file("--json", p),
            "compare --out": lambda p: _check_report_folder(p, ["compare"]),
            "build-zoo --out": lambda p: check_out(p, TINY)}


@pytest.mark.parametrize("where,reason", [
    ("file/x", "file is a file, not a folder"),
    ("/proc/fedmerge-x", "cannot write there"),  # root passes os.access there; a trial folder tells
    ("/", "the file system's root"),
    ("", "empty"),
    ("x" * 256, "longer than 255 bytes"),
])
def test_the_same_mistake_gets_the_same_reason_everywhere(tmp_path, monkeypatch, where, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    for command, check in _checks().items():
        with pytest.raises(MergeError) as err:
            check(where)
        text = str(err.value)
        assert reason in text and "\n" not in text and "Errno" not in text, (command, text)
        assert shown(where) in text, (command, text)  # names the path as typed (relative stays relative)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing made, no probe left


def test_a_writable_place_passes_and_leaves_nothing(tmp_path):
    for command, check in _checks().items():
        check(str(tmp_path / "new" / "deeper" / "out.json" if "json" in command else tmp_path / "new" / "out"))
    assert list(tmp_path.iterdir()) == []
