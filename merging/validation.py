"""Checks that run before any weight is read: same architecture, tensors, shapes, vocabulary.

Each failure names the model and the first mismatching tensors; harmless oddities (a model twice,
an adapter that touches nothing) come back as warnings.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import MergeError

_SHOWN = 3


def _vocab(cfg: dict) -> int | None:
    v = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return v


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(list(keys)[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_compatible(base, sources) -> list[str]:
    """Raise MergeError on the first incompatible source; return warnings."""
    from .task_vectors import FullFinetune, LoraAdapter

    warnings: list[str] = []
    base_keys = [k for k in base.keys() if base.is_float(k)]
    if not base_keys:
        raise MergeError(f"{base.ref}: the base model has no floating-point tensors")
    base_arch = base.config.get("architectures"), base.config.get("model_type")
    seen: dict[str, str] = {}
    for src in sources:
        if isinstance(src, FullFinetune):
            ck = src.checkpoint
            where = getattr(ck, "identity", None) or str(ck.path)  # a model+adapter is not the model
            if where in seen:
                warnings.append(f"{src.name}: the same model as {seen[where]} (it counts twice)")
            seen[where] = src.name
            arch = ck.config.get("architectures"), ck.config.get("model_type")
            if base.config and ck.config and arch != base_arch and arch[1] != base_arch[1]:
                raise MergeError(f"{src.name}: architecture {arch[1] or arch[0]} does not match the base's "
                                 f"{base_arch[1] or base_arch[0]}")
            vb, vm = _vocab(base.config), _vocab(ck.config)
            if vb is not None and vm is not None and vb != vm:
                raise MergeError(f"{src.name}: vocabulary size {vm} differs from the base's {vb}")
            keys = set(k for k in ck.keys() if ck.is_float(k))
            missing = [k for k in base_keys if k not in keys]
            extra = sorted(keys - set(base_keys))
            heads = [k for k in missing + extra if k.endswith("lm_head.weight")]
            if heads and len(missing) + len(extra) == 1:  # the only difference: one ties its head, the other not
                tied, untied = ("the base", src.name) if extra else (src.name, "the base")
                raise MergeError(f"{src.name}: {untied} has its own output head ({heads[0]}) where {tied} ties it to "
                                 "the input embedding (tie_word_embeddings): they cannot be merged tensor by tensor "
                                 "(mergekit does not merge it either)")
            if missing:
                raise MergeError(f"{src.name}: missing tensors {_names(missing)} that the base has")
            if extra:
                raise MergeError(f"{src.name}: unknown tensors {_names(extra)} that the base does not have")
            bad = [k for k in base_keys if ck.shape(k) != base.shape(k)]
            if bad:
                k = bad[0]
                if len(ck.shape(k)) == 2 and ck.shape(k)[1] == base.shape(k)[1] and ("emb" in k or "wte" in k or "lm_head" in k):
                    raise MergeError(f"{src.name}: different vocabulary sizes: {k} has {ck.shape(k)[0]} rows, "
                                     f"the base {base.shape(k)[0]}")
                raise MergeError(f"{src.name}: shape mismatch in {len(bad)} tensor(s), first {k}: "
                                 f"{tuple(ck.shape(k))} vs the base's {tuple(base.shape(k))}")
        elif isinstance(src, LoraAdapter):
            src.bind(base)  # a tied head's update goes to the embedding the base holds; PEFT's layer orientation
            targets = src.targets()
            unknown = [k for k in targets if k not in base]
            if unknown:
                raise MergeError(f"{src.name}: the adapter targets tensors the base does not have: {_names(unknown)}")
            if not targets:
                warnings.append(f"{src.name}: the adapter changes no tensor")
    return warnings


def check_finite(name: str, tensor: torch.Tensor, owner: str) -> None:
    """Non-finite weights poison every merge that touches them: refuse, naming the tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeError(f"{owner}: tensor {name} has {bad} non-finite value(s) (NaN or inf)")
