"""Slider event → updated outputs + scores latency of the running app, through gradio_client.

Starts `python app.py` on a free port (offline, on the zoo or FEDMERGE_ZOO), waits for it, then
moves one coefficient slider / λ / the aggregator N times via the /live endpoint (what a slider's
.change/.release event calls) and reports p50/p95 of the full round trip. Appends to bench/RESULTS.md.

    python bench/app_latency.py [--n 60] [--zoo assets/zoo] [--per-task 1] [--no-append]

For the GPT-2-small-shaped run (4 synthetic fine-tunes of bench/make_checkpoints.py, each given
one zoo task, 2 prompts per task = 8 generations per event):

    python bench/app_latency.py --gpt2 --per-task 2 --n 20
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GPT2_TASKS = ("reverse", "upper", "sort", "add")


def gpt2_zoo() -> Path:
    """bench/_work/ckpt-1x with a zoo.json naming one task per synthetic fine-tune."""
    import json

    ckpt = ROOT / "bench" / "_work" / "ckpt-1x"
    if not (ckpt / "ft3" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_checkpoints.py"), "--out", str(ckpt)], check=True)
    index = {"base": {"name": "base", "folder": "base", "task": "pretrain"},
             "finetunes": [{"name": f"ft{i}", "folder": f"ft{i}", "task": t} for i, t in enumerate(GPT2_TASKS)]}
    (ckpt / "zoo.json").write_text(json.dumps(index, indent=2) + "\n")
    return ckpt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="events per scenario")
    ap.add_argument("--zoo", default=os.environ.get("FEDMERGE_ZOO", str(ROOT / "assets" / "zoo")))
    ap.add_argument("--per-task", type=int, default=0,
                    help="prompts per task in the outputs table (default: the app's own, one per task)")
    ap.add_argument("--gpt2", action="store_true",
                    help="use bench/_work/ckpt-1x (GPT-2-small shape, made if missing) as a 4-task zoo")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.gpt2:
        args.zoo = str(gpt2_zoo())
    from gradio_client import Client

    from app import live_args
    from evaluation.session import default_prompts, default_threads, read_zoo

    specs = [s for s in read_zoo(args.zoo)[1] if not s.variant_of]
    names = [s.name for s in specs]
    prompts = "\n".join(default_prompts([s.task for s in specs], args.per_task)) if args.per_task else ""
    k = len(names)
    port = _port()
    env = {**os.environ, "FEDMERGE_ZOO": str(Path(args.zoo).resolve()), "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(ROOT / "bench" / "_work" / "app_latency.log", "w"))
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                client = Client(url, verbose=False, download_files=False)
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise SystemExit("the app did not start")
        client.predict(*live_args(weights=[1.0] * k, prompts=prompts), api_name="/live")  # warm-up: references cached
        scenarios = {
            "coefficient slider (task_arithmetic)": lambda i: live_args(weights=[1.0 - 0.05 * (i % 20)] + [1.0] * (k - 1), prompts=prompts),
            "λ slider (task_arithmetic)": lambda i: live_args(lam=0.05 + 0.05 * (i % 40), weights=[1.0] * k, prompts=prompts),
            "coefficient slider (fedgma, rho 0.5)": lambda i: live_args("fedgma", 1.0, [1.0 - 0.05 * (i % 20)] + [1.0] * (k - 1), {"rho": 0.5}, prompts=prompts),
            "coefficient slider (ties, density 0.5)": lambda i: live_args("ties", 1.0, [1.0 - 0.05 * (i % 20)] + [1.0] * (k - 1), {"density": 0.5}, prompts=prompts),
        }
        rows = []
        for label, make in scenarios.items():
            client.predict(*make(0), api_name="/live")
            times = []
            for i in range(1, args.n + 1):
                t0 = time.perf_counter()
                out = client.predict(*make(i), api_name="/live")
                times.append((time.perf_counter() - t0) * 1000)
                assert "⚠️" not in out[-1], out[-1]
            times.sort()
            p50 = statistics.median(times)
            p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
            rows.append((label, p50, p95))
            print(f"{label:45s} p50 {p50:6.0f} ms   p95 {p95:6.0f} ms")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    if not args.no_append:
        cmd = "python bench/app_latency.py " + " ".join(sys.argv[1:])
        text = [f"\n## App latency: slider event → updated outputs + scores ({datetime.now(timezone.utc):%Y-%m-%d})\n",
                f"`{cmd.strip()}` — gradio_client round trips to `python app.py` (127.0.0.1), zoo `{Path(args.zoo).name}`, "
                f"{k} fine-tunes, {len(prompts.splitlines()) or k} prompts, app torch threads "
                f"{default_threads(args.zoo)}, {args.n} events per row; each event merges, scores the live validation subset "
                f"(FEDMERGE_LIVE_N={os.environ.get('FEDMERGE_LIVE_N', '12')} per task) and regenerates the prompts table. "
                f"2-core CPU machine, shared with other jobs.\n",
                "| event | p50 | p95 |", "|---|---|---|"]
        text += [f"| {label} | {p50:.0f} ms | {p95:.0f} ms |" for label, p50, p95 in rows]
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
