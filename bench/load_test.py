"""Load test on loopback: concurrent gradio_client sessions merging with different coefficients.

Starts `python app.py` on a free 127.0.0.1 port, warms it up, then runs C sessions (threads,
each its own gradio_client session) × M interleaved merges with session-specific settings.
Checks: zero errors; every session's outputs table equals what the same settings give when
replayed alone afterwards (no state bleeds between sessions); resident memory of the server
stays flat after warm-up. Prints p50/p95 latency and appends them to bench/RESULTS.md.

`--soak` is the public-Space soak: every session sends long prompts (cut to the model's context)
and now and then too many (refused), builds zip exports and disconnects to start over; then the
server idles past the session and export TTLs. It reports errors, bleed (replay-alone
differences), p50/p95, server RSS after warm-up / at peak / after the TTL, and the export bytes
left on disk (target 0).

    python bench/load_test.py [--sessions 8] [--merges 50] [--no-record]
    python bench/load_test.py --soak [--sessions 16] [--merges 25] [--ttl 30] [--no-record]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ROOT, add_record_flag, append_results, free_port  # noqa: E402

METHODS = [("task_arithmetic", {}), ("fedgma", {"rho": 0.5}), ("ties", {"density": 0.5}), ("median", {})]



def run_all(threads: list[threading.Thread]) -> float:
    """Start every thread at once, wait for all: the wall time in seconds."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0

def _command() -> list[str]:
    return ["python", "bench/load_test.py", *sys.argv[1:]]


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
    add_record_flag(ap)
    ap.add_argument("--soak", action="store_true", help="long prompts, exports, disconnects, then idle past the TTL")
    ap.add_argument("--ttl", type=int, default=30, help="--soak: session and export TTL of the server (s)")
    args = ap.parse_args()
    if args.soak:
        return soak(args)
    from gradio_client import Client

    from evaluation.playground import live_kwargs
    from evaluation.session import read_zoo

    k = len([s for s in read_zoo(args.zoo)[1] if not s.variant_of])
    port = free_port()
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
        wall = run_all(threads)
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
    if not args.no_record:
        append_results(f"Load test: {args.sessions} concurrent sessions × {args.merges} merges", _command(),
                       f"127.0.0.1, zoo `{Path(args.zoo).name}`.\n\n"
                       f"| errors | replayed alone, differing | p50 | p95 | server RSS after warm-up → end |\n"
                       f"|---|---|---|---|---|\n| {len(errors)} | {mismatches} of {checked} | {p50:.0f} ms | {p95:.0f} ms | "
                       f"{rss_warm / 2**20:.0f} → {rss_end / 2**20:.0f} MiB (×{growth:.2f}) |")
    return 0 if not errors and not mismatches else 1


LONG = "the quick brown fox jumps over the lazy dog and runs far away " * 3  # > the zoo's 64 positions


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    latencies = sorted(latencies)
    if not latencies:
        return float("nan"), float("nan")
    return statistics.median(latencies), latencies[int(round(0.95 * (len(latencies) - 1)))]


