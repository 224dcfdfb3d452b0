"""The model card written beside a merged model: what was merged, how, and how to reproduce it."""
from __future__ import annotations

from .plan import MergePlan


def model_card(plan: MergePlan) -> str:
    method = plan.method
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, fedmerge]",
        "---",
        f"# Merged with FedMerge: `{method.name}`",
        "",
        method.summary,
        "",
        f"- base model: `{plan.base.ref}`",
    ]
    lines += [f"- fine-tune: `{s.name}`" for s in plan.sources]
    if plan.config is not None:
        lines += ["", "## Configuration (mergekit-compatible YAML)", "", "```yaml", plan.config.to_yaml().rstrip(), "```",
                  "", "Reproduce with `python -m merging merge merge_config.yml OUT_DIR`."]
    if plan.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in plan.warnings]
    return "\n".join(lines) + "\n"
