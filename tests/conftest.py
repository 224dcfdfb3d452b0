"""Shared fixtures: tiny real GPT-2 checkpoints written with transformers' own save_pretrained."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.shipped_app"]  # the app on the shipped zoo (fixture shipped_url)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("FEDMERGE_DEVICE", "cpu")  # the suite runs on the CPU; tests/test_device.py checks device code

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(vocab: int = 40, n_embd: int = 16, n_layer: int = 2):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_model(model, folder: Path, training: dict | None = None) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    if training is not None:
        (folder / "training.json").write_text(json.dumps(training))
    return folder


def perturbed(base, seed: int, scale: float = 0.02):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(base.config)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def tiny_models(root: Path, seed: int, ft_seeds: list[int], training: list[dict] | None = None) -> dict[str, Path]:
    """A tiny GPT-2 base (from `seed`) and one random perturbation of it per seed in `ft_seeds`,
    saved as base/, ft0/, ft1/, ... (with training.json where `training` gives one)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(tiny_config()).eval()
    paths = {"base": save_model(base, root / "base")}
    for i, s in enumerate(ft_seeds):
        paths[f"ft{i}"] = save_model(perturbed(base, seed=s), root / f"ft{i}", training[i] if training else None)
    return paths


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and three fine-tunes (random perturbations) of a tiny GPT-2, on disk."""
    return tiny_models(tmp_path_factory.mktemp("tinyzoo"), 0, [10, 11, 12],
                       [{"task": f"t{i}", "steps": steps, "learning_rate": 1e-3 * (i + 1)}
                        for i, steps in enumerate([100, 200, 400])])


def build_tiny_zoo(tmp_path_factory) -> Path:
    """A zoo built by the real recipe at its tiny size, once per test run, shared by the files that need one."""
    from dataclasses import replace

    from evaluation.zoo import TINY, build_zoo

    root = tmp_path_factory.getbasetemp() / "app-tiny-zoo"
    if not (root / "zoo.json").exists():
        build_zoo(root, replace(TINY, workers=1), log=lambda *a: None, write_readme=False)
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(zoo: Path):
    """Generator: the real app (app.build_demo) on `zoo`, on a free 127.0.0.1 port; yields its URL."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDMERGE_ZOO", str(zoo))
    import app

    demo = app.build_demo()
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.look())
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app over a tiny zoo built by the recipe."""
    yield from serve_app(build_tiny_zoo(tmp_path_factory))


def load_sd(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
