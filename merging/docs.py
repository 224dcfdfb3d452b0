"""Method documentation generated from the registry (the README's table, `python -m merging methods`)."""
from __future__ import annotations

from .registry import AGGREGATORS, HyperParam

# mergekit 0.1.5's methods and how ours compare, as measured by bench/mergekit_fixtures.py on
# mergekit's own test and example configs (float32 and bfloat16, llama and GPT-2 shapes).
EQUAL = "same name; equal output"
MERGEKIT = {
    "linear": EQUAL,
    "task_arithmetic": EQUAL,
    "ties": EQUAL,
    "breadcrumbs": EQUAL,
    "breadcrumbs_ties": EQUAL,
    "slerp": EQUAL + " (`weighted: true` is ours)",
    "nuslerp": EQUAL,
    "multislerp": EQUAL,
    "karcher": EQUAL,
    "model_stock": EQUAL,
    "nearswap": EQUAL,
    "arcee_fusion": EQUAL + " (tensors over 10⁶ entries: its quantile sample is seeded here)",
    "sce": EQUAL,
    "passthrough": EQUAL + " (with `slices`: layer stacking)",
    "dare_linear": "same name; same drop rate and rescale (random masks: other draws)",
    "dare_ties": "same name; same drop rate and rescale (random masks: other draws)",
    "della": "same name; same keep probabilities and rescale (random masks: other draws)",
    "della_linear": "same name; same keep probabilities and rescale (random masks: other draws)",
}


def _param(p: HyperParam) -> str:
    scope = ", per model" if p.per_model else ""
    default = "auto" if p.default is None else repr(p.default)
    return f"`{p.name}` ({p.type.__name__} in {p.range_text()}, default {default}{scope}): {p.help}"


def methods_markdown() -> str:
    rows = ["| method | family | mergekit 0.1.5 | what it does | hyperparameters (besides `weight`, `lambda`) |",
            "|---|---|---|---|---|"]
    for agg in AGGREGATORS.values():
        params = "<br>".join(_param(p) for p in agg.params) or "none"
        rows.append(f"| `{agg.name}` | {agg.family} | {MERGEKIT.get(agg.name, '— (ours)')} | {agg.summary} | {params} |")
    return "\n".join(rows)


def methods_text() -> str:
    out = []
    for agg in AGGREGATORS.values():
        out.append(f"{agg.name}  [{agg.family}]  {agg.summary}")
        out += [f"    {_param(p)}" for p in agg.params]
    return "\n".join(out)
