"""Latency of the running app: slider event → updated outputs + scores (gradio_client), and in a
real browser page load → table / → plots and the requests each user action sends.

Starts `python app.py` on a free port (offline, on the zoo or FEDMERGE_ZOO), waits for it, then
moves one coefficient slider / λ / the aggregator N times via the /live endpoint (the same merge
a slider's event runs) and reports p50/p95 of the full round trip. Then (unless --no-browser)
headless Chromium loads the page --loads times on the warm server (time to the outputs table and
to the plots; the baseline is one /live round trip measured in the same run) and performs each
user action once, counting the queue requests it sends. Appends to bench/RESULTS.md.

    python bench/app_latency.py [--n 60] [--loads 5] [--zoo assets/zoo] [--per-task 1] [--no-browser] [--no-record]
                                [--device cpu|cuda]  (the app's FEDMERGE_DEVICE; default: the app's own, auto)

For the GPT-2-small-shaped run (4 synthetic fine-tunes of bench/make_checkpoints.py, each given
one zoo task, 2 prompts per task = 8 generations per event):

    python bench/app_latency.py --gpt2 --per-task 2 --n 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ROOT, WORK, add_record_flag, append_results, free_port, work_dir  # noqa: E402

GPT2_TASKS = ("reverse", "upper", "sort", "add")


def gpt2_zoo() -> Path:
    """bench/_work/ckpt-1x with a zoo.json naming one task per synthetic fine-tune."""
    import json

    ckpt = WORK / "ckpt-1x"
    if not (ckpt / "ft3" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_checkpoints.py"), "--out", str(ckpt)], check=True)
    index = {"base": {"name": "base", "folder": "base", "task": "pretrain"},
             "finetunes": [{"name": f"ft{i}", "folder": f"ft{i}", "task": t} for i, t in enumerate(GPT2_TASKS)]}
    (ckpt / "zoo.json").write_text(json.dumps(index, indent=2) + "\n")
    return ckpt


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_part(url: str, loads: int, live_ms: float) -> list[tuple[str, str]]:
    """Page load → table / → plots on the warm server, and queue requests per user action."""
    from playwright.sync_api import sync_playwright

    out: list[tuple[str, str]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        to_table, to_plots, load_requests = [], [], []
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            joins: list[str] = []
            page.on("request", lambda r, j=joins: j.append(r.url) if "queue/join" in r.url else None)
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#fm-table table", timeout=120_000)
            to_table.append(time.perf_counter() - t0)
            page.wait_for_function("document.querySelector('#fm-heat .js-plotly-plot') !== null && "
                                   "document.querySelector('#fm-acc .js-plotly-plot') !== null", timeout=120_000)
            to_plots.append(time.perf_counter() - t0)
            page.wait_for_timeout(2000)
            load_requests.append(len(joins))
            last, last_joins = page, joins
            if _ < loads - 1:
                page.close()
        page, joins = last, last_joins

        def action(label, fn):
            n, before = len(joins), page.locator("#fm-status").inner_text()
            t0 = time.perf_counter()
            fn()
            while page.locator("#fm-status").inner_text() == before and time.perf_counter() - t0 < 30:
                page.wait_for_timeout(20)
            dt = time.perf_counter() - t0
            page.wait_for_timeout(2000)
            out.append((f"{label}: requests, time to the new status", f"{len(joins) - n}, {dt * 1000:.0f} ms"))

        slider = page.locator("#fm-panel input[type=range]").first
        action("coefficient slider, key press", lambda: (slider.focus(), slider.press("ArrowLeft")))
        def drag():
            slider.scroll_into_view_if_needed()
            box = slider.bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] * 0.2, y)
            page.mouse.down()
            for i in range(10):
                page.mouse.move(box["x"] + box["width"] * (0.2 + 0.07 * i), y)
                page.wait_for_timeout(30)
            page.mouse.up()
        action("coefficient slider, mouse drag + release", drag)
        lam = page.locator("#fm-lambda input[type=range]")
        action("λ slider, key press", lambda: (lam.focus(), lam.press("ArrowRight")))
        action("model checkbox click", lambda: page.locator("#fm-models label").nth(1).click())
        first_scenario = page.locator("#fm-scenarios button").first
        if first_scenario.count():
            action("scenario button", first_scenario.click)
        browser.close()
    med = statistics.median
    out = [(f"page load → outputs table (median of {loads})", f"{med(to_table):.2f} s"),
           (f"page load → both plots (median of {loads})", f"{med(to_plots):.2f} s"),
           ("plots after the table (median)", f"{med([b - a for a, b in zip(to_table, to_plots)]):.2f} s"),
           ("page load → table ÷ one /live round trip", f"{med(to_table) * 1000 / live_ms:.1f}×"),
           ("queue requests per page load (max)", str(max(load_requests)))] + out
    for label, value in out:
        print(f"{label:60s} {value}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="events per scenario")
    ap.add_argument("--zoo", default=os.environ.get("FEDMERGE_ZOO", str(ROOT / "assets" / "zoo")))
    ap.add_argument("--per-task", type=int, default=0,
                    help="prompts per task in the outputs table (default: the app's own, one per task)")
    ap.add_argument("--gpt2", action="store_true",
                    help="use bench/_work/ckpt-1x (GPT-2-small shape, made if missing) as a 4-task zoo")
    ap.add_argument("--loads", type=int, default=5, help="page loads in the browser part")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--device", default=None, help="FEDMERGE_DEVICE for the app (default: its own, auto)")
    add_record_flag(ap)
    args = ap.parse_args()
    if args.gpt2:
        args.zoo = str(gpt2_zoo())
    from gradio_client import Client

    from evaluation.playground import live_kwargs
    from evaluation.session import default_prompts, default_threads, read_zoo

    specs = [s for s in read_zoo(args.zoo)[1] if not s.variant_of]
    names = [s.name for s in specs]
    prompts = "\n".join(default_prompts([s.task for s in specs], args.per_task)) if args.per_task else ""
    k = len(names)
    port = free_port()
    env = {**os.environ, "FEDMERGE_ZOO": str(Path(args.zoo).resolve()), "GRADIO_SERVER_PORT": str(port)}
    if args.device:
        env["FEDMERGE_DEVICE"] = args.device
    device = env.get("FEDMERGE_DEVICE", "auto")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work_dir() / "app_latency.log", "w"))
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
        client.predict(**live_kwargs(weights=[1.0] * k, prompts=prompts, selection=names), api_name="/live")  # warm-up
        scenarios = {
            "coefficient slider (task_arithmetic)": lambda i: live_kwargs(weights=[1.0 - 0.05 * (i % 20)] + [1.0] * (k - 1), prompts=prompts),
            "λ slider (task_arithmetic)": lambda i: live_kwargs(lam=0.05 + 0.05 * (i % 40), weights=[1.0] * k, prompts=prompts),
            "coefficient slider (fedgma, rho 0.5)": lambda i: live_kwargs("fedgma", 1.0, [1.0 - 0.05 * (i % 20)] + [1.0] * (k - 1), {"rho": 0.5}, prompts=prompts),
            "coefficient slider (ties, density 0.5)": lambda i: live_kwargs("ties", 1.0, [1.0 - 0.05 * (i % 20)] + [1.0] * (k - 1), {"density": 0.5}, prompts=prompts),
        }
        rows = []
        for label, make in scenarios.items():
            client.predict(**make(0), api_name="/live")
            times = []
            for i in range(1, args.n + 1):
                t0 = time.perf_counter()
                out = client.predict(**make(i), api_name="/live")
                times.append((time.perf_counter() - t0) * 1000)
                assert "⚠️" not in out[-2], out[-2]
            times.sort()
            p50 = statistics.median(times)
            p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
            rows.append((label, p50, p95))
            print(f"{label:45s} p50 {p50:6.0f} ms   p95 {p95:6.0f} ms")
        browser_rows = [] if args.no_browser else browser_part(url, args.loads, rows[1][1])
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    if not args.no_record:
        text = [f"gradio_client round trips to `python app.py` (127.0.0.1), zoo `{Path(args.zoo).name}`, "
                f"{k} fine-tunes, {len(prompts.splitlines()) or k} prompts, FEDMERGE_DEVICE {device}, app torch threads "
                f"{default_threads(args.zoo)}, {args.n} events per row; each event merges, scores the live validation subset "
                f"(FEDMERGE_LIVE_N={os.environ.get('FEDMERGE_LIVE_N', '12')} per task) and regenerates the prompts table.",
                "", "| event | p50 | p95 |", "|---|---|---|"]
        text += [f"| {label} | {p50:.0f} ms | {p95:.0f} ms |" for label, p50, p95 in rows]
        if browser_rows:
            text += ["", f"Headless Chromium on the same warm server ({args.loads} page loads; baseline: the λ-slider "
                         "/live round trip above):", "", "| measure | value |", "|---|---|"]
            text += [f"| {label} | {value} |" for label, value in browser_rows]
        append_results("App latency: slider event → updated outputs + scores",
                       ["python", "bench/app_latency.py", *sys.argv[1:]], "\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
