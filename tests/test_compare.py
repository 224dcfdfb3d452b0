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
