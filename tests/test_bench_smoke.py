"""Smoke test of the benchmark helpers (fast: no checkpoints, no mergekit)."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


def test_run_measured_reports_time_and_peak_rss():
    from _common import run_measured

    wall, rss, rc = run_measured([sys.executable, "-c", "x = bytearray(50 * 2**20)"])
    assert rc == 0 and wall > 0 and rss >= 50
    assert run_measured([sys.executable, "-c", "raise SystemExit(3)"])[2] == 3


def test_run_measured_does_not_count_the_benchmarks_own_memory():
    """A child's ru_maxrss starts at its parent's peak on Linux: a benchmark that had loaded two
    merged models reported every later merge as at least that big. The launcher avoids it."""
    from _common import run_measured

    held = bytearray(600 * 2**20)  # this process: +600 MiB, touched
    held[::4096] = b"x" * len(held[::4096])
    _, rss, rc = run_measured([sys.executable, "-c", "x = bytearray(50 * 2**20)"])
    assert rc == 0 and 50 <= rss < 300
    del held


def test_written_yaml_is_a_valid_config(tmp_path):
    from mergekit_compare import METHODS, write_yaml

    from merging import load_config

    models = [tmp_path / f"ft{i}" for i in range(4)]
    for method in METHODS:
        path = tmp_path / f"{method}.yml"
        write_yaml(path, method, tmp_path / "base", models)
        cfg = load_config(path)
        assert cfg.merge_method == method and len(cfg.models) == 4


def test_every_benchmark_is_listed_in_the_bench_readme():
    listed = (BENCH / "README.md").read_text()
    scripts = [p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")]
    assert scripts and all(f"bench/{s}" in listed for s in scripts), scripts


def test_eval_speed_baseline_agrees_with_the_harness():
    """The harness's hand-written greedy loop (batch shrinking included) = transformers' generate."""
    from eval_speed import generate_baseline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.harness import evaluate
    from evaluation.session import read_zoo
    from evaluation.tasks import TASKS

    _, specs = read_zoo()
    for spec in specs[:2]:
        model = AutoModelForCausalLM.from_pretrained(spec.ref).eval()
        tok = AutoTokenizer.from_pretrained(spec.ref)
        tasks = list(TASKS)
        res = evaluate(model, tok, tasks, split="test", n=12)
        assert res.predictions == generate_baseline(model, tok, tasks, 12)
        assert res.accuracy[spec.task] > 0.5  # a real fine-tune: its own task is solved


def test_every_benchmark_records_through_one_helper_and_takes_no_record():
    """One way into bench/RESULTS.md and one opt-out flag, the one bench/README.md documents."""
    scripts = [p for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "make_checkpoints.py"]
    for p in scripts:
        text = p.read_text()
        assert "add_record_flag(ap)" in text and "append_results(" in text, p.name
        assert "RESULTS.md\", \"a\"" not in text and "--no-append" not in text, p.name
    readme = (BENCH / "README.md").read_text()
    assert "--no-record" in readme and "--no-append" not in readme


def test_work_dir_is_created_on_first_use(tmp_path, monkeypatch):
    """bench/_work/ is git-ignored: a fresh clone has none, and every script must still run."""
    import _common

    monkeypatch.setattr(_common, "WORK", tmp_path / "_work")
    assert _common.work_dir("logs").is_dir() and _common.work_dir().is_dir()


def test_zoo_pretrain_benchmark_checks_the_bits():
    """bench/zoo_pretrain.py end to end on two steps: it exits 0 only when 2 threads gave 1 thread's bits."""
    import subprocess

    out = subprocess.run([sys.executable, str(BENCH / "zoo_pretrain.py"), "--steps", "2", "--no-record"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bit-identical base: yes" in out.stdout and "ratio" in out.stdout
