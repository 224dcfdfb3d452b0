"""What one request and one session may ask of a public deployment, and the checks that enforce it.

Every limit has a default fit for a public Space and an environment variable for a private
deployment; `current()` reads them at each request, so a running server picks up no surprise
and tests can change them. The checks run before any work and raise `MergeError` with one line
that names the field; `user_message` turns any exception into such a line with no server path,
errno, repr or traceback in it (the traceback goes to the server log for unexpected errors).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from merging.errors import MergeError

REPO = Path(__file__).resolve().parent.parent
from merging.registry import AGGREGATORS

log = logging.getLogger("fedmerge")

WEIGHT_RANGE = (-1.0, 2.0)  # the per-model sliders
LAMBDA_RANGE = (0.0, 8.0)  # the λ slider: averaging aggregators (fednova, median) need λ near K
# Hyperparameters whose registry bound (mergekit's reach, for the CLI) would let one live merge run for
# minutes: each Karcher iteration is a pass over every tensor of every model (1000 on the 1M-parameter
# zoo: 29 s; mergekit's default is 10).
LIVE_CAPS: dict[tuple[str, str], float] = {("karcher", "max_iter"): 100}


def live_param(method: str, p):
    """`p` (a registry HyperParam of `method`) as the app offers it: its upper bound cut to LIVE_CAPS."""
    from dataclasses import replace

    cap = LIVE_CAPS.get((method, p.name))
    return p if cap is None or (p.high is not None and p.high <= cap) else replace(p, high=cap)


def _env_int(name: str, default: int) -> int:
    try:
        return max(0, int(float(os.environ.get(name, default))))
    except ValueError:
        return default


def _env_float(name: str, default: float) -> float:
    try:
        v = float(os.environ.get(name, default))
        return v if math.isfinite(v) and v >= 0 else default
    except ValueError:
        return default


@dataclass(frozen=True)
class Limits:
    max_prompts: int = 16  # FEDMERGE_MAX_PROMPTS: prompt lines per request
    max_prompt_chars: int = 200  # FEDMERGE_MAX_PROMPT_CHARS: characters per prompt line
    max_models: int = 10  # FEDMERGE_MAX_MODELS: fine-tunes per session (zoo + added)
    max_jobs: int = 1  # FEDMERGE_MAX_JOBS: long jobs (search, study, export) at once per session
    session_ttl: int = 3600  # FEDMERGE_SESSION_TTL: seconds before an idle session is freed
    # FEDMERGE_MAX_SESSIONS: the app's open sessions (browser tabs, gradio_client sessions) at once. Each holds its own
    # merged model, about one copy of the base (measured 1.1×: 4 MiB on the shipped zoo, ~0.5 GiB for a 124M-parameter
    # float32 base), and two cores serve few visitors at a time; lower it for large bases
    max_sessions: int = 32
    export_ttl: int = 1800  # FEDMERGE_EXPORT_TTL: seconds an export stays downloadable
    export_bytes: int = 4 * 2 ** 30  # FEDMERGE_EXPORT_GB: all exports on disk together
    ref_cache_bytes: int = 32 * 2 ** 20  # FEDMERGE_REF_CACHE_MB: cached base/fine-tune outputs and scores

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(
            max_prompts=max(1, _env_int("FEDMERGE_MAX_PROMPTS", cls.max_prompts)),
            max_prompt_chars=max(1, _env_int("FEDMERGE_MAX_PROMPT_CHARS", cls.max_prompt_chars)),
            max_models=max(1, _env_int("FEDMERGE_MAX_MODELS", cls.max_models)),
            max_jobs=max(1, _env_int("FEDMERGE_MAX_JOBS", cls.max_jobs)),
            session_ttl=max(1, _env_int("FEDMERGE_SESSION_TTL", cls.session_ttl)),
            max_sessions=max(1, _env_int("FEDMERGE_MAX_SESSIONS", cls.max_sessions)),
            export_ttl=max(1, _env_int("FEDMERGE_EXPORT_TTL", cls.export_ttl)),
            export_bytes=int(_env_float("FEDMERGE_EXPORT_GB", cls.export_bytes / 2 ** 30) * 2 ** 30),
            ref_cache_bytes=int(_env_float("FEDMERGE_REF_CACHE_MB", cls.ref_cache_bytes / 2 ** 20) * 2 ** 20),
        )

    def describe(self) -> str:
        """The limits as one line for the UI."""
        return (f"Limits: {self.max_prompts} prompts of at most {self.max_prompt_chars} characters "
                f"(longer than the model's context: the start is cut, with a note), {self.max_models} models "
                f"per session, {self.max_jobs} long job at a time per session, at most {self.max_sessions} open "
                f"sessions on the server; exports stay "
                f"{self.export_ttl // 60} min and are deleted when the session ends.")


def current() -> Limits:
    return Limits.from_env()


# ---------------------------------------------------------------------------- checks

def check_prompts(text: Any, limits: Limits | None = None) -> list[str]:
    """The non-empty prompt lines, or a MergeError naming the bound they break."""
    limits = limits or current()
    if text is None:
        return []
    if not isinstance(text, str):
        raise MergeError("prompts: expected text, one prompt per line")
    if len(text) > 4 * limits.max_prompts * (limits.max_prompt_chars + 1) + 100_000:  # before splitting it
        raise MergeError(f"prompts: {len(text)} characters; at most {limits.max_prompts} prompts of "
                         f"{limits.max_prompt_chars} characters each")
    lines = [p.strip() for p in text.splitlines()]
    lines = [p for p in lines if p]
    if len(lines) > limits.max_prompts:
        raise MergeError(f"prompts: {len(lines)} lines; at most {limits.max_prompts} prompts per request")
    for i, p in enumerate(lines, 1):
        if len(p) > limits.max_prompt_chars:
            raise MergeError(f"prompts: line {i} has {len(p)} characters; at most {limits.max_prompt_chars}")
    return lines


def check_number(field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or value is None:
        raise MergeError(f"{field}: expected a number between {low:g} and {high:g}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{field}: expected a number between {low:g} and {high:g}") from None
    if not math.isfinite(x) or not low <= x <= high:
        raise MergeError(f"{field}: {value!r:.20} is not a number between {low:g} and {high:g}")
    return x


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in AGGREGATORS:
        raise MergeError(f"unknown merge method {str(method)[:40]!r}; known: {', '.join(AGGREGATORS)}")
    return method


def check_weights(names: Sequence[str], values: Sequence[Any]) -> list[float]:
    """One finite weight per selected model, within the sliders' range (None: the default 1)."""
    return [1.0 if v is None else check_number(f"weight of {n}", v, *WEIGHT_RANGE) for n, v in zip(names, values)]


