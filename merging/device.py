"""Where merges run: `--device cpu|cuda|auto` (CLI; FEDMERGE_DEVICE sets its default, cpu) and
FEDMERGE_DEVICE for the app (default auto: `merging.cache.StackCache.device`). Disk merges read
tensors on the CPU, merge them on the device and stream them back, so the device holds one tensor's
stack at a time; the app keeps its task-vector stacks and session models on the device."""
from __future__ import annotations

import os

import torch

from .errors import MergeError


def resolve_device(name: str | None = None) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when torch sees a GPU, else cpu); a clear error otherwise."""
    name = (name if name is not None else os.environ.get("FEDMERGE_DEVICE", "cpu")).strip().lower() or "cpu"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MergeError(f"device {name!r} asked for, but torch sees no CUDA GPU here: use cpu or auto")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise MergeError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
        return dev
    raise MergeError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
