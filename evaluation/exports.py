"""Export folders for downloads: one per session, deleted when the session ends or after a TTL,
all of them under one byte cap. A failed export leaves nothing behind.

The folders live inside Gradio's upload folder (GRADIO_TEMP_DIR, default <tmp>/gradio) so that
Gradio serves the returned file where it is instead of copying it into its cache: deleting the
folder then deletes every copy of the export. FEDMERGE_EXPORT_DIR overrides the place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from merging.errors import MergeError

from . import limits as _limits


def default_root() -> Path:
    if os.environ.get("FEDMERGE_EXPORT_DIR"):
        return Path(os.environ["FEDMERGE_EXPORT_DIR"]).resolve()
    gradio_tmp = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return Path(gradio_tmp).resolve() / "fedmerge-exports"


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class ExportStore:
    """<root>/<session id>/<export>/...: created per export, swept by age, released per session."""

    def __init__(self, root: str | os.PathLike | None = None):
        self._root = Path(root).resolve() if root is not None else None
        self._lock = threading.RLock()
        self._active: set[Path] = set()  # exports being written: never swept
        self._sweeper: threading.Thread | None = None

    @property
    def root(self) -> Path:
        return self._root or default_root()

    def used(self) -> int:
        return folder_bytes(self.root) if self.root.exists() else 0

    @contextmanager
    def export(self, owner: str, need_bytes: int = 0, kind: str | None = None) -> Iterator[Path]:
        """A fresh folder for one export of `owner`; removed again if the body raises. With `kind` (e.g. "zip"),
        the owner's earlier finished exports of that kind are deleted first: the page offers only the newest,
        and each old one held its share of the space until its TTL (a few presses filled it for everyone)."""
        lim = _limits.current()
        self.sweep(lim.export_ttl)
        self._start_sweeper()
        with self._lock:
            owner_dir = self.root / _safe(owner)
            if kind is not None:
                for old in owner_dir.glob(f"export-{_safe(kind)}-*"):
                    if old not in self._active:
                        shutil.rmtree(old, ignore_errors=True)
            if self.used() + need_bytes > lim.export_bytes:
                raise MergeError("exports: the server's space for downloads is full; try again in a few minutes")
            owner_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"export-{_safe(kind)}-" if kind is not None else "export-"
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=owner_dir))
            self._active.add(folder)
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._active.discard(folder)
                os.utime(folder) if folder.exists() else None  # its TTL runs from when it is ready

    def release(self, owner: str) -> None:
        """Delete every export of `owner` (its session ended)."""
        with self._lock:
            shutil.rmtree(self.root / _safe(owner), ignore_errors=True)

    def sweep(self, ttl: float) -> int:
        """Delete exports older than `ttl` seconds (and emptied session folders); returns how many."""
        with self._lock:  # not while an export creates its folder
            return self._sweep(ttl)

    def _sweep(self, ttl: float) -> int:
        root, now, n = self.root, time.time(), 0
        if not root.exists():
            return 0
        for owner_dir in list(root.iterdir()):
            if not owner_dir.is_dir():
                continue
            for export in list(owner_dir.iterdir()):
                if export in self._active:
                    continue
                try:
                    old = now - export.stat().st_mtime > ttl
                except OSError:
                    continue
                if old:
                    shutil.rmtree(export, ignore_errors=True) if export.is_dir() else export.unlink(missing_ok=True)
                    n += 1
            try:
                owner_dir.rmdir()  # only when empty
            except OSError:
                pass
        return n

    def _start_sweeper(self) -> None:
        """A daemon thread that sweeps expired exports even when nobody exports any more."""
        with self._lock:
            if self._sweeper is not None and self._sweeper.is_alive():
                return

            def loop():
                while True:
                    ttl = _limits.current().export_ttl
                    time.sleep(max(1.0, min(60.0, ttl / 4)))
                    try:
                        self.sweep(ttl)
                    except OSError:
                        pass

            self._sweeper = threading.Thread(target=loop, name="fedmerge-export-sweeper", daemon=True)
            self._sweeper.start()


def _safe(owner: str) -> str:
    return "".join(c for c in str(owner) if c.isalnum() or c in "-_")[:64] or "anonymous"


EXPORTS = ExportStore()
