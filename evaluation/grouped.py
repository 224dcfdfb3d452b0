"""Many merge candidates in one forward pass: a copy of the model whose every weight has a leading
group axis G, and whose input batch is G blocks of the same prompts (block g runs on weights g).

Why: a search scores dozens of (λ, hyperparameter) candidates of one small model on the same
prompts. One after the other, each decoding step is a forward whose fixed per-call cost (Python,
module dispatch, small matmuls) dominates on the zoo's 1M-parameter models; grouped, one forward
serves G candidates through batched matmuls (`torch.baddbmm`) with the same per-call cost.

Only modules whose parameters this file knows are grouped (Linear, GPT-2's Conv1D, Embedding,
LayerNorm, weightless modules); `supports(model)` says whether a model qualifies, and the search
falls back to its one-candidate loop when it does not. Each row computes exactly what the
ungrouped model computes on the same weights (same ops per row, batched), so predictions match.
"""
from __future__ import annotations

import copy
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2's linear layer (weight stored as in × out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

_KNOWN = (nn.Linear, nn.Embedding, nn.LayerNorm) + ((Conv1D,) if Conv1D else ())
MEMORY_MB = int(os.environ.get("FEDMERGE_SEARCH_MB", "1024"))  # budget for one group of candidates


def supports(model: nn.Module) -> bool:
    """True when every parameter lives in a module kind that `GroupedModel` can group."""
    for mod in model.modules():
        if any(True for _ in mod.parameters(recurse=False)) and not isinstance(mod, _KNOWN):
            return False
    return True


def group_size(model: nn.Module, rows: int = 128, seq: int = 64, budget_mb: int | None = None, cap: int = 64) -> int:
    """How many candidates fit the memory budget: their weights plus one batch of activations each."""
    cfg = model.config
    width = int(getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size", 256))
    heads = int(getattr(cfg, "n_head", None) or getattr(cfg, "num_attention_heads", 4))
    seq = min(seq, int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", seq)))
    params = sum(p.numel() for p in model.parameters())
    per = params * 4 + rows * seq * (8 * width + heads * seq) * 4  # weights + MLP/attention activations
    budget = (budget_mb or MEMORY_MB) * 2 ** 20
    return max(1, min(cap, budget // per))


class _GLinear(nn.Module):
    """(G·B, …, in) → (G·B, …, out) with weight (G, in, out) per block."""

    def __init__(self, weight_io: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_io", weight_io)
        self.register_buffer("bias", bias)

    def forward(self, x):
        g = self.weight_io.shape[0]
        shape = x.shape
        x3 = x.reshape(g, -1, shape[-1])
        if self.bias is None:
            out = torch.bmm(x3, self.weight_io)
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), x3, self.weight_io)
        return out.reshape(*shape[:-1], out.shape[-1])


class _GEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (G, V, d)

    def forward(self, ids):
        g = self.weight.shape[0]
        flat = ids.reshape(g, -1)
        blk = torch.arange(g, device=ids.device).unsqueeze(1)
        return self.weight[blk, flat].reshape(*ids.shape, self.weight.shape[-1])


class _GLayerNorm(nn.Module):
    def __init__(self, weight, bias, shape, eps):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.shape, self.eps = shape, eps

    def forward(self, x):
        g = self.weight.shape[0]
        x3 = x.reshape(g, -1, x.shape[-1])
        y = F.layer_norm(x3, self.shape, None, None, self.eps) * self.weight.unsqueeze(1)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.reshape(x.shape)


class GroupedModel:
    """`groups` candidates of `model`; `set(i, weights)` writes candidate i, `model` runs them all."""

    def __init__(self, model: nn.Module, groups: int):
        self.groups = groups
        self.model = copy.deepcopy(model).eval()
        names = {id(p): n for n, p in self.model.named_parameters()}  # tied weights appear once
        self.weights: dict[str, torch.Tensor] = {}
        for n, p in self.model.named_parameters():
            self.weights[n] = p.detach().unsqueeze(0).repeat(groups, *([1] * p.dim())).contiguous()
        for parent in list(self.model.modules()):
            for child_name, mod in list(parent.named_children()):
                new = self._grouped(mod, names)
                if new is not None:
                    setattr(parent, child_name, new)

    def _grouped(self, mod: nn.Module, names: Mapping[int, str]) -> nn.Module | None:
        w = lambda p: None if p is None else self.weights[names[id(p)]]  # noqa: E731
        if Conv1D and isinstance(mod, Conv1D):
            return _GLinear(w(mod.weight), w(mod.bias))
        if isinstance(mod, nn.Linear):
            return _GLinear(w(mod.weight).transpose(1, 2), w(mod.bias))
        if isinstance(mod, nn.Embedding):
            return _GEmbedding(w(mod.weight))
        if isinstance(mod, nn.LayerNorm):
            return _GLayerNorm(w(mod.weight), w(mod.bias), mod.normalized_shape, mod.eps)
        return None

    @torch.no_grad()
    def set(self, i: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy a candidate's tensors (by parameter name; names the model lacks are matched by suffix)."""
        for name, t in weights.items():
            self.target(name)[i].copy_(t)

    @torch.no_grad()
    def write(self, i: int, base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], lam: float) -> None:
        """Candidate i := θ₀ + λ·U (the same `torch.add` as the search's one-candidate scratch model)."""
        for name, u in update.items():
            torch.add(base[name], u, alpha=lam, out=self.target(name)[i])

    def target(self, name: str) -> torch.Tensor:
        if name in self.weights:
            return self.weights[name]
        prefix = getattr(self.model, "base_model_prefix", "")
        return self.weights[f"{prefix}.{name}"]

    @property
    def config(self):
        return self.model.config
