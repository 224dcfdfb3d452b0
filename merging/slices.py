"""mergekit's layer stacking (`slices` with passthrough) as one virtual checkpoint.

The stacked model reads its tensors from the slices' models on demand: layer j of a source slice
becomes the next output layer; the embeddings come from the first slice's model and the final norm
and head from the last one's (mergekit's pre- and post-weights). Planning and writing then treat it
like any checkpoint, so a passthrough over it writes the stacked model, its config's layer count set.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch

from .checkpoints import Checkpoint
from .errors import MergeError

_LAYER = re.compile(r"(.*?)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe")  # tensors before the layers (the rest outside the layers come after them)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(config: dict[str, Any]) -> int | None:
    for key in LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


class StackedLayers:
    """Layers [start, end) of each slice's model, in order, as one model."""

    def __init__(self, parts: Sequence[tuple[Checkpoint, int, int]]):
        first, last = parts[0][0], parts[-1][0]
        self.ref = " + ".join(f"{ck.ref}[{a}:{b}]" for ck, a, b in parts)
        self.name = "stacked layers"
        self.path = first.path
        self.folder = first.folder
        self._map: dict[str, tuple[Checkpoint, str]] = {}
        pre, post, layers = [], [], []
        out = 0
        template: dict | None = None  # the first stacked layer's tensors (name within the layer -> shape)
        where = ""
        for i, (ck, a, b) in enumerate(parts):
            n = layer_count(ck.config)
            if n is None or not 0 <= a < b <= n:
                raise MergeError(f"slices[{i}]: layer_range [{a}, {b}] is outside {ck.ref}'s {n} layers")
            by_layer: dict[int, list[tuple[str, str, str]]] = {}
            for name in ck.keys():
                m = _LAYER.match(name)
                if m:
                    by_layer.setdefault(int(m.group(2)), []).append((m.group(1), name[m.end():], name))
            for j in range(a, b):
                signature = {(prefix, rest): ck.shape(name) for prefix, rest, name in by_layer.get(j, [])}
                if template is None:
                    template, where = signature, f"{ck.ref} layer {j}"
                elif signature != template:  # layers of another width or kind cannot sit in one model
                    diff = sorted(set(signature.items()) ^ set(template.items()), key=str)[0]
                    raise MergeError(f"slices[{i}]: layer {j} of {ck.ref} does not match {where}: "
                                     f"{diff[0][0]}.*.{diff[0][1]} {tuple(signature.get(diff[0], ()))} vs "
                                     f"{tuple(template.get(diff[0], ()))}")
                for prefix, rest, name in by_layer.get(j, []):
                    key = f"{prefix}.{out}.{rest}"
                    self._map[key] = (ck, name)
                    layers.append(key)
                out += 1
        for ck, bucket, want_pre in ((first, pre, True), (last, post, False)):
            for name in ck.keys():
                if not _LAYER.match(name) and any(p in name for p in _PRE) == want_pre:
                    if not want_pre and name in first and first.shape(name) != ck.shape(name):
                        raise MergeError(f"slices: {name} of {ck.ref} has shape {tuple(ck.shape(name))}, "
                                         f"{first.ref}'s {tuple(first.shape(name))}")
                    self._map[name] = (ck, name)
                    bucket.append(name)
        self._keys = pre + layers + post
        self.config = dict(first.config)
        for key in LAYER_KEYS:
            if key in self.config:
                self.config[key] = out
        self.training: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._map

    def _src(self, key: str) -> tuple[Checkpoint, str]:
        if key not in self._map:
            raise MergeError(f"stacked model: no tensor {key}")
        return self._map[key]

    def shape(self, key: str) -> tuple[int, ...]:
        ck, name = self._src(key)
        return ck.shape(name)

    def dtype(self, key: str) -> torch.dtype:
        ck, name = self._src(key)
        return ck.dtype(name)

    def is_float(self, key: str) -> bool:
        ck, name = self._src(key)
        return ck.is_float(name)

    def get(self, key: str) -> torch.Tensor:
        ck, name = self._src(key)
        return ck.get(name)

    def side_files(self, names: Iterable[str]):
        return [self.folder / n for n in names if (self.folder / n).is_file()]
