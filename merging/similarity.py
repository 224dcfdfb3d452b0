"""Heterogeneity diagnostics of task vectors, streamed tensor by tensor.

Data heterogeneity shows as low or negative cosine similarity and many sign conflicts between
task vectors; training heterogeneity as unequal norms next to unequal steps / learning rates.
Everything accumulates K×K sums per tensor, so no model is ever flattened into one vector.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from .plan import layer_of
from .progress import Progress, report

_CHUNK = 1 << 22


@dataclass
class SimilarityReport:
    names: list[str]
    cosine: np.ndarray  # [K, K], whole model
    sign_conflict: np.ndarray  # [K, K], share of coordinates (both nonzero) with opposite signs
    norms: np.ndarray  # [K], L2 norm of each whole task vector
    layer_cosine: dict[str, np.ndarray] = field(default_factory=dict)
    layer_norms: dict[str, np.ndarray] = field(default_factory=dict)
    training: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(self.layer_cosine)

    def pairs(self) -> list[tuple[int, int]]:
        k = len(self.names)
        return [(i, j) for i in range(k) for j in range(i + 1, k)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: a cosine with a zero task vector is undefined and written as null (not NaN)."""
        return {"names": self.names, "cosine": _plain(self.cosine), "sign_conflict": _plain(self.sign_conflict),
                "norms": _plain(self.norms), "layer_cosine": {k: _plain(v) for k, v in self.layer_cosine.items()},
                "training": self.training}

    def to_text(self) -> str:
        """The matrices as aligned plain text, for the terminal."""
        w = max(8, *(len(n) for n in self.names)) + 1
        out = ["cosine similarity of task vectors (whole model)", " " * w + "".join(n[:w - 1].rjust(w) for n in self.names)]
        for n, row in zip(self.names, self.cosine):
            out.append(n[:w - 1].ljust(w) + "".join(f"{x:{w}.3f}" if np.isfinite(x) else "n/a".rjust(w) for x in row))
        out += ["", "sign conflicts (share of coordinates where both are nonzero)"]
        for n, row in zip(self.names, self.sign_conflict):
            out.append(n[:w - 1].ljust(w) + "".join(f"{x:{w}.3f}" for x in row))
        out += ["", "task-vector norms and training"]
        for n, norm, meta in zip(self.names, self.norms, self.training or [{}] * len(self.names)):
            extra = ", ".join(f"{k} {meta[k]}" for k in ("steps", "learning_rate") if k in meta)
            out.append(f"{n[:w - 1].ljust(w)} ‖τ‖ = {norm:.4g}" + (f"  ({extra})" if extra else ""))
        return "\n".join(out)


def _plain(a: np.ndarray) -> list:
    return np.where(np.isfinite(a), a, None).tolist()


def _cos(gram: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(gram), 0, None))
    denom = np.outer(d, d)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(denom > 0, gram / np.where(denom > 0, denom, 1), np.nan)
    return c


def similarity_from_stacks(stacks: Iterable[tuple[str, torch.Tensor]], names: list[str],
                           training: list[dict[str, Any]] | None = None) -> SimilarityReport:
    """Accumulate Gram matrices and sign agreement over (tensor name, [K, ...] task vectors)."""
    k = len(names)
    gram = np.zeros((k, k))
    agree = np.zeros((k, k))  # Σ sᵢsⱼ  = agreements − disagreements
    both = np.zeros((k, k))  # Σ |sᵢ||sⱼ| = coordinates where both are nonzero
    layer_gram: dict[str, np.ndarray] = {}
    for name, deltas in stacks:
        flat = deltas.reshape(k, -1)
        g = np.zeros((k, k))
        for start in range(0, flat.shape[1], _CHUNK):
            part = flat[:, start:start + _CHUNK]
            g += (part.double() @ part.double().T).cpu().numpy()
            s = part.sign()
            agree += (s @ s.T).double().cpu().numpy()
            nz = s.abs()
            both += (nz @ nz.T).double().cpu().numpy()
        gram += g
        layer = layer_of(name)
        layer_gram[layer] = layer_gram.get(layer, np.zeros((k, k))) + g
    with np.errstate(invalid="ignore", divide="ignore"):
        conflict = np.where(both > 0, (both - agree) / 2 / np.where(both > 0, both, 1), 0.0)
    return SimilarityReport(
        names=list(names), cosine=_cos(gram), sign_conflict=conflict, norms=np.sqrt(np.clip(np.diag(gram), 0, None)),
        layer_cosine={l: _cos(g) for l, g in layer_gram.items()},
        layer_norms={l: np.sqrt(np.clip(np.diag(g), 0, None)) for l, g in layer_gram.items()},
        training=list(training or [{} for _ in names]),
    )


def similarity(base, sources, progress: Progress | None = None) -> SimilarityReport:
    """Stream the task vectors of `sources` relative to `base` (Checkpoints) into a report."""
    from .engine import load_tensor_stack
    from .plan import plan_from_objects

    plan = plan_from_objects(base, list(sources), "task_arithmetic")
    names = plan.tensor_names

    def stacks():
        for j, name in enumerate(names):
            yield name, load_tensor_stack(plan, name)[1]
            report(progress, j + 1, len(names), name)

    return similarity_from_stacks(stacks(), [s.name for s in sources], [dict(s.training) for s in sources])
