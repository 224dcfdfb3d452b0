"""The one registry of aggregators and the typed description of their hyperparameters.

The UI builds its widgets from it, the CLI lists it, the YAML validation checks against it and
the README's method table is generated from it: a method is declared once, here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import MergeError


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
        try:
            if self.type is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                elif not isinstance(value, (bool, int)) or isinstance(value, float):
                    raise ValueError
                return bool(value)
            if self.type is str:
                value = str(value).lower() if isinstance(value, bool) else str(value)  # YAML reads `true` as a bool
                if self.choices and value not in self.choices:
                    raise MergeError(f"{label}: {value!r} is not one of {', '.join(self.choices)}")
                return value
            if isinstance(value, bool):
                raise ValueError
            number = self.type(value)
            if self.type is int and float(value) != number:
                raise ValueError
        except (TypeError, ValueError):
            raise MergeError(f"{label}: expected {self.type.__name__}, got {value!r}") from None
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


@dataclass(frozen=True)
class Aggregator:
    """A merge method: a pure function over stacked updates plus its metadata.

    `fn(deltas, weights, **hyperparams)` receives the task vectors of one tensor stacked as
    [K, ...] (float32) and the per-model weights [K], and returns the merged update U; the
    engine forms θ₀ + λ·U. Flags tell the engine what else to pass:
    `needs_base` (the base tensor, as `base=`), `needs_update_norms` (whole-model L2 norms of
    the weighted task vectors, as `update_norms=`).
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    params: tuple[HyperParam, ...] = ()
    family: str = "baseline"  # "federated" or "baseline", for grouping in the UI and docs
    linear: bool = False  # U is linear in the weights: the app may update incrementally
    needs_base: bool = False
    needs_update_norms: bool = False
    min_models: int = 1
    max_models: int | None = None
    reference: str = ""
    coefficients: Callable[..., Any] | None = None  # linear aggregators: cᵢ(weights, **hp), U = Σ cᵢτᵢ
    # Two-step aggregators: fn = combine(prepare(deltas, hp), weights, **hp), where `prepare` (trim or
    # drop masks) does not depend on the weights, so the live app can cache it across slider moves.
    # prepare(deltas, hp, out=None) may write into `out` (a recycled buffer of the stack's shape).
    prepare: Callable[..., Any] | None = None
    prepare_params: tuple[str, ...] = ()
    combine: Callable[..., Any] | None = None  # always coordinate-wise
    # U at a coordinate depends only on the K values there: the engine may work in cache-sized slices.
    elementwise: bool = False
    # The final step (`combine` of two-step aggregators, else `fn`) as one fused pass:
    # fused(stack [K, n], weights [K], θ₀ [n], λ, out [n], **hp) writes θ₀ + λ·U into `out` and
    # returns its count of non-finite entries. Same values as the torch definition (tests check).
    fused: Callable[..., int] | None = None
    # mergekit's definition op for op: exact(base, models, weights, lam=, **hp) -> θ, where
    # `models` is the list of fine-tuned tensors θᵢ and every input is already in the compute dtype
    # (a bfloat16 merge rounds where mergekit rounds). `base` is None for a merge without a base.
    exact: Callable[..., Any] | None = None
    # Defined on the models: the engine runs `exact` on full fine-tunes whatever the dtype (float32
    # linear at λ = 1 excepted: its affine path gives the same sum); methods without a task-vector
    # form of their own (model_methods.py) derive `fn` from it for the app: exact(θ₀, θ₀ + τ) − θ₀.
    models_only: bool = False
    exact_reads_base: bool = True  # False: `exact` reads θ₀ only for λ ≠ 1 (linear, like mergekit's, reads no base)
    inert: tuple[str, ...] = ()  # mergekit parameters accepted with no effect (task_arithmetic's density)
    base_optional: bool = False  # a YAML may leave out base_model (linear, nuslerp, multislerp, karcher)

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

    def accepts(self, n_models: int) -> bool:
        """Whether this method merges `n_models` fine-tunes (the one place that says so)."""
        return self.min_models <= n_models and (self.max_models is None or n_models <= self.max_models)

    def check_model_count(self, n_models: int) -> None:
        if n_models < self.min_models:
            raise MergeError(f"{self.name} needs at least {self.min_models} fine-tuned model(s), got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise MergeError(f"{self.name} takes at most {self.max_models} fine-tuned model(s), got {n_models}")


COEFFICIENT_LIMIT = 1000.0
WEIGHT = HyperParam("weight", float, 1.0, "Per-task coefficient wᵢ (negative subtracts a task).",
                    low=-COEFFICIENT_LIMIT, high=COEFFICIENT_LIMIT, per_model=True)
LAMBDA = HyperParam("lambda", float, 1.0, "Global scale λ of the merged update: θ = θ₀ + λ·U.",
                    low=-COEFFICIENT_LIMIT, high=COEFFICIENT_LIMIT)
UNIVERSAL_PARAMS = {"weight": WEIGHT, "lambda": LAMBDA}


@dataclass
class Registry(Mapping[str, Aggregator]):
    """Aggregators keyed by method name; registering a name twice is an error."""

    _items: dict[str, Aggregator] = field(default_factory=dict)

    def register(self, agg: Aggregator) -> Aggregator:
        if agg.name in self._items:
            raise ValueError(f"aggregator {agg.name!r} is already registered")
        self._items[agg.name] = agg
        return agg

    def __getitem__(self, name: str) -> Aggregator:
        try:
            return self._items[name]
        except KeyError:
            raise MergeError(f"unknown merge method {name!r}; known: {', '.join(self._items)}") from None

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


AGGREGATORS = Registry()


def aggregator(name: str, summary: str, params: Sequence[HyperParam] = (), **flags: Any):
    """Decorator: register `fn` under `name` with its typed hyperparameters."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        AGGREGATORS.register(Aggregator(name=name, fn=fn, summary=summary, params=tuple(params), **flags))
        return fn

    return wrap
