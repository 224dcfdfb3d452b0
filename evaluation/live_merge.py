"""The user's own merge: a private copy of the base model that each merge is written into in place
(`merging.live.LiveModel`), and the settings of the merge it holds, as numbers.

Nothing else writes into this model: reference scores, searches, studies and the landscape score
their candidates on scratch copies (`evaluation.scorer.ScratchModel`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from merging.errors import MergeError
from merging.live import LiveModel
from merging.similarity import SimilarityReport, similarity_from_stacks

from .pool import ModelPool


def describe(lam: float, hyper: Mapping[str, Any]) -> str:
    """λ and hyperparameters for display ("λ=0.8, rho=0.3")."""
    hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyper.items())
    return f"λ={lam:g}" + (f", {hp}" if hp else "")


@dataclass(frozen=True)
class MergeSettings:
    """One merge as numbers: which fine-tunes (indices into the pool), how (method, λ, hyperparameters)
    and with which coefficients."""

    method: str
    weights: tuple[float, ...]
    lam: float
    hyper: dict[str, Any] = field(default_factory=dict)
    select: tuple[int, ...] = ()

    def describe(self) -> str:
        return describe(self.lam, self.hyper)


class LiveMerge:
    """One session's merged model and the settings it was merged with (None: it holds the base)."""

    def __init__(self, pool: ModelPool, lock: threading.RLock | None = None):
        self.pool = pool
        self.live = LiveModel(pool.own_model(), pool.stack)  # MergeError when the model does not match
        self.settings: MergeSettings | None = None
        self.lock = lock or threading.RLock()
        self._sim_key: tuple | None = None
        self._sim: SimilarityReport | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.live.model

    @property
    def targets(self) -> dict[str, torch.nn.Parameter]:
        return self.live.targets

    def apply(self, method: str, weights: Sequence[float], lam: float, hyper: Mapping[str, Any],
              select: Sequence[int]) -> MergeSettings:
        """Merge into the model in place; on error the model and the settings stay as they were."""
        settings = MergeSettings(method, tuple(float(w) for w in weights), float(lam), dict(hyper),
                                 tuple(int(i) for i in select))
        with self.lock:
            self.live.apply(method, list(settings.weights), settings.lam, select=list(settings.select), **settings.hyper)
            self.settings = settings
        return settings

    # ------------------------------------------------------------------ the merge beside the task vectors
    def similarity(self, select: Sequence[int], with_merged: bool = True) -> SimilarityReport:
        """Cosine / sign conflicts / norms of the selected task vectors, plus the merge's update θ − θ₀
        as a last row ("merged") when a merge is applied."""
        stack, idx = self.pool.stack, list(select)
        if not idx:
            raise MergeError("select at least one fine-tuned model")
        names = [stack.source_names[i] for i in idx]
        training = [stack.training[i] for i in idx]
        with self.lock:
            if with_merged and self.settings is not None:
                stacks = ((n, torch.cat([stack.deltas[n][idx], (self.targets[n].detach() - stack.base[n]).unsqueeze(0)]))
                          for n in stack.names)
                return similarity_from_stacks(stacks, names + ["merged"], training + [{}])
        return similarity_from_stacks(((n, stack.deltas[n][idx]) for n in stack.names), names, training)

    def similarity_live(self, select: Sequence[int]) -> SimilarityReport:
        """Cheap variant for every slider move: the selection's report (cached) plus one "merged" row of
        whole-model cosines between the merge's update θ − θ₀ and each task vector."""
        idx, k = list(select), len(select)
        key = (id(self.pool.stack), tuple(idx))
        if self._sim_key != key:
            self._sim, self._sim_key = self.similarity(idx, with_merged=False), key
        rep = self._sim
        if self.settings is None:
            return rep
        norms = np.asarray(rep.norms, dtype=float)
        with self.lock:
            coef = self.live.linear_state()
            if coef is not None and not coef[[i for i in range(len(coef)) if i not in idx]].any():
                # θ − θ₀ = Σ cᵢτᵢ: its dot products follow from the task vectors' Gram matrix, no pass
                c = coef[idx].double().numpy()
                gram = np.nan_to_num(rep.cosine) * np.outer(norms, norms)
                dots, sq = gram @ c, float(max(c @ gram @ c, 0.0))
            else:
                dots, sq = self._merged_dots(idx)
        mnorm = np.sqrt(sq)
        with np.errstate(invalid="ignore", divide="ignore"):
            row = np.where((norms > 0) & (mnorm > 0), dots / (norms * mnorm), np.nan)
        cos = np.full((k + 1, k + 1), np.nan)
        cos[:k, :k] = rep.cosine
        cos[k, :k] = cos[:k, k] = row
        cos[k, k] = 1.0 if mnorm > 0 else np.nan
        conflict = np.full((k + 1, k + 1), np.nan)
        conflict[:k, :k] = rep.sign_conflict
        return SimilarityReport(names=rep.names + ["merged"], cosine=cos, sign_conflict=conflict,
                                norms=np.append(norms, mnorm), training=rep.training + [{}])

    def _merged_dots(self, idx: list[int]) -> tuple[np.ndarray, float]:
        """(τᵢ · (θ − θ₀) for the selected i, ‖θ − θ₀‖²) from the model's parameters: one pass."""
        stack = self.pool.stack
        dots = torch.zeros(len(stack), dtype=torch.float64, device=stack.device)
        sq = 0.0
        for n in stack.names:
            m = (self.targets[n].detach() - stack.base[n]).reshape(-1)
            dots += (stack.deltas[n].reshape(len(stack), -1) @ m).double()  # all rows: no copy
            sq += float(torch.dot(m, m))
        return dots[idx].cpu().numpy(), sq
