"""The in-memory engine of the live app: task vectors computed once, merges written in place.

`TaskVectorStack` holds, per tensor, the base and the stacked task vectors of every loaded
fine-tune (shared read-only between sessions), and caches the weight-independent step (trim and
drop masks) of two-step aggregators. `LiveModel` owns one model object and writes each merge into
its parameters: no reload, no new model per merge. Linear merges (also DARE / Breadcrumbs /
magnitude pruning over their cached sparsified stack) are one matrix-vector product per tensor,
and when a single task's coefficient changes, an update by that change alone. Other merges are
computed into a second set of buffers that is swapped in once every tensor came out finite.

Both live on one torch device (`device`: a GPU when the app runs on one, see `merging.device`):
tensors are read on the CPU, their norms taken there, then moved; small per-task numbers (weights,
norms, bounds) stay on the CPU and are moved per merge.
"""
from __future__ import annotations

import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from . import kernels
from .engine import load_tensor_stack
from .errors import MergeError
from .progress import Progress, report
from .plan import TRAINING_KEYS, MergePlan, plan_from_objects, training_defaults
from .registry import AGGREGATORS, LAMBDA, WEIGHT
from .similarity import SimilarityReport, similarity_from_stacks
from .task_vectors import TaskVectorSource

_MAX_INCREMENTS = 16  # incremental updates between two full linear merges (bounds rounding drift)


def estimate_stack_bytes(base, sources) -> int:
    """Memory a TaskVectorStack will take: the float32 base plus K float32 task vectors."""
    n = sum(math.prod(base.shape(k)) for k in base.keys() if base.is_float(k))
    return 4 * n * (1 + len(sources))


