"""Load test on loopback: concurrent gradio_client sessions merging with different coefficients.

Starts `python app.py` on a free 127.0.0.1 port, warms it up, then runs C sessions (threads,
each its own gradio_client session) × M interleaved merges with session-specific settings.
Checks: zero errors; every session's outputs table equals what the same settings give when
replayed alone afterwards (no state bleeds between sessions); resident memory of the server
stays flat after warm-up. Prints p50/p95 latency and appends them to bench/RESULTS.md.

    python bench/load_test.py [--sessions 8] [--merges 50] [--no-append]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.app_latency import _port  # noqa: E402

METHODS = [("task_arithmetic", {}), ("fedgma", {"rho": 0.5}), ("ties", {"density": 0.5}), ("median", {})]


def settings_for(session: int, step: int, k: int):
    """Session-specific settings: each session has its own method and coefficient pattern."""
    method, hyper = METHODS[session % len(METHODS)]
    weights = [round(0.2 + 0.1 * ((session + step + i) % 9), 2) for i in range(k)]
    lam = round(0.3 + 0.05 * ((session * 7 + step) % 20), 2)
    return method, lam, weights, hyper


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--merges", type=int, default=50)
    ap.add_argument("--zoo", default=os.environ.get("FEDMERGE_ZOO", str(ROOT / "assets" / "zoo")))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    from gradio_client import Client

    from app import live_kwargs
    from evaluation.session import read_zoo

    k = len([s for s in read_zoo(args.zoo)[1] if not s.variant_of])
    port = _port()
    env = {**os.environ, "FEDMERGE_ZOO": str(Path(args.zoo).resolve()), "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = psutil.Process(proc.pid)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                Client(url, verbose=False, download_files=False)
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise SystemExit("the app did not start")

        def call(client, method, lam, weights, hyper):
            out = client.predict(**live_kwargs(method, lam, weights, hyper), api_name="/live")
            return out[-1]["rows"]  # the outputs table (base, fine-tunes, merged, ✓/✗)

        warm = [Client(url, verbose=False, download_files=False) for _ in range(args.sessions)]
        for s, c in enumerate(warm):  # warm-up: every method once, references cached
            for step in range(len(METHODS)):
                call(c, *settings_for(s + step, 0, k))
        rss_warm = server.memory_info().rss

        results: dict[tuple[int, int], object] = {}
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def worker(s: int) -> None:
            client = warm[s]
            for step in range(args.merges):
                t0 = time.perf_counter()
                try:
                    table = call(client, *settings_for(s, step, k))
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(f"session {s} step {step}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    results[(s, step)] = table

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(args.sessions)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_end = server.memory_info().rss

        alone = Client(url, verbose=False, download_files=False)  # replay a sample alone
        mismatches = 0
        checked = 0
        for (s, step), table in sorted(results.items()):
            if step % 10 == 9 or step == args.merges - 1:
                checked += 1
                if call(alone, *settings_for(s, step, k)) != table:
                    mismatches += 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    latencies.sort()
    p50 = statistics.median(latencies) if latencies else float("nan")
    p95 = latencies[int(round(0.95 * (len(latencies) - 1)))] if latencies else float("nan")
    growth = rss_end / rss_warm
    print(f"{args.sessions} sessions × {args.merges} merges in {wall:.1f} s: {len(errors)} errors, "
          f"{mismatches}/{checked} replayed results differ")
    print(f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; server RSS {rss_warm / 2**20:.0f} → {rss_end / 2**20:.0f} MiB "
          f"(×{growth:.2f} after warm-up)")
    for e in errors[:5]:
        print("  ", e)
    if not args.no_append:
        cmd = "python bench/load_test.py " + " ".join(sys.argv[1:])
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## Load test: {args.sessions} concurrent sessions × {args.merges} merges "
                    f"({datetime.now(timezone.utc):%Y-%m-%d})\n\n`{cmd.strip()}` on 127.0.0.1, zoo `{Path(args.zoo).name}`, "
                    f"2-core machine.\n\n| errors | replayed alone, differing | p50 | p95 | server RSS after warm-up → end |\n"
                    f"|---|---|---|---|---|\n| {len(errors)} | {mismatches} of {checked} | {p50:.0f} ms | {p95:.0f} ms | "
                    f"{rss_warm / 2**20:.0f} → {rss_end / 2**20:.0f} MiB (×{growth:.2f}) |\n")
    return 0 if not errors and not mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
