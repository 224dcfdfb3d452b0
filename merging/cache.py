"""A process-wide, memory-bounded LRU cache of loaded task-vector stacks and base models.

The live app lets many users merge at once. Reading the same checkpoints for each of them
would multiply both load time and memory, so the expensive, read-only objects live here:

* `TaskVectorStack`s, keyed by the resolved paths of (base, fine-tune 1, …, fine-tune K);
* base model objects (a template each session deep-copies into its own `LiveModel`) and their
  tokenizers, keyed by the base's path.

Before anything is read, the stack's size is estimated from the safetensors headers
(`merging.live.estimate_stack_bytes`); a selection that cannot fit the budget is refused with a
`MergeError` naming the models, and least-recently-used entries are evicted to make room
otherwise. Evicting only drops the cache's reference: sessions still holding a stack keep it
alive until they are freed.

Stacks live on the cache's `device`: FEDMERGE_DEVICE (cpu, cuda, cuda:N, auto), default auto (a
GPU when torch sees one). The budget then counts that device's memory.
"""
from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checkpoints import Checkpoint
from .device import resolve_device
from .errors import MergeError
from .progress import Progress
from .live import TaskVectorStack, estimate_stack_bytes
from .task_vectors import load_source


DEFAULT_BUDGET = int(float(os.environ.get("FEDMERGE_CACHE_GB", "4")) * 2 ** 30)


class BytesLRU:
    """A thread-safe dict bounded by an estimate of its bytes; least recently used entries go first.

    For small process-wide caches keyed by user input (reference outputs of typed prompts), which
    must not grow with the number of users. `size(key, value)` estimates one entry's bytes.
    """

    def __init__(self, budget_bytes: int, size: Callable[[Any, Any], int]):
        self.budget = int(budget_bytes)
        self._size = size
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used = 0
        self.evictions = 0

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key][0]

    def put(self, key, value) -> None:
        n = int(self._size(key, value))
        with self._lock:
            if key in self._data:
                self.used -= self._data.pop(key)[1]
            if n > self.budget:
                return
            self._data[key] = (value, n)
            self.used += n
            while self.used > self.budget:
                _, (_, m) = self._data.popitem(last=False)
                self.used -= m
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.used = 0


