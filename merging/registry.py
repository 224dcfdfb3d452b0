"""The one registry of merge methods, and the one way to declare a method into it.

The UI builds its widgets from it, the CLI lists it, the YAML validation checks against it and
the README's method table is generated from it: a method is declared once, with `aggregator`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import MergeError
from .method import Aggregator, HyperParam, weighted_sum

__all__ = ["AGGREGATORS", "Aggregator", "HyperParam", "LAMBDA", "Registry", "UNIVERSAL_PARAMS", "WEIGHT",
           "aggregator"]


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

    def remove(self, name: str) -> None:
        """Forget a method (a test that declared one of its own)."""
        del self._items[name]

    def __getitem__(self, name: str) -> Aggregator:
        try:
            return self._items[name]
        except KeyError:
            raise MergeError(f"unknown merge method {name!r}; known: {', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


AGGREGATORS = Registry()


def aggregator(name: str, summary: str, params: Sequence[HyperParam] = (), *, linear: bool = False,
               **description: Any):
    """Declare the merge method `name`: decorate the function that defines it.

    The function is the method's `step`, U = fn(stack, weights, **hp) (over the sparsified stack when
    `description` gives a `sparsifier`); with `linear=True` it is instead the coefficient function
    cᵢ = fn(weights, **hp) of U = Σ cᵢτᵢ. `description` holds the other Aggregator fields (family,
    model counts, kernel, exact form, ...). Families of methods (the TIES family, the methods defined
    on the models) have helpers that build their description and call this.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if linear:
            def step(deltas, weights, **hp):
                return weighted_sum(deltas, fn(weights, **hp))

            step.__name__, step.__doc__ = fn.__name__, fn.__doc__
            description["coefficients"] = fn
        AGGREGATORS.register(Aggregator(name=name, summary=summary, step=step if linear else fn,
                                        params=tuple(params), **description))
        return fn

    return wrap
