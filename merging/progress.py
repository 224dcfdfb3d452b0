"""The one progress callback type, shared by the library, its CLI and every package built on it (scores, app).

`progress(fraction, text)`: fraction done in [0, 1] and what is being done. Gradio's
`gr.Progress` and a tqdm bar both take this form without adapters that count.
"""
from __future__ import annotations

from typing import Callable

Progress = Callable[[float, str], None]


def report(progress: Progress | None, done: int, total: int, text: str) -> None:
    """Report `done` of `total` steps (no-op without a callback)."""
    if progress is not None:
        progress(done / max(1, total), text)
