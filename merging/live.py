"""The in-memory engine of the live app: task vectors computed once, merges written in place.

`TaskVectorStack` holds, per tensor, the base and the stacked task vectors of every loaded
fine-tune (shared read-only between sessions). `LiveModel` owns one model object and writes a
new merge into its parameters in place: no reload, no new model per merge. Linear aggregators
whose coefficients change for a single task update by that change alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .engine import load_tensor_stack, merge_tensor
from .errors import MergeError
from .plan import MergePlan, plan_from_objects
from .registry import AGGREGATORS, LAMBDA, WEIGHT
from .similarity import SimilarityReport, similarity_from_stacks
from .task_vectors import TaskVectorSource

Progress = Callable[[int, int, str], None]


def estimate_stack_bytes(base, sources) -> int:
    """Memory a TaskVectorStack will take: the float32 base plus K float32 task vectors."""
    n = sum(_numel(base.shape(k)) for k in base.keys() if base.is_float(k))
    return 4 * n * (1 + len(sources))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TaskVectorStack:
    """Base tensors and stacked task vectors [K, ...] per tensor, float32, read once."""

    def __init__(self, base, sources: Sequence[TaskVectorSource], progress: Progress | None = None):
        self.plan: MergePlan = plan_from_objects(base, list(sources), "task_arithmetic")
        self.names: list[str] = self.plan.tensor_names
        self.source_names = [s.name for s in sources]
        self.training = [dict(s.training) for s in sources]
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        sq = torch.zeros(len(sources), dtype=torch.float64)
        self._sq_norms: dict[str, torch.Tensor] = {}
        for j, name in enumerate(self.names):
            b, d = load_tensor_stack(self.plan, name)
            self.base[name], self.deltas[name] = b, d
            self._sq_norms[name] = d.reshape(len(sources), -1).double().pow(2).sum(1)
            sq += self._sq_norms[name]
            if progress:
                progress(j + 1, len(self.names), name)
        self.norms = sq.sqrt()
        self.warnings = list(self.plan.warnings)

    def __len__(self) -> int:
        return len(self.source_names)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in self.base.values()) + sum(t.numel() * 4 for t in self.deltas.values())

    def update_norms(self, weights: torch.Tensor, select: Sequence[int]) -> torch.Tensor:
        """‖wᵢτᵢ‖ over the whole model for the selected tasks (from the cached per-tensor norms)."""
        sq = torch.zeros(len(select), dtype=torch.float64)
        for v in self._sq_norms.values():
            sq += v[list(select)]
        return sq.sqrt() * weights.double().abs()

    def similarity(self, select: Sequence[int] | None = None) -> SimilarityReport:
        idx = list(range(len(self))) if select is None else list(select)
        stacks = ((n, self.deltas[n][idx]) for n in self.names)
        return similarity_from_stacks(stacks, [self.source_names[i] for i in idx], [self.training[i] for i in idx])

    def merged(self, method: str, weights: Sequence[float], lam: float = 1.0, select: Sequence[int] | None = None,
               **hyper: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, merged float32 tensor) for a merge of the selected fine-tunes."""
        agg = AGGREGATORS[method]
        idx = list(range(len(self))) if select is None else list(select)
        if not idx:
            raise MergeError("select at least one fine-tuned model")
        agg.check_model_count(len(idx))
        if len(weights) != len(idx):
            raise MergeError(f"weights: got {len(weights)} values for {len(idx)} selected models")
        w = torch.tensor([WEIGHT.check(x) for x in weights], dtype=torch.float32)
        lam = LAMBDA.check(lam)
        hp = agg.check_params(hyper, len(idx))
        hp = _fill_training_defaults(agg, hp, [self.training[i] for i in idx])
        norms = self.update_norms(w, idx) if agg.needs_update_norms else None
        all_selected = idx == list(range(len(self)))
        for name in self.names:
            deltas = self.deltas[name] if all_selected else self.deltas[name][idx]
            yield name, merge_tensor(agg, name, self.base[name], deltas, w, lam, hp, norms)


def _fill_training_defaults(agg, hp: dict[str, Any], training: list[dict[str, Any]]) -> dict[str, Any]:
    """fednova's steps / learning rates default to the checkpoints' training records."""
    for key, meta in (("steps", "steps"), ("learning_rates", "learning_rate")):
        if key in hp and hp[key] is None and all(meta in t for t in training):
            hp[key] = [t[meta] for t in training]
    return hp


class LiveModel:
    """One model object whose parameters receive merges in place."""

    def __init__(self, model: torch.nn.Module, stack: TaskVectorStack):
        self.model = model
        self.stack = stack
        own = dict(model.named_parameters())
        prefix = getattr(model, "base_model_prefix", "")
        self.targets: dict[str, torch.nn.Parameter] = {}
        for name in stack.names:
            param = own.get(name)
            if param is None:
                param = own.get(f"{prefix}.{name}")
            if param is None:
                raise MergeError(f"the loaded model has no parameter for checkpoint tensor {name}")
            if tuple(param.shape) != tuple(stack.base[name].shape):
                raise MergeError(f"{name}: the model's parameter has shape {tuple(param.shape)}, "
                                 f"the checkpoint {tuple(stack.base[name].shape)}")
            self.targets[name] = param

    @torch.no_grad()
    def apply(self, method: str, weights: Sequence[float], lam: float = 1.0, select: Sequence[int] | None = None,
              **hyper: Any) -> None:
        """Merge and write into the model. On error the model keeps its previous weights."""
        merged = dict(self.stack.merged(method, weights, lam, select, **hyper))  # validate fully first
        for name, t in merged.items():
            if not bool(torch.isfinite(t).all()):
                raise MergeError(f"the merge produced non-finite values in {name} (coefficients too large?)")
        for name, t in merged.items():
            self.targets[name].data.copy_(t)

    @torch.no_grad()
    def reset_to_base(self) -> None:
        for name, p in self.targets.items():
            p.data.copy_(self.stack.base[name])
