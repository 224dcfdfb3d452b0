"""Shared helpers of the benchmarks: the work folder, timed subprocesses with peak RSS, the mergekit
venv, a free port, and the one way results are appended to bench/RESULTS.md (`--no-record` skips it)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
RESULTS = ROOT / "bench" / "RESULTS.md"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"


def work_dir(*parts: str) -> Path:
    """bench/_work (git-ignored, so a fresh clone has none) or a folder under it, created if missing."""
    path = WORK.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Starts the measured command from a small, fresh interpreter and reports its wait4 ru_maxrss.
# Measuring from the benchmark process itself is wrong: Linux starts a child's ru_maxrss at its
# parent's peak RSS (subprocess forks with vfork, and exec keeps the old memory's high-water mark),
# so every tool run after the benchmark had loaded two merged models for comparison reported at
# least that much (seen here: 1.0 GB merges reported as 2.3 GB).
_LAUNCHER = ("import os, sys\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    os.execvp(sys.argv[2], sys.argv[2:])\n"
             "_, status, usage = os.wait4(pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> tuple[float, float, int]:
    """Run `cmd` to completion: (wall seconds, peak RSS in MiB, exit status).

    Peak RSS is the kernel's ru_maxrss of the command as reported by wait4 (what `/usr/bin/time -v`
    prints), taken by a small launcher process (see _LAUNCHER): exact, not sampled, and measured the
    same way for every tool.
    """
    out = open(log, "w") if log else subprocess.DEVNULL
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        try:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _LAUNCHER, rss.name, *cmd], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
            wall = time.perf_counter() - t0
        finally:
            if log:
                out.close()
        text = Path(rss.name).read_text().strip()
    return wall, (int(text) / 1024 if text else float("nan")), proc.returncode


def mergekit_venv() -> Path:
    """$MERGEKIT_VENV, else /opt/mergekit-venv, else bench/_work/mergekit-venv (created if missing)."""
    for cand in (os.environ.get("MERGEKIT_VENV"), "/opt/mergekit-venv", str(WORK / "mergekit-venv")):
        if cand and (Path(cand) / "bin" / "mergekit-yaml").exists():
            return Path(cand)
    venv = WORK / "mergekit-venv"
    print(f"creating {venv} (mergekit {MERGEKIT_VERSION}, torch {TORCH_VERSION}; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"torch=={TORCH_VERSION}",
                    f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return venv


def mergekit_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", CUDA_VISIBLE_DEVICES="")
    return env


def ours_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def machine() -> str:
    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}"


def best_of(fn, repeat: int = 1):
    """(shortest wall time of `repeat` calls of `fn`, the last call's result)."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def zoo_session():
    """An evaluation Session on the zoo (assets/zoo or FEDMERGE_ZOO), loaded: what the evaluation
    benchmarks measure on."""
    from evaluation.session import Session

    session = Session()
    session.load_zoo()
    return session


def add_record_flag(ap) -> None:
    """Every benchmark's opt-out of bench/RESULTS.md."""
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")


def append_results(title: str, command: list[str] | str, body: str) -> None:
    """Append one section to bench/RESULTS.md: title, date, machine, the command, then `body` (markdown)."""
    cmd = command if isinstance(command, str) else " ".join(shlex.quote(c) for c in command)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the scripts in bench/ (see bench/README.md).\n")
        f.write(f"\n## {title} ({stamp})\n\nMachine: {machine()}\n\n```\n{cmd}\n```\n\n{body.rstrip()}\n")
