"""Smoke test of the benchmark helpers (fast: no checkpoints, no mergekit)."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


def test_run_measured_reports_time_and_peak_rss():
    from _common import run_measured

    wall, rss, rc = run_measured([sys.executable, "-c", "x = bytearray(50 * 2**20)"])
    assert rc == 0 and wall > 0 and rss >= 50


def test_written_yaml_is_a_valid_config(tmp_path):
    from mergekit_compare import METHODS, write_yaml

    from merging import load_config

    models = [tmp_path / f"ft{i}" for i in range(4)]
    for method in METHODS:
        path = tmp_path / f"{method}.yml"
        write_yaml(path, method, tmp_path / "base", models)
        cfg = load_config(path)
        assert cfg.merge_method == method and len(cfg.models) == 4
