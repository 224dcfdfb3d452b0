"""Method documentation generated from the registry (the README's table, `python -m merging methods`)."""
from __future__ import annotations

from .registry import AGGREGATORS, HyperParam


def _param(p: HyperParam) -> str:
    scope = ", per model" if p.per_model else ""
    default = "auto" if p.default is None else repr(p.default)
    return f"`{p.name}` ({p.type.__name__} in {p.range_text()}, default {default}{scope}): {p.help}"


def methods_markdown() -> str:
    rows = ["| method | family | what it does | hyperparameters (besides `weight`, `lambda`) |", "|---|---|---|---|"]
    for agg in AGGREGATORS.values():
        params = "<br>".join(_param(p) for p in agg.params) or "none"
        rows.append(f"| `{agg.name}` | {agg.family} | {agg.summary} | {params} |")
    return "\n".join(rows)


def methods_text() -> str:
    out = []
    for agg in AGGREGATORS.values():
        out.append(f"{agg.name}  [{agg.family}]  {agg.summary}")
        out += [f"    {_param(p)}" for p in agg.params]
    return "\n".join(out)
