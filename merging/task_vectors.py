"""Task vectors τ = θ − θ₀, tensor by tensor, from full fine-tunes or from LoRA adapters.

A source answers `delta(name, base_tensor)` in float32 without materialising the whole model;
a LoRA adapter gives the exact ΔW = scale·B·A (rsLoRA: α/√r), zero for tensors it leaves alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from .checkpoints import Checkpoint, _read_json, read_bin, read_training_metadata, resolve
from .errors import MergeError


class TaskVectorSource(Protocol):
    name: str

    @property
    def training(self) -> dict[str, Any]: ...

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor: ...


class FullFinetune:
    """A fine-tuned checkpoint of the base architecture: τ = θ − θ₀."""

    def __init__(self, checkpoint: Checkpoint, name: str | None = None):
        self.checkpoint = checkpoint
        self.name = name or checkpoint.name

    @property
    def training(self) -> dict[str, Any]:
        return self.checkpoint.training

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.get(key).float() - base


class LoraAdapter:
    """A PEFT LoRA adapter on the base: τ = ΔW, exactly, for every adapted weight."""

    def __init__(self, ref: str | os.PathLike, name: str | None = None, *, allow_hub: bool = True,
                 allowed_roots=None):
        self.path = resolve(ref, allow_hub=allow_hub, allowed_roots=allowed_roots)
        folder = self.path if self.path.is_dir() else self.path.parent
        self.folder = folder
        self.name = name or Path(str(ref)).name
        cfg_path = folder / "adapter_config.json"
        if not cfg_path.exists():
            raise MergeError(f"{ref}: not a PEFT adapter (no adapter_config.json)")
        self.config = _read_json(cfg_path)
        alpha, patterns = self.config.get("lora_alpha", 8), self.config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in [alpha, *patterns.values()]):
            raise MergeError(f"{cfg_path}: lora_alpha and alpha_pattern must be numbers "
                             f"(got lora_alpha={alpha!r}, alpha_pattern={patterns!r})"[:300])
        if self.config.get("peft_type", "LORA") != "LORA":
            raise MergeError(f"{ref}: only LoRA adapters are supported, not {self.config.get('peft_type')}")
        if self.config.get("use_dora"):
            raise MergeError(f"{ref}: DoRA adapters are not supported (their update is not B·A)")
        weights = folder / "adapter_model.safetensors"
        if weights.exists():
            with safe_open(weights, framework="pt") as f:
                self._tensors = {k: f.get_tensor(k) for k in f.keys()}
        elif (folder / "adapter_model.bin").exists():
            self._tensors = read_bin(folder / "adapter_model.bin")
        else:
            raise MergeError(f"{ref}: no adapter_model.safetensors")
        self._by_target = self._group()
        self._conv1d: dict[str, bool] | None = None  # module -> stored (in, out) (bind)

    @property
    def training(self) -> dict[str, Any]:
        return read_training_metadata(self.folder)

    def _group(self) -> dict[str, dict[str, torch.Tensor]]:
        """Map base tensor names to their A and B (or full replacement) tensors."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self._tensors.items():
            k = re.sub(r"^base_model\.model\.", "", key)
            m = re.match(r"(.*)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight$", k) or \
                re.match(r"(.*)\.lora_(embedding_A|embedding_B)(?:\.[^.]+)?$", k)
            if m:
                module, part = m.group(1), m.group(2)
                group = groups.setdefault(module + ".weight", {})
                group["module"], group[part] = module, t
            elif ".base_layer." in k:  # the module's own weight, saved beside its A and B (embedding layers)
                groups.setdefault(k.replace(".base_layer.", "."), {})["base_layer"] = t
            elif ".modules_to_save." in k or not re.search(r"lora_", k):
                target = re.sub(r"\.modules_to_save\.[^.]+", "", k)
                groups.setdefault(target, {})["full"] = t
        return groups

    def targets(self) -> list[str]:
        return list(self._by_target)

    def adapts(self, key: str) -> bool:
        return key in self._by_target

    def bind(self, base) -> None:
        """Read the adapter against the model it applies to: a tied head's update goes to the embedding
        (follow_ties), and each layer's orientation is PEFT's (a GPT-2 Conv1D stores its weight (in, out):
        fan_in_fan_out; an nn.Linear not), which the saved config's single flag does not say for an
        adapter over both kinds (PEFT overwrites it per layer, and saves the last value)."""
        self.follow_ties(base)
        if self._conv1d is None and any("A" in g for g in self._by_target.values()):
            self._conv1d = _conv1d_modules(getattr(base, "config", None) or {})

    def follow_ties(self, base) -> None:
        """An adapter of a tied output head (lm_head.weight, which the base's files do not hold: it is the
        input embedding): its update goes to the embedding, which PEFT's merge_and_unload changes through
        the shared tensor. Refused where the adapter changes the embedding itself too."""
        for key in [k for k in self._by_target if k not in base and k.endswith("lm_head.weight")]:
            group = self._by_target[key]
            own = group.get("full", group.get("base_layer"))
            rows = own.shape[0] if own is not None else group["B"].shape[0] if "B" in group else None
            tied = [k for k in base.keys() if ("embed" in k or "wte" in k) and k.endswith(".weight")
                    and base.is_float(k) and len(base.shape(k)) == 2 and base.shape(k)[0] == rows]
            if len(tied) != 1:
                continue  # no single embedding it can be tied to: refused as an unknown target
            if tied[0] in self._by_target:
                raise MergeError(f"{self.name}: adapts both {key} and {tied[0]}, which the base ties into one "
                                 "tensor; merging both updates into it is not supported")
            self._by_target[tied[0]] = self._by_target.pop(key)

    def _scale(self, module: str, rank: int) -> float:
        alpha = self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):  # the first match wins, as in PEFT's get_pattern_key
                alpha = value
                break
        r = rank
        return alpha / (r ** 0.5) if self.config.get("use_rslora") else alpha / r

    def applied(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with this adapter merged in, as peft's merge_and_unload: W + ΔW in W's dtype (ΔW
        computed in float32), or the adapter's full weight where it saves one."""
        group = self._by_target.get(key)
        if group is None or not weight.is_floating_point():
            return weight
        self._check_shape(key, group, weight.shape)
        if "full" in group:
            return group["full"].to(weight.dtype)
        if "base_layer" in group:
            weight = group["base_layer"].to(weight.dtype)
        return weight + self._update(key, group, weight.shape).to(weight.dtype)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        group = self._by_target.get(key)
        if group is None:
            return torch.zeros_like(base, dtype=torch.float32)
        self._check_shape(key, group, base.shape)
        if "full" in group:
            return group["full"].float() - base
        dw = self._update(key, group, base.shape)
        if "base_layer" in group:  # the weight PEFT merges into: a zero difference where it is the base's own
            dw = dw + (group["base_layer"].float() - base)
        return dw

    def _check_shape(self, key: str, group: dict, shape) -> None:
        own = group.get("full", group.get("base_layer"))
        if own is not None and tuple(own.shape) != tuple(shape):
            raise MergeError(f"{self.name}: adapter weight for {key} has shape {tuple(own.shape)}, "
                             f"the model's {tuple(shape)}")

    def _update(self, key: str, group: dict, shape) -> torch.Tensor:
        """ΔW = scale·B·A of one adapted weight, in float32."""
        if "A" in group and "B" in group:
            a, b = group["A"].float(), group["B"].float()
            dw = b @ a
            conv1d = self._conv1d.get(group["module"]) if self._conv1d else None
            if conv1d if conv1d is not None else self.config.get("fan_in_fan_out"):
                dw = dw.T
        elif "embedding_A" in group and "embedding_B" in group:
            a, b = group["embedding_A"].float(), group["embedding_B"].float()
            dw = (b @ a).T
        else:
            raise MergeError(f"{self.name}: adapter is missing lora_A or lora_B for {key}")
        dw = dw * self._scale(group["module"], a.shape[0])
        if tuple(dw.shape) != tuple(shape) and tuple(dw.T.shape) == tuple(shape):  # not bound: the shape tells
            dw = dw.T
        if tuple(dw.shape) != tuple(shape):
            raise MergeError(f"{self.name}: adapter update for {key} has shape {tuple(dw.shape)}, "
                             f"the base tensor {tuple(shape)}")
        return dw


def _conv1d_modules(config: dict) -> dict[str, bool] | None:
    """Which modules of the model `config` describes store their weight transposed (transformers' Conv1D,
    GPT-2's): module name -> True for Conv1D, False for other modules; None where the architecture is
    not one transformers builds (then the adapter's fan_in_fan_out flag is used)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # an unknown or custom architecture
        return None
    return {name: isinstance(m, Conv1D) for name, m in model.named_modules() if hasattr(m, "weight")}


class LoraApplied:
    """A model with a LoRA adapter merged into it, read tensor by tensor: mergekit's `model+adapter` for
    a model other than the base (which peft's merge_and_unload writes before merging): θ + ΔW in the
    model's dtype, the adapter's full weights (modules_to_save) in place of the model's."""

    def __init__(self, checkpoint: Checkpoint, adapter: LoraAdapter, adapter_ref: str):
        from .validation import _names

        self.checkpoint, self.adapter = checkpoint, adapter
        self.ref = f"{checkpoint.ref}+{adapter_ref}"
        self.name = f"{checkpoint.name}+{adapter.name}"
        self.identity = f"{checkpoint.path}+{adapter.path}"  # not the same model as the checkpoint alone
        self.path, self.folder, self.config = checkpoint.path, checkpoint.folder, checkpoint.config
        self._last: tuple[str, torch.Tensor] | None = None  # the adapted tensor whose blocks are being read
        adapter.bind(checkpoint)
        unknown = [k for k in adapter.targets() if k not in checkpoint]
        if unknown:
            raise MergeError(f"{self.ref}: the adapter targets tensors {checkpoint.name} does not have: "
                             f"{_names(unknown)}")

    @property
    def training(self) -> dict[str, Any]:
        return self.adapter.training or self.checkpoint.training

    def keys(self) -> list[str]:
        return self.checkpoint.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.checkpoint

    def shape(self, key: str) -> tuple[int, ...]:
        return self.checkpoint.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.checkpoint.dtype(key)

    def is_float(self, key: str) -> bool:
        return self.checkpoint.is_float(key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor with the adapter merged in, or its rows [start, stop) (a large tensor merged in
        blocks). A tensor the adapter leaves alone is read by rows; an adapted one is merged whole once
        and kept until its last block is read: each block made the whole ΔW = B·A again, and B[rows]·A
        alone differs from those rows of the whole product in the last bit (MKL's kernels)."""
        if rows is None:
            return self.adapter.applied(key, self.checkpoint.get(key))
        if not self.adapter.adapts(key):
            return self.checkpoint.get(key, rows)
        last = self._last
        if last is None or last[0] != key:
            last = self._last = (key, self.adapter.applied(key, self.checkpoint.get(key)))
        if rows[1] >= last[1].shape[0]:
            self._last = None
        return last[1][rows[0]:rows[1]]

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> bool:
        """Straight from the model's file where the adapter leaves the tensor alone (see Checkpoint)."""
        return not self.adapter.adapts(key) and self.checkpoint.read_into(key, out, rows)

    def side_files(self, names):
        return self.checkpoint.side_files(names)


def load_source(ref: str | os.PathLike, name: str | None = None, *, allow_hub: bool = True,
                allowed_roots=None, trust_remote_code: bool = False) -> TaskVectorSource:
    """A task-vector source from a folder/Hub id: an adapter if it has adapter_config.json."""
    path = resolve(ref, allow_hub=allow_hub, allowed_roots=allowed_roots)
    name = name or Path(str(ref)).name or str(ref)
    if (path if path.is_dir() else path.parent).joinpath("adapter_config.json").exists() and path.is_dir():
        return LoraAdapter(path, name)
    return FullFinetune(Checkpoint(path, trust_remote_code=trust_remote_code), name)
