"""The one exception type users see: its message names the problem and is shown as is."""
from __future__ import annotations

import os


class MergeError(ValueError):
    """Bad input or an impossible merge, with a message meant for the user (no traceback)."""


def shown(path: str | os.PathLike, limit: int = 100) -> str:
    """A path as typed, cut in the middle when long: a message stays one readable line."""
    text = os.fspath(path)
    return text if len(text) <= limit else f"{text[:limit * 2 // 3]}…{text[-limit // 3:]}"


def os_error(role: str, exc: OSError) -> MergeError:
    """An OSError as one line naming the path's role ("output folder", "model x"), without the errno."""
    why = exc.strerror or str(exc)
    return MergeError(f"{role}: {why[0].lower() + why[1:] if why else 'cannot be used'}")


def tolerant_console() -> None:
    """Let stdout and stderr write characters their encoding lacks as escapes (λ, ρ, ×, … on an ASCII
    terminal): a command line's tables and messages must not turn into an encoding error at the end."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