def check_hyper(method: str, hyper: Mapping[str, Any], k: int) -> None:
    """The registry's own checks of `method`'s hyperparameters, before any work."""
    agg = AGGREGATORS[method]
    agg.check_model_count(k)
    given = {key: v for key, v in hyper.items() if v is not None}
    agg.check_params(given, k)
    for key, value in given.items():
        cap = LIVE_CAPS.get((method, key))
        if cap is not None and not isinstance(value, (list, dict)) and float(value) > cap:
            raise MergeError(f"{key}: at most {cap:g} here (each iteration is a pass over every model; "
                             f"the command line takes up to {agg.param(key).high:g})")


def check_selection(selection: Any, names: Sequence[str]) -> list[str]:
    """The chosen model names: known ones, at least one."""
    if selection is None:
        selection = []
    if isinstance(selection, str) or not isinstance(selection, (list, tuple)):
        raise MergeError("models: expected a list of model names")
    known = set(names)
    unknown = [s for s in selection if s not in known]
    if unknown:
        raise MergeError(f"models: unknown model {str(unknown[0])[:60]!r}")
    if not selection:
        raise MergeError("models: select at least one fine-tuned model")
    twice = next((s for i, s in enumerate(selection) if s in selection[:i]), None)
    if twice is not None:  # it would merge once, and the weights after it would slide onto other models
        raise MergeError(f"models: {str(twice)[:60]!r} given twice")
    return list(selection)


