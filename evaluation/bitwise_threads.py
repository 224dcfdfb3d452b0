"""Train on two threads and get one thread's bits: the zoo's pretraining runs under this.

On the CPU most of torch's kernels give the same bits whatever the thread count: matrix
products split their rows or columns, elementwise ops their elements. A few split a sum over
the reduced dimension across threads and so round differently: the backward of LayerNorm
(its weight and bias gradients) and of softmax, among the ops a GPT-2 training step uses
(measured op by op, same inputs at 1 and 2 threads; ``tests/test_zoo.py`` checks a few steps of
the recipe bit for bit, ``bench/zoo_pretrain.py`` the speed). Running only
those on one thread lets a deterministic recipe use both cores of a small machine and still
reproduce, bit for bit, the zoo that a one-thread run built.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# kernels that may split a reduction across threads (the first two do, measured; the other two
# sum over the batch too and cost little on one thread)
ONE_THREAD_OPS = frozenset({
    _aten.native_layer_norm_backward.default,
    _aten._softmax_backward_data.default,
    _aten.sum.dim_IntList,
    _aten.embedding_dense_backward.default,
})


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the context, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class OneThreadReductions(TorchDispatchMode):
    """Within this context, the ops of ``ONE_THREAD_OPS`` run on one thread, the rest on torch's threads."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ONE_THREAD_OPS:
            return func(*args, **kwargs)
        with torch_threads(1):
            return func(*args, **kwargs)
