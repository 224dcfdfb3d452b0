"""The zoo recipe end to end on a tiny configuration (`build-zoo --tiny`): loadable folders, records."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from evaluation.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_recipe_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "zoo"
    subprocess.run([sys.executable, "-m", "evaluation", "build-zoo", "--tiny", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=120)
    zoo = json.loads((out / "zoo.json").read_text())
    folders = [zoo["base"]["folder"]] + [f["folder"] for f in zoo["finetunes"]]
    assert {f["task"] for f in zoo["finetunes"]} == set(TASKS)
    assert len(zoo["finetunes"]) > len(TASKS)  # the heterogeneous extra
    for name in folders:
        rec = json.loads((out / name / "training.json").read_text())
        assert {"task", "steps", "learning_rate", "batch_size", "seed", "train_seconds"} <= set(rec)
        if name != "base":
            assert rec["base"] == "base" and 0 <= rec["test_accuracy"] <= 1 and 0 <= rec["validation_accuracy"] <= 1
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        assert next(model.parameters()).dtype.is_floating_point and tok.pad_token_id == model.config.pad_token_id
    report = json.loads((out / "report.json").read_text())
    k = len(zoo["finetunes"])
    assert len(report["cosine"]) == k and abs(report["cosine"][0][0] - 1) < 1e-6
    assert (out / "README.md").read_text().startswith("# Built-in model zoo")


def test_tiny_recipe_is_deterministic(tmp_path):
    """Two in-process builds of the base give identical weights (fixed seeds, deterministic data)."""
    import dataclasses

    import torch

    from evaluation.zoo import TINY, pretrain

    cfg = dataclasses.replace(TINY, pretrain_steps=2)
    a, b = pretrain(cfg, log=lambda s: None), pretrain(cfg, log=lambda s: None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