def check_text(field: str, value: Any, max_chars: int = 512) -> str:
    """A short single-line text field (model reference, name, repository id)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MergeError(f"{field}: expected text")
    value = value.strip()
    if len(value) > max_chars:
        raise MergeError(f"{field}: {len(value)} characters; at most {max_chars}")
    if any(ord(c) < 32 for c in value):
        raise MergeError(f"{field}: contains control characters")
    return value


# ---------------------------------------------------------------------------- messages

_ABS_PATH = re.compile(r"(?<![\w.~/\x00])(/[^\s'\"(),:;\x00]+)")  # \x00: around a path kept as typed


def scrub_paths(text: str, roots: Iterable[tuple[str | os.PathLike, str]] = ()) -> str:
    """`text` with absolute server paths replaced: under a known root by the root's label, any
    other by its last component."""
    pairs = sorted(((str(Path(r)), label) for r, label in roots), key=lambda p: -len(p[0]))
    for root, label in pairs:
        if len(root) <= 1:
            continue
        text = text.replace(root + os.sep, f"{label}/" if label else "").replace(root, label or ".")
    return _ABS_PATH.sub(lambda m: Path(m.group(1)).name or "/", text)


def display_roots(zoo: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The known roots and how paths under them are shown: the zoo as `zoo/…`, the working
    directory as relative paths, extra allowed folders by their name, temp folders as nothing."""
    import tempfile

    roots: list[tuple[str, str]] = []
    if zoo is not None and not Path(zoo).resolve().is_relative_to(Path.cwd()):  # else: relative to the cwd
        zoo = Path(zoo).resolve()  # the shipped zoo as in the repository (an exported YAML re-runs from there)
        roots.append((str(zoo), str(zoo.relative_to(REPO)) if zoo.is_relative_to(REPO) else "zoo"))
    for p in os.environ.get("FEDMERGE_ALLOWED_DIRS", "").split(os.pathsep):
        if p.strip():
            q = Path(p).expanduser().resolve()
            roots.append((str(q), q.name))
    roots.append((os.getcwd(), ""))
    roots.append((tempfile.gettempdir(), "tmp"))
    return roots


def user_message(exc: BaseException, zoo: str | os.PathLike | None = None, action: str = "",
                 typed: Iterable[Any] = ()) -> str:
    """One line for the user: a MergeError's own message without server paths (what the user
    typed, `typed`, is shown as typed); for anything else a generic line (the traceback goes to
    the server log, not to the user)."""
    if isinstance(exc, MergeError):
        text = str(exc).splitlines()[0] if str(exc) else "invalid input"
        kept = sorted({t.strip() for t in typed if isinstance(t, str) and "/" in t and 0 < len(t.strip()) <= 512},
                      key=len, reverse=True)
        for i, t in enumerate(kept):
            text = text.replace(t, f"\x00{i}\x00")
        text = scrub_paths(text, display_roots(zoo))
        for i, t in enumerate(kept):
            text = text.replace(f"\x00{i}\x00", t)
        return text[:600]
    if isinstance(exc, torch.OutOfMemoryError):  # on a GPU (FEDMERGE_DEVICE)
        log.warning("GPU out of memory%s", f" in {action}" if action else "")
        return (f"the GPU ran out of memory{f' in {action}' if action else ''}: select fewer or smaller models "
                "(or run the app with FEDMERGE_DEVICE=cpu)")
    log.error("unexpected error%s", f" in {action}" if action else "", exc_info=exc)
    return f"internal error{f' in {action}' if action else ''}; it was logged. Try again or reload the page."