class TaskVectorStack:
    """Base tensors and stacked task vectors [K, ...] per tensor, float32, read once."""

    def __init__(self, base, sources: Sequence[TaskVectorSource], progress: Progress | None = None,
                 device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.plan: MergePlan = plan_from_objects(base, list(sources), "task_arithmetic")
        self.names: list[str] = self.plan.tensor_names
        self.source_names = [s.name for s in sources]
        self.training = [dict(s.training) for s in sources]
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        sq = torch.zeros(len(sources), dtype=torch.float64)
        self._sq_norms: dict[str, torch.Tensor] = {}
        self._absmax: dict[str, torch.Tensor] = {}
        self._absmax_base: dict[str, float] = {}
        self._prepare_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._prepare_lock = threading.Lock()
        self._recycled: dict[str, torch.Tensor] = {}  # buffers of an evicted prepare setting, reused
        self.reused_buffers = 0  # how many prepared tensors were written into recycled buffers
        for j, name in enumerate(self.names):
            b, d = load_tensor_stack(self.plan, name)
            self.base[name], self.deltas[name] = b, d
            self._sq_norms[name] = d.reshape(len(sources), -1).double().pow(2).sum(1)
            self._absmax[name] = _row_abs_max(d.reshape(len(sources), -1))
            self._absmax_base[name] = float(b.abs().max()) if b.numel() else 0.0
            if self.device.type != "cpu":
                self.base[name], self.deltas[name] = b.to(self.device), d.to(self.device)
            sq += self._sq_norms[name]
            report(progress, j + 1, len(self.names), name)
        self.norms = sq.sqrt()
        self.warnings = list(self.plan.warnings)
        self.warnings += [f"{n}: identical to the base (its task vector is zero; it adds nothing to a merge)"
                          for n, norm in zip(self.source_names, self.norms) if norm == 0]

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

    def request(self, method: str, weights: Sequence[float], lam: float = 1.0,
                select: Sequence[int] | None = None, **hyper: Any) -> "MergeRequest":
        """Validate a merge of the selected fine-tunes before any tensor is touched."""
        agg = AGGREGATORS[method]
        idx = list(range(len(self))) if select is None else [int(i) for i in select]
        if not idx:
            raise MergeError("select at least one fine-tuned model")
        if any(i < 0 or i >= len(self) for i in idx):
            raise MergeError(f"select: indices must be in 0..{len(self) - 1}")
        agg.check_model_count(len(idx))
        if len(weights) != len(idx):
            raise MergeError(f"weights: got {len(weights)} values for {len(idx)} selected models")
        w = torch.tensor([WEIGHT.check(x) for x in weights], dtype=torch.float32)
        hp = agg.check_params(hyper, len(idx))
        hp = _fill_training_defaults(agg, hp, [self.training[i] for i in idx])
        norms = self.update_norms(w, idx)  # cheap (cached per tensor); only methods that ask read them
        return MergeRequest(agg, idx, w, LAMBDA.check(lam), hp, norms)

    def _selected(self, name: str, idx: list[int]) -> torch.Tensor:
        """The selected rows of one stack: a view when they are consecutive (no copy), else a copy."""
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return self.deltas[name][idx[0]:idx[0] + len(idx)]
        return self.deltas[name][idx]

    def _prepared(self, req: "MergeRequest", name: str, with_absmax: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight-independent step (trim / drop masks) of two-step aggregators, cached per setting.

        Returns the sparsified stack [k, ...] of the selected tasks and, when asked (the linear
        path's overflow bound needs it; the consensus methods do not), its per-task max |entry|.
        """
        with self._prepare_lock:  # stacks are shared by every session's thread
            cached = self._prepare_cache.get(req.prepare_key)
            if cached is None:
                if len(self._prepare_cache) >= 2:  # keep the last two settings: flat memory
                    self._recycle(self._prepare_cache.pop(next(iter(self._prepare_cache))))
                cached = self._prepare_cache[req.prepare_key] = {}
            if name not in cached:
                selected = self._selected(name, req.idx)
                out = self._recycled.pop(name, None)
                if out is not None and out.shape != selected.shape:
                    out = None
                self.reused_buffers += out is not None
                t = req.agg.prepare(selected, req.hyper, out, tensor=name)
                cached[name] = (t, None)
            t, absmax = cached[name]
            if with_absmax and absmax is None:
                absmax = _row_abs_max(t.reshape(len(req.idx), -1))
                cached[name] = (t, absmax)
            return t, absmax

    def _recycle(self, entry: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Keep an evicted setting's buffers for the next one: writing into memory already mapped
        costs a fifth of faulting in fresh pages (a cold re-trim of GPT-2 small: 2 GB)."""
        for name in list(entry):
            t, _ = entry.pop(name)
            shared = t.untyped_storage().data_ptr() == self.deltas[name].untyped_storage().data_ptr()
            if sys.getrefcount(t) == 2 and not shared:  # 2: `t` and the call's argument (none in flight)
                self._recycled[name] = t
            del t

    def merged_tensor(self, req: "MergeRequest", name: str, out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, int | None]:
        """θ₀ + λ·U for one tensor (float32; into `out` if given) and its non-finite count if known."""
        weights, norms = req.on(self.device)
        return req.agg.final_step(self._stack(req, name), weights, self.base[name], req.lam, req.hyper, out,
                                  tensor=name, update_norms=norms)

    def _stack(self, req: "MergeRequest", name: str) -> torch.Tensor:
        """The stack the method's final step reads: its cached prepared stack, if it has a
        weight-independent step (`prepare_key`), else the raw selected task vectors."""
        return self._selected(name, req.idx) if req.prepare_key is None else self._prepared(req, name)[0]

    def merged(self, method: str, weights: Sequence[float], lam: float = 1.0, select: Sequence[int] | None = None,
               **hyper: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, merged float32 tensor) for a merge of the selected fine-tunes."""
        req = self.request(method, weights, lam, select, **hyper)
        for name in self.names:
            yield name, self.merged_tensor(req, name)[0]

    # ------------------------------------------------------------------ linear merges
    def linear_terms(self, req: "MergeRequest") -> tuple[tuple | None, torch.Tensor | None]:
        """(which stack, λ·cᵢ) when U = Σ cᵢτᵢ, else (None, None). The raw stack takes coefficients
        over ALL tasks (zero for the unselected: no copy of a selection); a prepared one over the selected."""
        c = req.agg.linear_coefficients(req.weights, req.hyper, req.norms)
        if c is None:
            return None, None
        c = c.to(torch.float32) * req.lam
        if req.prepare_key is not None:
            return req.prepare_key, c
        full = torch.zeros(len(self), dtype=torch.float32)
        full[req.idx] = c
        return None, full

    def linear_stack(self, req: "MergeRequest", key: tuple | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack a linear merge sums for one tensor, and its per-task max |entry|."""
        if key is None:
            return self.deltas[name], self._absmax[name]
        return self._prepared(req, name, with_absmax=True)

    def bound(self, name: str, coefficients: torch.Tensor, absmax: torch.Tensor) -> float:
        """An upper bound of |θ₀ + Σ cᵢτᵢ| for one tensor: finite output guaranteed below float32's max."""
        return float(self._absmax_base[name] + (coefficients.abs().double() * absmax).sum())


@dataclass
class MergeRequest:
    agg: Any
    idx: list[int]
    weights: torch.Tensor
    lam: float
    hyper: dict[str, Any]
    norms: torch.Tensor | None
    _moved: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights and update norms on `device` (moved once per request, not per tensor)."""
        if device.type == "cpu":
            return self.weights, self.norms
        if device not in self._moved:
            self._moved[device] = (self.weights.to(device), None if self.norms is None else self.norms.to(device))
        return self._moved[device]

    @property
    def prepare_key(self) -> tuple | None:
        """What the cached prepare step depends on: method, its own hyperparameters and the
        selection; None when the method has no weight-independent step."""
        key = self.agg.prepare_key(self.hyper)
        return None if key is None else (*key, tuple(self.idx))


def _row_abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |entry| of each row of a [K, n] float32 tensor, float64, on the CPU (zeros when n = 0)."""
    if t.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=torch.float64)
    if kernels.enabled() and t.is_contiguous() and t.device.type == "cpu":
        return torch.from_numpy(kernels.row_abs_max(t.numpy()))
    return t.abs().amax(1).double().cpu()


def _fill_training_defaults(agg, hp: dict[str, Any], training: list[dict[str, Any]]) -> dict[str, Any]:
    """Unset per-model hyperparameters (fednova's steps, learning rates) from the training records."""
    for key in TRAINING_KEYS:
        if key in hp and hp[key] is None:
            values = training_defaults(key, training)
            if all(v is not None for v in values):
                hp[key] = values
    return hp


class LiveModel:
    """One model object whose parameters receive merges in place."""

    def __init__(self, model: torch.nn.Module, stack: TaskVectorStack):
        self.model = model.to(stack.device)  # in place: merges are written where the stack is
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
        self._last: torch.Tensor | None = None  # coefficients of the last linear merge written
        self._last_key: tuple | None = None  # ... and which stack they multiplied
        self._increments = 0
        self._spare: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def apply(self, method: str, weights: Sequence[float], lam: float = 1.0, select: Sequence[int] | None = None,
              **hyper: Any) -> None:
        """Merge and write into the model. On error the model keeps its previous weights."""
        req = self.stack.request(method, weights, lam, select, **hyper)
        key, coef = self.stack.linear_terms(req)
        if coef is not None:  # U = Σ cᵢτᵢ: written straight into the parameters
            self._apply_linear(req, key, coef)
            return
        spare = self._spare_buffers()

        def one(name: str) -> int:
            t, bad = self.stack.merged_tensor(req, name, out=spare[name])
            return int((~torch.isfinite(t)).sum()) if bad is None else bad

        threads = torch.get_num_threads()
        # the fused kernels (CPU) release the GIL: one tensor per core; a GPU queues its work in order
        if threads > 1 and len(self.stack.names) > 1 and self.stack.device.type == "cpu":
            with ThreadPoolExecutor(threads, thread_name_prefix="live-merge") as pool:
                bad = list(pool.map(one, self.stack.names))
        else:
            bad = [one(name) for name in self.stack.names]
        for name, count in zip(self.stack.names, bad):
            if count:
                raise MergeError(f"the merge produced non-finite values in {name} (coefficients too large?)")
        for name, param in self.targets.items():  # every tensor is finite: swap the buffers in
            if spare[name].dtype == param.dtype:
                param.data, spare[name] = spare[name], param.data
            else:
                param.data.copy_(spare[name])
        self._last = None

    def _spare_buffers(self) -> dict[str, torch.Tensor]:
        """One float32 buffer per parameter, kept between merges (no model-sized allocation per merge)."""
        if self._spare is None:
            self._spare = {name: torch.empty(p.shape, dtype=torch.float32, device=p.device)
                           for name, p in self.targets.items()}
        return self._spare

    def _apply_linear(self, req: MergeRequest, key: tuple | None, coef: torch.Tensor) -> None:
        """θ = θ₀ + Σ cᵢτᵢ straight into the parameters; when one cᵢ changed, add just that change."""
        for name in self.stack.names:
            if self.stack.bound(name, coef, self.stack.linear_stack(req, key, name)[1]) > 1e38:
                raise MergeError(f"the merge would overflow float32 in {name} (coefficients too large)")
        same_stack = self._last is not None and self._last_key == key and len(self._last) == len(coef)
        changed = (coef != self._last).nonzero().flatten().tolist() if same_stack else None
        if changed == []:
            return
        if changed is not None and len(changed) == 1 and self._increments < _MAX_INCREMENTS:
            i = changed[0]
            step = float(coef[i] - self._last[i])
            for name, param in self.targets.items():
                param.data.add_(self.stack.linear_stack(req, key, name)[0][i], alpha=step)
            self._increments += 1
        else:
            on_device = coef.to(self.stack.device)
            for name, param in self.targets.items():
                stack = self.stack.linear_stack(req, key, name)[0]
                flat = stack.reshape(len(coef), -1)
                torch.addmv(self.stack.base[name].reshape(-1), flat.T, on_device, out=param.data.view(-1))
            self._increments = 0
        self._last, self._last_key = coef.clone(), key

    def linear_state(self) -> torch.Tensor | None:
        """λ·cᵢ over all stacked tasks when the parameters hold θ₀ + Σ cᵢτᵢ of the raw task vectors
        (the last merge was linear), else None: lets callers reason about the merge without reading it."""
        return self._last.clone() if self._last is not None and self._last_key is None else None

    @torch.no_grad()
    def reset_to_base(self) -> None:
        for name, p in self.targets.items():
            p.data.copy_(self.stack.base[name])
        self._last = None