def _fmt(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class StackCache:
    """LRU of TaskVectorStacks (and base models) under one byte budget; thread-safe."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET, device: torch.device | str | None = None):
        self.budget = int(budget_bytes)
        self._device = None if device is None else torch.device(device)
        self._stacks: OrderedDict[tuple, TaskVectorStack] = OrderedDict()
        self._models: OrderedDict[str, tuple[Any, Any, int]] = OrderedDict()  # path -> (model, tokenizer, bytes)
        self._lock = threading.RLock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    @property
    def device(self) -> torch.device:
        """Where stacks and session models live (resolved at first use: a bad FEDMERGE_DEVICE is a MergeError)."""
        if self._device is None:
            self._device = resolve_device(os.environ.get("FEDMERGE_DEVICE") or "auto")
        return self._device

    def use_device(self, device: torch.device | str) -> None:
        """Choose where stacks live (a command line's --device) before any is loaded: loaded stacks
        are not moved, so another device afterwards is refused."""
        dev = torch.device(device)
        with self._lock:
            if self._stacks and self._device is not None and dev != self._device:
                raise MergeError(f"models are already loaded on {self._device}; choose the device before loading")
            self._device = dev

    # ------------------------------------------------------------------ stacks
    @property
    def used(self) -> int:
        return sum(s.nbytes for s in self._stacks.values()) + sum(m[2] for m in self._models.values())

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._stacks)

    def get_stack(self, base_ref: str, source_refs: Sequence[str], names: Sequence[str] | None = None, *,
                  allow_hub: bool = True, allowed_roots=None, progress: Progress | None = None) -> TaskVectorStack:
        """The stack of `source_refs` over `base_ref`, loaded once and shared read-only."""
        if not source_refs:
            raise MergeError("select at least one fine-tuned model")
        opts = dict(allow_hub=allow_hub, allowed_roots=allowed_roots)
        base = Checkpoint(base_ref, **opts)
        names = list(names) if names is not None else [None] * len(source_refs)
        sources = []
        for ref, name in zip(source_refs, names):
            try:
                sources.append(load_source(ref, name, **opts))
            except MergeError as exc:
                msg = str(exc)
                raise MergeError(msg if str(ref) in msg or (name and name in msg) else f"{name or ref}: {msg}") from None
        key = (str(base.path), *(str(getattr(s, "path", None) or s.checkpoint.path) for s in sources),
               tuple(s.name for s in sources))
        with self._lock:
            if key in self._stacks:
                self._stacks.move_to_end(key)
                self.hits += 1
                return self._stacks[key]
            gate = self._loading.setdefault(key, threading.Lock())
        try:
            with gate:  # two sessions asking for the same selection load it once
                return self._load_stack(key, base, sources, progress)
        finally:
            with self._lock:
                self._loading.pop(key, None)  # also after a refusal: the dict stays bounded

    def _load_stack(self, key, base, sources, progress) -> TaskVectorStack:
        with self._lock:
            if key in self._stacks:
                self._stacks.move_to_end(key)
                self.hits += 1
                return self._stacks[key]
        need = estimate_stack_bytes(base, sources)
        if need > self.budget:
            raise MergeError(
                f"this selection needs about {_fmt(need)} of memory for its task vectors "
                f"({base.name} + {', '.join(s.name for s in sources)}), more than this app's budget of "
                f"{_fmt(self.budget)}; select fewer or smaller models")
        with self._lock:
            self._evict_for(need)
        stack = TaskVectorStack(base, sources, progress=progress, device=self.device)  # MergeError if incompatible
        with self._lock:
            self.misses += 1
            self._stacks[key] = stack
            self._evict_for(0)
        return stack

    def _evict_for(self, need: int, keep_model: str | None = None) -> None:
        """Drop least-recently-used stacks, then base-model templates (not `keep_model`), until `need` fits."""
        while self.used + need > self.budget:
            if self._stacks:
                self._stacks.popitem(last=False)
            elif any(k != keep_model for k in self._models):
                self._models.pop(next(k for k in self._models if k != keep_model))
            else:
                return

    def clear(self) -> None:
        with self._lock:
            self._stacks.clear()
            self._models.clear()

    # ------------------------------------------------------------------ base models
    def base_model(self, base_ref: str | os.PathLike, *, allow_hub: bool = True, allowed_roots=None):
        """(template model, tokenizer) for a base; callers deep-copy the template (`own_model`)."""
        path = str(Checkpoint(base_ref, allow_hub=allow_hub, allowed_roots=allowed_roots).path)
        with self._lock:
            if path not in self._models:
                model, tokenizer = _load_model(path)
                nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
                self._models[path] = (model, tokenizer, nbytes)
                self._evict_for(0, keep_model=path)
            self._models.move_to_end(path)
            model, tokenizer, _ = self._models[path]
            return model, tokenizer

    def own_model(self, base_ref: str | os.PathLike, **opts):
        """A private copy of the base model (for one session's LiveModel) and the shared tokenizer."""
        template, tokenizer = self.base_model(base_ref, **opts)
        return copy.deepcopy(template), tokenizer


def _load_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "activation_function", None) == "gelu_new":
            # the same tanh-approximated GELU as one fused op: transformers' gelu_new is six
            # elementwise passes, a quarter of a decoding step of GPT-2 on the CPU
            config.activation_function = "gelu_pytorch_tanh"
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype="float32")
    except Exception as exc:  # unknown architecture, broken config: one line for the user
        raise MergeError(f"{Path(path).name}: cannot load it as a causal language model "
                         f"({str(exc).splitlines()[0][:200]})") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise MergeError(f"{Path(path).name}: has no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


CACHE = StackCache()
