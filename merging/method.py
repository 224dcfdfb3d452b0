"""A merge method: its typed description and how it runs on one tensor's stack of task vectors.

An `Aggregator` holds a method's definition, a pure torch function over the stacked updates, and
what lets it run faster with the same values: its coefficients when it is linear in the weights, a
weight-independent `Sparsifier` (the TIES / DARE / Breadcrumbs / DELLA trim, described as data
like mergekit's generalized task arithmetic), a fused kernel, whether it is coordinate-wise, and
mergekit's op-for-op form (`Exact`). The engine, the live stack and the tests call `merge`,
`prepare` and `final_step`: which path runs is decided here and nowhere else.

Each default is written once, in the method's HyperParam: the functions receive every
hyperparameter filled in by `check_params` and declare none with a default (checked when the
method is declared).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import kernels
from .errors import MergeError, shown
from .seeds import tensor_seed


@dataclass(frozen=True)
class HyperParam:
    """One hyperparameter of an aggregator.

    `per_model` parameters take one value per fine-tune (mergekit's per-model `parameters`),
    the others one value per merge. `optional` parameters may be None (the aggregator then
    derives a default from the data, e.g. cclip's radius).
    """

    name: str
    type: type  # float, int, bool or str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the interval excludes `low` (rho > 0)
    choices: tuple[str, ...] | None = None
    per_model: bool = False
    optional: bool = False

    def check(self, value: Any, where: str = "") -> Any:
        """Coerce one value to this parameter's type and range, or raise a MergeError naming it."""
        label = f"{where}{self.name}"
        if value is None:
            if self.optional:
                return None
            raise MergeError(f"{label}: a value is required")
        if self.type is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise MergeError(f"{label}: expected true or false, got {value!r}")
        if self.type is str:
            value = str(value).lower() if isinstance(value, bool) else str(value)  # YAML reads `true` as a bool
            if self.choices and value not in self.choices:
                raise MergeError(f"{label}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        try:
            if isinstance(value, bool):
                raise ValueError
            number = self.type(value)
            if self.type is int and not isinstance(value, int) and float(value) != number:  # 2.5; an int is exact
                raise ValueError
        except OverflowError:
            raise MergeError(f"{label}: {shown(str(value), 40)} is outside {self.range_text()}") from None
        except (TypeError, ValueError):
            raise MergeError(f"{label}: expected {self.type.__name__}, got {shown(repr(value), 60)}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise MergeError(f"{label}: must be finite, got {number}")
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            raise MergeError(f"{label}: {number} is outside {self.range_text()}")
        if self.high is not None and number > self.high:
            raise MergeError(f"{label}: {number} is outside {self.range_text()}")
        return number

    def range_text(self) -> str:
        if self.choices:
            return "{" + ", ".join(self.choices) + "}"
        if self.type is bool:
            return "{true, false}"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}]"


def weighted_sum(deltas: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Σᵢ cᵢ·τᵢ as one matrix-vector product over the flattened stack (no [K, ...] temporary)."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    return (coefficients.to(deltas.dtype) @ flat).reshape(deltas.shape[1:])


CHUNK = 1 << 17  # coordinates per slice: a [K, CHUNK] float32 temporary stays in the CPU cache
DEVICE_CHUNK = 1 << 22  # on a GPU every slice costs a kernel launch per op: fewer, larger slices


def apply_elementwise(fn, deltas: torch.Tensor, weights: torch.Tensor, kwargs: Mapping[str, Any],
                      base: torch.Tensor, lam: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """θ₀ + λ·fn(deltas) slice by slice over the coordinates, for coordinate-wise methods.

    Same values as one call on the whole tensor, but the several temporaries each method makes
    are cache-sized instead of model-sized: memory traffic drops to about one read of the stack.
    """
    k = deltas.shape[0]
    flat, b = deltas.reshape(k, -1), base.reshape(-1)
    out = torch.empty_like(b, dtype=torch.float32) if out is None else out
    o = out.view(-1)
    step = CHUNK if flat.device.type == "cpu" else DEVICE_CHUNK
    for s in range(0, flat.shape[1], step):
        torch.add(b[s:s + step], fn(flat[:, s:s + step], weights, **kwargs), alpha=lam, out=o[s:s + step])
    return out.view(base.shape)


@dataclass(frozen=True)
class Sparsifier:
    """The weight-independent first step of the TIES family: keep some entries of each task vector.

    `keep(τᵢ, i, k, hp, out)` writes task i's sparsified float32 row into `out` (the fast path);
    `exact(τᵢ, i, k, hp)` returns mergekit's selection in τᵢ's dtype (the exact path); `reads`
    names the hyperparameters it depends on (what a cached result is keyed by).
    """

    name: str
    keep: Callable[..., Any]
    exact: Callable[..., torch.Tensor]
    reads: tuple[str, ...]

    def __call__(self, deltas: torch.Tensor, hp: Mapping[str, Any], out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty_like(deltas) if out is None else out
        k = deltas.shape[0]
        for i, d in enumerate(deltas.unbind(0)):
            self.keep(d, i, k, hp, out[i])
        return out


@dataclass(frozen=True)
class Exact:
    """mergekit's definition op for op: fn(base, models, weights, lam=, **hp) -> θ, where `models`
    are the fine-tuned tensors θᵢ, every input already in the compute dtype (a bfloat16 merge rounds
    where mergekit rounds) and `base` is None for a merge without a base.

    `always`: the method is defined on the models (it runs this form on full fine-tunes whatever the
    dtype; float32 linear at λ = 1 excepted: its affine path gives the same sum). `reads_base`:
    False when fn reads θ₀ only for λ ≠ 1 (linear, like mergekit's, reads no base).
    """

    fn: Callable[..., torch.Tensor]
    always: bool = False
    reads_base: bool = True


@dataclass(frozen=True)
class Aggregator:
    """A merge method: its description (name, typed hyperparameters, model counts) and its definition.

    `step(stack, weights, **hp)` returns the merged update U from the stack [K, ...] (float32) and
    the per-model weights [K]; with a `sparsifier`, the stack it receives is the sparsified one.
    It may take `base=` (the base tensor) and `update_norms=` (whole-model L2 norms of the
    weighted task vectors) as keyword-only arguments: the engine passes them when it asks for them.
    """

    name: str
    summary: str
    step: Callable[..., torch.Tensor]
    params: tuple[HyperParam, ...] = ()
    family: str = "baseline"  # "federated" or "baseline", for grouping in the UI and docs
    reference: str = ""
    min_models: int = 1
    max_models: int | None = None
    base_optional: bool = False  # a YAML may leave out base_model (linear, nuslerp, multislerp, karcher)
    inert: tuple[str, ...] = ()  # mergekit parameters accepted with no effect (task_arithmetic's density)
    coefficients: Callable[..., torch.Tensor] | None = None  # linear in the weights: U = Σ cᵢ(weights, **hp)·τᵢ
    # A weight-independent first step (the live app caches it); `step` after it must be coordinate-wise.
    sparsifier: Sparsifier | None = None
    # The final step as one fused pass: kernel(stack [K, n], weights [K], θ₀ [n], λ, out [n], **hp) writes
    # θ₀ + λ·U into `out` and returns its count of non-finite entries (same values as `step`).
    kernel: Callable[..., int] | None = None
    elementwise: bool = False  # U at a coordinate depends only on the K values there: merged in slices
    exact: Exact | None = None
    needs_base: bool = field(init=False)
    needs_update_norms: bool = field(init=False)

    def __post_init__(self):
        takes: set[str] = set()
        for fn in (self.step, self.coefficients, self.kernel):
            if fn is not None:
                takes |= set(check_defaults_once(self.name, fn, self.params))
        if self.exact is not None:
            check_defaults_once(self.name, self.exact.fn, self.params)
        object.__setattr__(self, "needs_base", "base" in takes)
        object.__setattr__(self, "needs_update_norms", "update_norms" in takes)

    # ------------------------------------------------------------------ description
    def param(self, name: str) -> HyperParam:
        for p in self.params:
            if p.name == name:
                return p
        raise MergeError(f"{self.name} has no hyperparameter {name!r}; it takes: {self.param_names()}")

    def param_names(self) -> str:
        return ", ".join(p.name for p in self.params) or "none"

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def check_params(self, values: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Fill defaults and validate every value; per-model parameters become lists of K."""
        unknown = set(values) - {p.name for p in self.params}
        if unknown:
            raise MergeError(
                f"{self.name} has no hyperparameter {sorted(unknown)[0]!r}; it takes: {self.param_names()}"
            )
        out: dict[str, Any] = {}
        for p in self.params:
            value = values.get(p.name, p.default)
            if p.per_model:
                if value is None and p.optional:
                    out[p.name] = None
                    continue
                seq = list(value) if isinstance(value, (list, tuple)) else [value] * n_models
                if len(seq) != n_models:
                    raise MergeError(f"{self.name}: {p.name} needs one value per model ({n_models}), got {len(seq)}")
                out[p.name] = [p.check(v, f"{self.name}: ") for v in seq]
            else:
                out[p.name] = p.check(value, f"{self.name}: ")
        return out

    @property
    def row_separable(self) -> bool:
        """Whether merging a tensor in blocks of rows gives the values of merging it whole: the
        update at a coordinate reads only that coordinate (and whole-model norms, computed first).
        Not so for a trim (top-k, a random mask or a band over the tensor) or a method defined on
        whole tensors (SLERP's angle)."""
        return self.sparsifier is None and (self.coefficients is not None or self.elementwise)

    def accepts(self, n_models: int) -> bool:
        """Whether this method merges `n_models` fine-tunes (the one place that says so)."""
        return self.min_models <= n_models and (self.max_models is None or n_models <= self.max_models)

    def check_model_count(self, n_models: int) -> None:
        if n_models < self.min_models:
            raise MergeError(f"{self.name} needs at least {self.min_models} fine-tuned model(s), got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise MergeError(f"{self.name} takes at most {self.max_models} fine-tuned model(s), got {n_models}")

    # ------------------------------------------------------------------ running on one tensor
    def kwargs(self, hyper: Mapping[str, Any], tensor: str = "", base: torch.Tensor | None = None,
               update_norms: torch.Tensor | None = None) -> dict[str, Any]:
        """The keyword arguments of `step` for one tensor: the hyperparameters (the seed made the
        tensor's own) plus what the method asks for."""
        kwargs = dict(hyper)
        if self.needs_base and base is not None:
            kwargs["base"] = base
        if self.needs_update_norms:
            if update_norms is None:
                raise MergeError(f"{self.name} needs the whole-model norms of the task vectors")
            kwargs["update_norms"] = update_norms
        if "seed" in kwargs:
            kwargs["seed"] = tensor_seed(int(kwargs["seed"]), tensor)
        return kwargs

    def update(self, deltas: torch.Tensor, weights: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """U by the torch definition, whole tensor at once (`kwargs` as from `kwargs()`)."""
        stack = deltas if self.sparsifier is None else self.sparsifier(deltas, kwargs)
        return self.step(stack, weights, **kwargs)

    def prepare_key(self, hyper: Mapping[str, Any]) -> tuple | None:
        """What the weight-independent step depends on (a cache key), or None when there is none."""
        if self.sparsifier is None:
            return None
        return (self.name, *((k, _freeze(hyper.get(k))) for k in self.sparsifier.reads if k in hyper))

    def prepare(self, deltas: torch.Tensor, hyper: Mapping[str, Any], out: torch.Tensor | None = None, *,
                tensor: str = "") -> torch.Tensor:
        """The weight-independent step: the sparsified stack (into `out` if given), or `deltas` itself."""
        if self.sparsifier is None:
            return deltas
        return self.sparsifier(deltas, self.kwargs(hyper, tensor), out)

    def final_step(self, stack: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, lam: float,
                   hyper: Mapping[str, Any], out: torch.Tensor | None = None, *, tensor: str = "",
                   update_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, int | None]:
        """θ₀ + λ·U (float32, into `out` if given) from the prepared stack, and its count of non-finite
        entries when the fused kernel counted them (else None).

        The fused kernel when there is one and it can run (numba on the CPU), else the torch
        definition: in cache-sized slices when coordinate-wise, else whole. Each path keeps its own
        rounding of θ₀ + λ·U (torch.add's fused multiply-add, or U·λ + θ₀ for the plain methods).
        """
        kw = self.kwargs(hyper, tensor, base, update_norms)
        if self.kernel is not None and kernels.enabled() and stack.device.type == "cpu":  # numba: CPU only
            out = torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out
            k = stack.shape[0]
            bad = self.kernel(stack.reshape(k, -1), weights.to(torch.float32), base.reshape(-1), float(lam),
                              out.view(-1), **kw)
            return out, int(bad)
        if self.elementwise or self.sparsifier is not None:
            return apply_elementwise(self.step, stack, weights, kw, base, lam, out), None
        update = self.step(stack, weights, **kw)
        if self.kernel is not None:  # the kernel's torch fallback
            out = torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out
            return torch.add(base, update, alpha=lam, out=out), None
        if update.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr():
            update = update.clone()  # never scale the shared task vectors in place
        merged = update.mul_(lam).add_(base) if lam != 1 else update.add_(base)
        return (merged if out is None else out.copy_(merged)), None

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, lam: float,
              hyper: Mapping[str, Any], out: torch.Tensor | None = None, *, tensor: str = "",
              update_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, int | None]:
        """θ₀ + λ·U for one tensor from its task vectors [K, ...]: `prepare`, then `final_step`."""
        stack = self.prepare(deltas, hyper, tensor=tensor)
        return self.final_step(stack, weights, base, lam, hyper, out, tensor=tensor, update_norms=update_norms)

    # ------------------------------------------------------------------ linear shortcuts
    def linear_coefficients(self, weights: torch.Tensor, hyper: Mapping[str, Any],
                            update_norms: torch.Tensor | None = None) -> torch.Tensor | None:
        """cᵢ with U = Σ cᵢ·τᵢ over the prepared stack, or None when U is not linear in the weights."""
        if self.coefficients is None:
            return None
        return self.coefficients(weights, **self.kwargs(hyper, update_norms=update_norms))

    def affine_coefficients(self, weights: torch.Tensor, hyper: Mapping[str, Any], lam: float,
                            update_norms: torch.Tensor | None = None) -> torch.Tensor | None:
        """λ·cᵢ when the merge is exactly Σ λcᵢθᵢ of the fine-tuned models (no θ₀ to read): a linear
        method on the raw task vectors with λ·Σcᵢ = 1 (the normalised soup), or `linear` at λ = 1
        (mergekit's Σ cᵢθᵢ whatever Σ cᵢ)."""
        if self.sparsifier is not None:
            return None
        c = self.linear_coefficients(weights, hyper, update_norms)
        if c is None:
            return None
        c = c.double() * lam
        if self.exact is not None and not self.exact.reads_base and lam == 1:
            return c.float()
        return c.float() if abs(float(c.sum()) - 1.0) <= 1e-6 else None

    # ------------------------------------------------------------------ mergekit's form
    def runs_exact(self, compute_dtype: torch.dtype, lam: Any) -> bool:
        """Whether a merge of full fine-tunes runs the exact form: methods defined on the models, and
        any method with an exact form when the compute dtype is not float32. In float32, `linear` at
        λ = 1 takes the affine path instead (Σ cᵢθᵢ read from the models: the same sum)."""
        if self.exact is None:
            return False
        if compute_dtype != torch.float32:
            return True
        if self.exact.always and self.coefficients is not None:
            return not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam == 1)
        return self.exact.always

    def exact_reads_base(self, lam: float) -> bool:
        return self.exact is not None and (self.exact.reads_base or lam != 1)

    def exact_merge(self, base: torch.Tensor | None, models: list[torch.Tensor], weights, lam: float,
                    hyper: Mapping[str, Any], tensor: str = "") -> torch.Tensor:
        """One tensor merged by mergekit's form (inputs in the compute dtype; `base` None if unread)."""
        kw = self.kwargs(hyper, tensor)
        return self.exact.fn(base, models, weights, lam=lam, **kw)


def check_defaults_once(method: str, fn: Callable, params: tuple[HyperParam, ...]) -> Mapping[str, Any]:
    """Refuse a function that gives a hyperparameter a default: it is written in the HyperParam only.
    Returns the function's parameters."""
    sig = inspect.signature(fn).parameters
    for p in params:
        if p.name in sig and sig[p.name].default is not inspect.Parameter.empty:
            raise ValueError(f"{method}: the default of {p.name!r} is written in its HyperParam; drop it from "
                             f"{getattr(fn, '__name__', 'the function')}'s signature")
    return sig


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
