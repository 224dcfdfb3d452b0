"""Imports go one way: app → evaluation → merging. Read from the source with `ast`, so a lazy
import inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def imported(path: Path) -> set[str]:
    """Top-level package names a file imports (relative imports count as its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(folder: str, forbidden: set[str]) -> dict[str, set[str]]:
    files = sorted((ROOT / folder).glob("*.py"))
    assert files, folder
    return {p.name: bad for p in files if (bad := imported(p) & forbidden)}


def test_merging_imports_neither_evaluation_nor_the_app():
    assert offenders("merging", {"evaluation", "app", "bench", "tests"}) == {}


def test_evaluation_does_not_import_the_app():
    assert offenders("evaluation", {"app", "bench", "tests"}) == {}


def test_benchmarks_do_not_import_the_app():
    assert offenders("bench", {"app"}) == {}


def test_conftest_imports_no_test_module():
    mods = set()
    for node in ast.walk(ast.parse((ROOT / "tests" / "conftest.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    assert not {m for m in mods if m.startswith("tests.test_")}, mods