def soak(args) -> int:
    """S sessions × M merges with long prompts, exports and disconnects; then idle past the TTL."""
    from gradio_client import Client

    from evaluation.playground import live_kwargs
    from evaluation.exports import folder_bytes
    from evaluation.session import default_prompts, read_zoo

    specs = read_zoo(args.zoo)[1]
    k = len([s for s in specs if not s.variant_of])
    tasks = list(dict.fromkeys(s.task for s in specs if not s.variant_of and s.task))
    prompts = "\n".join(default_prompts(tasks) + [LONG, "hello there, " + LONG[:60]])
    too_many = "\n".join(["hi"] * 500)
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="fedmerge-soak-"))
    env = {**os.environ, "FEDMERGE_ZOO": str(Path(args.zoo).resolve()), "GRADIO_SERVER_PORT": str(port),
           "FEDMERGE_SESSION_TTL": str(args.ttl), "FEDMERGE_EXPORT_TTL": str(args.ttl),
           "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    exports_root = tmp / "gradio" / "fedmerge-exports"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=log, stderr=log)
    server = psutil.Process(proc.pid)
    url = f"http://127.0.0.1:{port}/"
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], server.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.25)

    def new_client():  # a long HTTP timeout: on a busy 2-core machine a request may wait in the queue
        return Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": 300})

    def call(client, method, lam, weights, hyper, text=prompts):
        return client.predict(**live_kwargs(method, lam, weights, hyper, prompts=text), api_name="/live")

    results: dict[tuple[int, int], object] = {}
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"merges": 0, "cut": 0, "refused": 0, "exports": 0, "disconnects": 0}
    lock = threading.Lock()
    try:
        for _ in range(240):
            try:
                new_client().close()
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise SystemExit("the app did not start")
        warm = new_client()  # warm-up: every method once, a long prompt, one export
        for step in range(len(METHODS)):
            call(warm, *settings_for(step, 0, k))
        warm.predict(api_name="/zip")
        warm.close()
        time.sleep(2)
        rss_warm = server.memory_info().rss
        threading.Thread(target=sample, daemon=True).start()

        def worker(s: int, clients: list) -> None:
            client = new_client()
            for step in range(args.merges):
                try:
                    if step % 10 == 5:  # too many prompts: refused with a message, before any work
                        *_, status = call(client, *settings_for(s, step, k), text=too_many)
                        ok = status.startswith("⚠️ prompts:")
                        with lock:
                            counts["refused"] += ok
                            if not ok:
                                errors.append(f"session {s} step {step}: not refused: {status[:80]}")
                        continue
                    t0 = time.perf_counter()
                    table, *_, status = call(client, *settings_for(s, step, k))
                    dt = (time.perf_counter() - t0) * 1000
                    if "⚠️" in status:
                        raise RuntimeError(status)
                    with lock:
                        latencies.append(dt)
                        results[(s, step)] = table
                        counts["merges"] += 1
                        counts["cut"] += "cut to its last" in status
                    if step % 12 == 11:  # a zip export, left on the server for the TTL to take
                        client.predict(api_name="/zip")
                        with lock:
                            counts["exports"] += 1
                    if step % 17 == 16:  # disconnect; the next step starts a new session
                        client.close()
                        client = new_client()
                        with lock:
                            counts["disconnects"] += 1
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(f"session {s} step {step}: {type(exc).__name__}: {str(exc)[:120]}")
            clients.append(client)

        clients: list = []
        threads = [threading.Thread(target=worker, args=(s, clients)) for s in range(args.sessions)]
        wall = run_all(threads)
        rss_end = server.memory_info().rss
        exports_end = folder_bytes(exports_root) if exports_root.exists() else 0

        alone = new_client()  # bleed: replay a sample alone
        mismatches = checked = 0
        for (s, step), table in sorted(results.items()):
            if step % 10 == 9 or step == args.merges - 1:
                checked += 1
                try:
                    if call(alone, *settings_for(s, step, k))[0] != table:
                        mismatches += 1
                except Exception as exc:
                    errors.append(f"replay of session {s} step {step}: {type(exc).__name__}: {str(exc)[:120]}")
        alone.close()
        for c in clients[: len(clients) // 2]:  # half disconnect, half just go idle (the TTL frees those)
            c.close()
        time.sleep(args.ttl + 15)  # idle past the TTL (Gradio checks expiry every second; exports swept)
        stop.set()
        rss_ttl = server.memory_info().rss
        exports_left = folder_bytes(exports_root) if exports_root.exists() else 0
        for c in clients[len(clients) // 2:]:
            c.close()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        import shutil

        if errors:
            logged = [line for line in (tmp / "server.log").read_text().splitlines() if "Error" in line]
            print("server log, last errors:", *logged[-5:], sep="\n  ")
        shutil.rmtree(tmp, ignore_errors=True)

    p50, p95 = _percentiles(latencies)
    mib = 2 ** 20
    print(f"soak: {args.sessions} sessions × {args.merges} steps in {wall:.1f} s: {counts['merges']} merges "
          f"({counts['cut']} with a prompt cut to the context), {counts['refused']} refused as too many prompts, "
          f"{counts['exports']} zip exports, {counts['disconnects']} disconnects; {len(errors)} errors, "
          f"{mismatches}/{checked} replayed results differ")
    print(f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; server RSS after warm-up {rss_warm / mib:.0f} MiB, "
          f"peak {max(peak[0], rss_end) / mib:.0f} MiB, after the TTL {rss_ttl / mib:.0f} MiB "
          f"({(rss_ttl - rss_warm) / mib:+.0f} MiB); export bytes on disk {exports_end} at the end of the load, "
          f"{exports_left} after the TTL")
    for e in errors[:5]:
        print("  ", e)
    if not args.no_record:
        append_results(f"Soak: {args.sessions} sessions × {args.merges} steps, exports, disconnects, idle past "
                       f"a {args.ttl} s TTL", _command(),
                       f"127.0.0.1, zoo `{Path(args.zoo).name}`. {counts['merges']} merges "
                       f"(each with 2 long prompts; {counts['cut']} answers noted a prompt cut to the context), "
                       f"{counts['refused']} requests with 500 prompts refused, {counts['exports']} zip exports, "
                       f"{counts['disconnects']} disconnects; after the load half the clients disconnect, half idle.\n\n"
                       f"| errors | bleed (replayed alone, differing) | p50 | p95 | RSS after warm-up | peak | after the TTL "
                       f"| export bytes left after the TTL |\n|---|---|---|---|---|---|---|---|\n"
                       f"| {len(errors)} | {mismatches} of {checked} | {p50:.0f} ms | {p95:.0f} ms | {rss_warm / mib:.0f} MiB "
                       f"| {max(peak[0], rss_end) / mib:.0f} MiB | {rss_ttl / mib:.0f} MiB ({(rss_ttl - rss_warm) / mib:+.0f}) "
                       f"| {exports_left} (at the end of the load: {exports_end}) |")
    return 0 if not errors and not mismatches and exports_left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
