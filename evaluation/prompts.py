"""What a prompt asks for: the tasks written in its format, their expected answers, how many
tokens to generate for it, and the right/wrong mark of an output."""
from __future__ import annotations

import re
from typing import Sequence

from .tasks import TASKS

FREE_TEXT_TOKENS = 16  # generation limit of a prompt in no task's format


def prompt_answers(prompt: str) -> dict[str, str | None]:
    """Every task whose format `prompt` is written in, with its correct answer (None when the input
    does not solve, e.g. "add: x+y=" with non-numbers). Tasks that share a keyword both appear."""
    out: dict[str, str | None] = {}
    for task in TASKS.values():
        m = re.fullmatch(re.escape(task.keyword) + r": (.*)=", prompt.strip())
        if m:
            try:
                out[task.name] = task.solve(m.group(1))
            except Exception:
                out[task.name] = None
    return out


def expected_answer(prompt: str) -> tuple[str | None, list[str]]:
    """(what the table shows as expected, the answers that count as right) for a prompt.

    Tasks that share a keyword (the zoo's designed conflict: sort and sort_desc) each have their
    answer; both count as right and the cell names whose is which."""
    answers = {t: a for t, a in prompt_answers(prompt).items() if a is not None}
    distinct = list(dict.fromkeys(answers.values()))
    if len(distinct) <= 1:
        return (distinct[0] if distinct else None), distinct
    return " / ".join(f"{a} ({t})" for t, a in answers.items()), distinct


def default_prompts(tasks: Sequence[str], per_task: int = 1) -> list[str]:
    """Each task's demo prompts, each prompt once (tasks that share a keyword share prompts)."""
    out: list[str] = []
    for t in tasks:
        out += TASKS[t].demo_prompts[:per_task]
    return list(dict.fromkeys(out))


def max_new_tokens(prompts: Sequence[str]) -> list[int]:
    """Each prompt's own generation limit: its task's, or FREE_TEXT_TOKENS for free text."""
    limits = []
    for p in prompts:
        tasks = prompt_answers(p)
        limits.append(max(TASKS[t].max_new_tokens for t in tasks) if tasks else FREE_TEXT_TOKENS)
    return limits


def mark(output: str, answers: Sequence[str] | None) -> str:
    """`output` prefixed ✓ / ✗ against the right answers (unchanged for free text: `answers` None)."""
    if answers is None:
        return output
    return ("✓ " if output.strip() in {a.strip() for a in answers} else "✗ ") + output
