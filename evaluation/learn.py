"""The Learn tab's text: Task Arithmetic as FedAvg, the aggregators (from the registry), the scenarios."""
from __future__ import annotations

from typing import Sequence

from merging.registry import AGGREGATORS

from .scenarios import Scenario


def learn_markdown(scenarios: Sequence[Scenario] = ()) -> str:
    lines = [
        "## Task Arithmetic is one round of FedAvg",
        "Treat each fine-tune as one client of Federated Learning that trained locally from the same global "
        "model θ₀. Its update is the task vector τᵢ = θᵢ − θ₀. One round of FedAvg with server learning rate η "
        "gives θ₀ + η·Σ pᵢτᵢ, where pᵢ = nᵢ/Σn are the clients' data-size weights. In the app's terms:",
        "",
        "* **plain FedAvg (η = 1, equal data) is λ = 1/K** with every wᵢ = 1: the average of the K fine-tunes. "
        "With seven models λ = 0.3 is already ~2× that average (1/7 ≈ 0.14); λ = 1 is the *sum* of the updates.",
        "* **FedAvg's data-size weights are the wᵢ**: set wᵢ proportional to client i's examples nᵢ (and λ = η/Σwᵢ "
        "to keep the average), or tick `normalize` where the method has it.",
        "* A server learning rate η > 1 (FedOpt-style) is λ > 1/K: the merge extrapolates along the average update.",
        "",
        "What Federated Learning knows about when averaging fails carries over to merging:",
        "",
        "* **Data heterogeneity**: the tasks pull the weights in different directions. Look at the cosine "
        "similarity of the task vectors (whole model and layer by layer) and at their sign conflicts "
        "(Heterogeneity tab). In the per-layer heatmap the `other` column holds every tensor outside the "
        "transformer blocks (embeddings, final layer norm).",
        "* **Training heterogeneity**: fine-tunes ran different numbers of steps or learning rates. Plain "
        "averaging silently over-weights the longest-trained client: compare the task-vector norms with the "
        "steps and learning rates (the zoo's `reverse-long` ran 1600 steps at twice the learning rate of "
        "`reverse`'s 300, and without the replay the other fine-tunes used). FedNova divides each update by its steps.",
        "* **What this zoo shows** (measured, assets/zoo/README.md): fine-tunes with their own keyword merge in "
        "pairs; `sort` and `sort_desc` share the keyword `sort` but sort in opposite directions, a conflict "
        "no merge can fully solve, where centered clipping keeps more than Task Arithmetic; `reverse-long` in "
        "place of `reverse` takes over its pairs under Task Arithmetic (the other task drops to about 0%). Its task "
        "vector is about 5× `reverse`'s norm after 5.3× the steps (Heterogeneity tab, norms), so FedNova's division "
        "by the steps gives it the right size; yet FedNova wins the drop back in a few pairs only, because without "
        "replay the long client also changed the model's answers to other prompts: a change of direction, which "
        "no rescaling undoes (a long client retrained with replay points elsewhere too, and FedNova does worse "
        "there: evaluation/RESULTS.md). All seven at once still lose most of their skill with every aggregator: the "
        "task-count curve (Heterogeneity tab) shows Task Arithmetic keeping about 0.9 of the fine-tunes' accuracy "
        "in pairs and less with every task added (about 0.2 for all seven), and centered clipping and FedNova "
        "winning back more the more fine-tunes are merged, as FL's aggregators do when clients multiply.",
        "",
        "In every method below the merged model is θ₀ + λ·U, with U built from the weighted updates uᵢ = wᵢ·τᵢ. "
        "Each method has its own best λ: FedNova and the coordinate-wise median average the K updates instead of "
        "summing them, so they look broken at Task Arithmetic's λ and work near K times it (the search stretches "
        "their λ grid by K). The paper searches λ in {0.05, …, 2.00} and picks "
        "it, with ρ, by the best average *normalized* accuracy on validation (merged accuracy ÷ the task's own "
        "fine-tune) and reports on test: that is what *Auto-tune* and *Compare all aggregators* do.",
        "",
    ]
    if scenarios:
        lines += ["## What each scenario teaches", ""]
        for s in scenarios:
            lines.append(f"* **{s.title}** (`?scenario={s.id}`; {', '.join(s.models)}; {s.method}, λ = {s.lam:g}): "
                         f"{s.explain} *Claim, checked by a test on the shipped zoo:* {s.claim_text()}.")
        lines.append("")
    lines.append("## The aggregators")
    for fam, title in (("federated", "Federated Learning aggregators"), ("baseline", "Merging baselines (mergekit)")):
        lines.append(f"### {title}")
        for name, agg in AGGREGATORS.items():
            if agg.family == fam:
                hp = ", ".join(f"`{p.name}`" for p in agg.params) or "none"
                lines.append(f"* **{name}**: {agg.summary} *Hyperparameters:* {hp}.")
        lines.append("")
    return "\n".join(lines)
