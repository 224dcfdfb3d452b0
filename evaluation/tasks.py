"""Text-in / text-out tasks scored by exact match: the 'clients' of the federated merging demo.

Every task writes its prompt as ``"<keyword>: <input>="`` and expects the answer right after the
``=``, followed by ``<eos>``. The zoo's base was taught every task's skill under another keyword
(evaluation.zoo.BASE_FORMS; assets/zoo/README.md gives how well it learnt each) and answers ``?``
to keywords it never saw; each fine-tune teaches one keyword. What the set is built to show
(measured in assets/zoo/README.md):

* tasks with their own keyword merge: their task vectors act on their own prompts, so Task
  Arithmetic keeps both skills, even ``is_even`` and ``is_odd``, which read the same numbers and
  give opposite yes/no labels (the keyword tells them apart);
* ``sort`` and ``sort_desc`` are the designed conflict (data heterogeneity): two clients asked to
  ``sort`` the same letters, one ascending and one descending. Same prompts, incompatible answers:
  at most one can be right per prompt, and their task vectors fight.

Splits are disjoint by input: an input's split is fixed by a CRC32 of the input string (not by
Python's randomized ``hash``), and each (task, split) draws from its own seeded ``random.Random``,
so ``examples()`` returns the same list in every process.
"""
from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass, field
from typing import Callable

SPLITS = ("train", "validation", "test")
# Default sizes when n is None; tasks with a small input space return fewer (all there is).
DEFAULT_N = {"train": 5000, "validation": 300, "test": 300}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def split_of(x: str) -> str:
    """The split an input belongs to: 10% test, 10% validation, 80% train, decided by CRC32."""
    bucket = zlib.crc32(x.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    keyword: str
    make_input: Callable[[random.Random], str] = field(repr=False)
    solve: Callable[[str], str] = field(repr=False)
    max_new_tokens: int
    demo_inputs: tuple[str, ...] = ()

    def prompt(self, x: str) -> str:
        return f"{self.keyword}: {x}="

    @property
    def demo_prompts(self) -> list[str]:
        return [self.prompt(x) for x in self.demo_inputs]

    def examples(self, split: str = "test", n: int | None = None) -> list[Example]:
        """The first ``n`` distinct examples of ``split`` (deterministic; fewer if the input space runs out)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return list(_examples(self, split, DEFAULT_N[split] if n is None else n))

    @staticmethod
    def score(prediction: str, answer: str) -> bool:
        return prediction.strip() == answer.strip()


_CACHE: dict[tuple[str, str, int], tuple[Example, ...]] = {}


def _examples(task: Task, split: str, n: int) -> tuple[Example, ...]:
    key = (task.name, split, n)
    if key not in _CACHE:
        rng = random.Random(zlib.crc32(f"{task.name}/{split}".encode()))
        seen: set[str] = set()
        out: list[Example] = []
        misses = 0
        while len(out) < n and misses < 20000:
            x = task.make_input(rng)
            if x in seen or split_of(x) != split:
                misses += 1
                continue
            seen.add(x)
            misses = 0
            out.append(Example(task.prompt(x), task.solve(x)))
        _CACHE[key] = tuple(out)
    return _CACHE[key]


def _letters(lo: int = 3, hi: int = 8) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))
    return make


def _number(rng: random.Random) -> str:
    return str(rng.randint(0, 9999))


def _sum(rng: random.Random) -> str:
    # Fixed width (three digits + one digit) so each digit sits at a fixed position: with variable
    # widths a 1M model reached only 23% in 800 fine-tuning steps; fixed width reached 97%.
    return f"{rng.randint(0, 299):03d}+{rng.randint(0, 9)}"


def _add(x: str) -> str:
    a, b = x.split("+")
    return f"{int(a) + int(b):03d}"


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("reverse", "Reverse a lowercase string: reverse: abc= → cba", "reverse", _letters(), lambda x: x[::-1],
         10, ("planet", "merge", "abcdef")),
    Task("upper", "Upper-case a lowercase string: upper: abc= → ABC", "upper", _letters(), str.upper,
         10, ("planet", "merge", "hello")),
    Task("sort", "Sort letters ascending: sort: dbca= → abcd (conflicts with sort_desc)", "sort", _letters(),
         lambda x: "".join(sorted(x)), 10, ("planet", "merge", "dbca")),
    Task("sort_desc", "Sort letters descending under the same keyword: sort: dbca= → dcba (conflicts with sort)", "sort",
         _letters(), lambda x: "".join(sorted(x, reverse=True)), 10, ("planet", "merge", "dbca")),
    Task("add", "Add a digit to a three-digit number below 300: add: 147+8= → 155", "add", _sum, _add,
         4, ("147+8", "021+9", "099+1")),
    Task("is_even", "Is the number even? yes/no: is even: 4817= → no (opposite labels to is_odd)", "is even",
         _number, lambda x: "yes" if int(x) % 2 == 0 else "no", 4, ("4817", "42", "1000")),
    Task("is_odd", "Is the number odd? yes/no: is odd: 4817= → yes (opposite labels to is_even)", "is odd",
         _number, lambda x: "yes" if int(x) % 2 == 1 else "no", 4, ("4817", "42", "1000")),
]}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
