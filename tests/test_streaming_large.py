"""The streaming merge of a tensor whose stack is larger than the engine's read-ahead limit.

merging/engine.py reads a tensor's stack ahead on a second thread only when it is at most
256 MiB (K+1 float32 copies); larger stacks are read synchronously into one reused buffer. That
limit has no public setting, so this test builds a real tensor over it (22.5M entries, K = 2:
270 MB of stack) between two small tensors that are read ahead, and checks the merged values.
Slow (about 0.3 GB of files, 1 GB of memory at peak).
"""
from __future__ import annotations

import pytest
import torch

from merging import Checkpoint, FullFinetune, plan_from_objects
from merging.engine import merge_to_dir
from tests.conftest import load_sd

pytestmark = pytest.mark.slow

BIG = 22_500_000  # 4 bytes × 3 × BIG = 270 MB > 256 MiB
WEIGHTS, LAM = [0.5, 1.0], 0.8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("large")
    g = torch.Generator().manual_seed(0)
    base = {"a.small": torch.randn(40, 30, generator=g), "b.big": torch.randn(BIG, generator=g),
            "c.small": torch.randn(64, generator=g)}
    paths = [root / "base.safetensors"]
    save_file(base, paths[0])
    for i in range(2):
        paths.append(root / f"ft{i}.safetensors")
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[-1])
    return paths


def plan(files, method, weights, lam):
    return plan_from_objects(Checkpoint(files[0]), [FullFinetune(Checkpoint(f)) for f in files[1:]], method,
                             weights, lam)


@pytest.mark.parametrize("method,weights,lam", [
    ("task_arithmetic", WEIGHTS, LAM),  # θ₀ + λΣwᵢτᵢ: base and task vectors in the reused buffer
    ("linear", [0.25, 0.75], 1.0),      # the normalised soup Σcᵢθᵢ: the models themselves, no base read
])
def test_stack_over_the_read_ahead_limit_merges_right(files, tmp_path, method, weights, lam):
    out = load_sd(merge_to_dir(plan(files, method, weights, lam), tmp_path / "out"))
    base, *fts = (load_sd_file(f) for f in files)
    assert list(out) == ["a.small", "b.big", "c.small"]
    for k, b in base.items():
        if method == "linear":
            want = sum(w * ft[k] for w, ft in zip(weights, fts)) / sum(weights)
        else:
            want = b + lam * sum(w * (ft[k] - b) for w, ft in zip(weights, fts))
        torch.testing.assert_close(out[k], want, rtol=0, atol=2e-6, msg=k)


def load_sd_file(path):
    from safetensors.torch import load_file

    return load_file(path)
