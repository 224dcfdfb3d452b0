"""The seeds of the random masks (DARE's drop, DELLA's magnitude-ranked drop).

A merge's `seed` is mixed with the tensor's name, then with the task's index, so every tensor and
task draws its own stream, reproducibly (no dependence on Python's hash randomization or on the
order tensors are merged in).
"""
from __future__ import annotations

import zlib


def tensor_seed(seed: int, tensor_name: str) -> int:
    """The seed of one tensor's masks: the merge's seed mixed with the tensor name (CRC-32)."""
    return (seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**31 - 1)


def task_seed(seed: int, task: int) -> int:
    """The 64-bit seed of one task's mask in one tensor (`seed` is already the tensor's)."""
    return (seed * 0x100000001B3 + task + 1) % 2**64
