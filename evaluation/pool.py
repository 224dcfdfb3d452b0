"""The models a session can merge: a base and its fine-tunes, loaded and validated once, with the
stack of their task vectors from the shared `merging.cache.CACHE` (read-only: sessions share it).

A `ModelPool` never changes: adding a model or switching the base loads a new pool (the shared
cache makes that cheap for what was loaded before), so nothing holding the old one sees it move.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from merging.cache import StackCache
from merging.checkpoints import Checkpoint
from merging.errors import MergeError, shown
from merging.live import TaskVectorStack
from merging.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ZOO = ROOT / "assets" / "zoo"
BIG_MODEL_PARAMS = 20_000_000


@dataclass
class ModelSpec:
    """One fine-tune (or LoRA adapter) the session can merge."""

    name: str
    ref: str
    task: str | None = None
    source: str = "zoo"  # "zoo" or "added"
    variant_of: str | None = None


def zoo_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_ZOO", str(DEFAULT_ZOO))).resolve()


def read_zoo_index(root: Path, where: str | None = None) -> dict[str, Any]:
    """A zoo's zoo.json, checked: a base and a non-empty list of fine-tunes, each a folder of the zoo
    with a unique name and a known task (the studies and the app score it on that task); `variant_of`
    names one of them. A MergeError naming `where` (default: the zoo's folder) and what is wrong."""
    from .tasks import TASKS

    where = where or f"the zoo at {shown(str(root))}"
    index = root / "zoo.json"
    if not root.is_dir():
        raise MergeError(f"{where}: not a folder")
    if not index.exists():
        raise MergeError(f"{where}: no zoo.json (a zoo is built by `python -m evaluation build-zoo`)")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise MergeError(f"{where}: zoo.json: {(exc.strerror or 'unreadable').lower()}") from None
    except UnicodeDecodeError as exc:
        raise MergeError(f"{where}: zoo.json is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise MergeError(f"{where}: zoo.json is not valid JSON ({str(exc)[:120]})") from None

    def folder(entry, what: str) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get("folder"), str) or not entry["folder"]:
            raise MergeError(f"{where}: zoo.json: {what}: expected a mapping with a \"folder\"")
        if not (root / entry["folder"]).is_dir():
            raise MergeError(f"{where}: zoo.json: {what}: no folder {entry['folder']!r} in the zoo")

    if not isinstance(data, dict):
        raise MergeError(f"{where}: zoo.json: expected a mapping with \"base\" and \"finetunes\"")
    folder(data.get("base"), "base")
    finetunes = data.get("finetunes")
    if not isinstance(finetunes, list) or not finetunes:
        raise MergeError(f"{where}: zoo.json: finetunes: expected a non-empty list of fine-tunes")
    names = []
    for i, entry in enumerate(finetunes):
        folder(entry, f"finetunes[{i}]")
        name, task = entry.get("name"), entry.get("task")
        if not isinstance(name, str) or not name:
            raise MergeError(f"{where}: zoo.json: finetunes[{i}]: expected a \"name\"")
        if name in names:
            raise MergeError(f"{where}: zoo.json: finetunes[{i}]: the name {name!r} is given twice")
        if task not in TASKS:
            raise MergeError(f"{where}: zoo.json: finetunes[{i}] ({name}): task {task!r} is not one of the "
                             f"evaluation tasks ({', '.join(TASKS)})")
        names.append(name)
    for i, entry in enumerate(finetunes):
        if entry.get("variant_of") is not None and entry["variant_of"] not in names:
            raise MergeError(f"{where}: zoo.json: finetunes[{i}]: variant_of {entry['variant_of']!r} is not a "
                             "fine-tune of the zoo")
    return data


def read_zoo(root: str | os.PathLike | None = None) -> tuple[str, list[ModelSpec]]:
    """(base folder, fine-tune specs) from a zoo's zoo.json (`read_zoo_index` checks it)."""
    root = Path(root) if root is not None else zoo_dir()
    data = read_zoo_index(root)
    base = str(root / data["base"]["folder"])
    specs = [ModelSpec(e["name"], str(root / e["folder"]), e.get("task"), "zoo", e.get("variant_of"))
             for e in data["finetunes"]]
    return base, specs


def default_threads(zoo: str | os.PathLike | None = None) -> int:
    """Torch threads for the app: FEDMERGE_THREADS if set; else 1 for small models (per-op overhead
    dominates, and concurrent requests each get a core), every core from BIG_MODEL_PARAMS parameters
    up (decoding a GPT-2-sized model is compute-bound: two cores nearly halve a live update)."""
    if os.environ.get("FEDMERGE_THREADS"):
        return max(1, int(os.environ["FEDMERGE_THREADS"]))
    try:
        base = Checkpoint(read_zoo(zoo)[0])
        n = sum(math.prod(base.shape(k)) for k in base.keys())
    except (MergeError, OSError, ValueError):
        return 1
    return (os.cpu_count() or 1) if n >= BIG_MODEL_PARAMS else 1


def allowed_roots(zoo: Path | None = None) -> list[Path]:
    """Local folders users may load from: the zoo plus FEDMERGE_ALLOWED_DIRS (os.pathsep-separated)."""
    roots = [zoo or zoo_dir()]
    extra = os.environ.get("FEDMERGE_ALLOWED_DIRS", "")
    roots += [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p.strip()]
    return roots


class ModelPool:
    """A base, its fine-tunes (`specs`, in stack order) and their `TaskVectorStack`; never written to."""

    def __init__(self, cache: StackCache, base_ref: str, specs: Sequence[ModelSpec], stack: TaskVectorStack,
                 tokenizer: Any, **opts: Any):
        self.cache, self.base_ref, self.specs, self.stack, self.tokenizer = cache, base_ref, list(specs), stack, tokenizer
        self._opts = opts  # allow_hub, allowed_roots: how the base was allowed to load

    @classmethod
    def load(cls, cache: StackCache, base_ref: str, specs: Sequence[ModelSpec], *, allow_hub: bool,
             allowed_roots: Sequence[Path], progress: Progress | None = None) -> "ModelPool":
        """Load (from the shared cache) the stack of `specs` over `base_ref`: MergeError for bad models."""
        if not specs:
            raise MergeError("add at least one fine-tuned model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise MergeError(f"two models are named {next(n for n in names if names.count(n) > 1)!r}; rename one")

        def tick(fraction, name):
            if progress:
                progress(fraction, f"task vectors: {name}")

        opts = dict(allow_hub=allow_hub, allowed_roots=list(allowed_roots))
        stack = cache.get_stack(base_ref, [s.ref for s in specs], names, progress=tick, **opts)
        if progress:
            progress(1.0, "model")
        _, tokenizer = cache.base_model(base_ref, **opts)
        return cls(cache, base_ref, specs, stack, tokenizer, **opts)

    def own_model(self):
        """A private copy of the base model (callers write merges into it; the template stays shared)."""
        return self.cache.own_model(self.base_ref, **self._opts)[0]

    def index(self, name: str) -> int:
        for i, s in enumerate(self.specs):
            if s.name == name:
                return i
        raise MergeError(f"no model named {name!r} in this session")

    def name(self, which: str | int) -> str:
        """'base' or a fine-tune's name, for progress texts."""
        return "base" if which == "base" else self.specs[int(which)].name
