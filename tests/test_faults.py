"""Faults: a merge killed midway leaves no folder that looks complete, and running it again works."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from merging import Checkpoint, TaskVectorStack, load_source, merge_state_dicts
from tests.conftest import ROOT, save_model, tiny_config


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """A base and two fine-tunes big enough (about 50 MB each) that a merge takes a moment."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config(vocab=4000, n_embd=512, n_layer=4))
    paths = [save_model(base, root / "base")]
    for i in range(2):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        paths.append(save_model(base, root / f"ft{i}"))
    return paths


def test_killed_merge_leaves_nothing_complete_and_rerun_succeeds(wide_models, tmp_path):
    base, *fts = wide_models
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base),
                                   "models": [{"model": str(f)} for f in fts], "parameters": {"density": 0.3}}))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "merging", "merge", str(cfg), str(out), "--no-progress", "--shard-size", "10MB"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.partial-") and any(p.iterdir())
                                             for p in tmp_path.iterdir() if p.is_dir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the merge finished before it could be killed"
    assert not out.exists()  # only a hidden .out.partial-* folder may remain
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()


def test_sigterm_mid_merge_cleans_up_like_ctrl_c(wide_models, tmp_path):
    """SIGTERM (what `kill`, systemd and container runtimes send) removes the temporary folder and
    says so in one line, as Ctrl-C does; exit status 128 + 15."""
    base, *fts = wide_models
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base),
                                   "models": [{"model": str(f)} for f in fts], "parameters": {"density": 0.3}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "merging", "merge", str(cfg), str(tmp_path / "out"), "--no-progress",
           "--shard-size", "10MB"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.partial-") and any(p.iterdir())
                                             for p in tmp_path.iterdir() if p.is_dir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == "error: terminated; no output was written", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]


def test_zero_task_vector_and_duplicate_model_warn(tiny_zoo):
    stack = TaskVectorStack(Checkpoint(tiny_zoo["base"]),
                            [load_source(tiny_zoo["base"]), load_source(tiny_zoo["ft0"]), load_source(tiny_zoo["ft0"])])
    text = " ".join(stack.warnings)
    assert "identical to the base" in text and "base" in text
    assert "the same model as" in text
    # still merges: the zero task vector simply contributes nothing
    sd = {k: Checkpoint(tiny_zoo["base"]).get(k) for k in stack.names}
    out = merge_state_dicts(sd, [sd], "task_arithmetic")
    assert all(torch.equal(out[k], sd[k]) for k in sd)
