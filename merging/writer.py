"""Write a merged model folder: sharded safetensors streamed tensor by tensor, config, tokenizer, card.

The safetensors header is computed up front from the planned names, shapes and dtypes, so each
tensor (or block of its rows) is written as soon as it is merged: peak memory is one block, not one
shard. Everything goes to a hidden temporary folder beside the target and is renamed into place at
the end: a failed or killed merge leaves no folder that looks complete. The bytes go out on a background
thread (a write releases the GIL), so writing one tensor overlaps merging and reading the next;
at most `_PENDING` merged tensors wait for it.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any, Iterable

import torch

from . import targets
from .errors import MergeError, os_error, shown
from .targets import sibling as _sibling

_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
DEFAULT_SHARD_BYTES = 2 * 1024**3
_PENDING = 2  # merged tensors queued for the writing thread (bounds the extra memory)


def _partial_dir(target: Path) -> Path:
    """A new hidden folder beside the target, with the mode the umask gives like any folder the user
    makes (tempfile.mkdtemp's is always 0700, and the folder is renamed into place as it is)."""
    for _ in range(100):
        path = _sibling(target, "partial")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise MergeError(f"output folder: cannot create a temporary folder beside {shown(target)}")


def output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output folder as an absolute path, checked before any work (`targets`): a usable name,
    not an existing file or (without `overwrite`) a non-empty folder, in a folder that takes the
    hidden one it is built in. The parent is resolved first (`targets.absolute`)."""
    path = targets.output_folder("output folder", out_dir, beside=True, resolve_parent=True)
    try:
        if path.is_dir() and not overwrite and any(path.iterdir()):
            raise MergeError(f"output folder {shown(os.fspath(out_dir))}: folder exists and is not empty "
                             "(pass --overwrite to replace it)")
    except OSError as exc:
        raise os_error(f"output folder {shown(os.fspath(out_dir))}", exc) from None
    return path


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def plan_shards(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Group tensor indices into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        b = _nbytes(shape, dtype)
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += b
    return shards


class StreamingModelWriter:
    """Writes tensors in the announced order straight into pre-laid-out safetensors shards."""

    def __init__(self, out_dir: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 *, shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False):
        self.out_dir = output_folder(out_dir, overwrite)
        self.overwrite = overwrite
        self._role = f"output folder {shown(out_dir)}"
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = _partial_dir(self.out_dir)
        except OSError as exc:
            raise os_error(f"{self._role}: cannot create it", exc) from None
        self.specs = specs
        self.shards = plan_shards(specs, shard_bytes)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = {i: s for s, idx in enumerate(self.shards) for i in idx}
        self._next = 0
        self._rows = 0  # rows of tensor `_next` already written (a tensor may come in blocks of rows)
        self._handle = None
        self._open_shard = -1
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in specs)
        self._queue: queue.Queue = queue.Queue(maxsize=_PENDING)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        """The writing thread: shard headers and tensor bytes, in order, until the None sentinel."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep draining so the producer never blocks
            s, data = item
            try:
                if s != self._open_shard:
                    self._start_shard(s)
                self._handle.write(memoryview(data))
            except BaseException as exc:  # reported by the next write() or by finish()
                self._error = exc

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, OSError):
                raise os_error(f"{self._role}: writing failed", err) from err
            raise err

    def _start_shard(self, s: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.shards[s]:
            name, shape, dtype = self.specs[i]
            b = _nbytes(shape, dtype)
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + b]}
            offset += b
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.tmp / self.files[s], "wb")
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)
        self._open_shard = s

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor: whole, or its next block of rows (dim 0) until all rows are in."""
        i = self._next
        exp_name, shape, dtype = self.specs[i]
        shape = tuple(shape)
        got = tuple(tensor.shape)
        whole = got == shape
        block = (len(got) == len(shape) > 0 and got[1:] == shape[1:] and self._rows + got[0] <= shape[0])
        if name != exp_name or tensor.dtype != dtype or not (whole and self._rows == 0 or block):
            raise RuntimeError(f"writer expected {exp_name} {shape} {dtype} (rows from {self._rows}), "
                               f"got {name} {got} {tensor.dtype}")
        if self._error is not None:
            self._stop()
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._queue.put((self._shard_of[i], data))
        if whole or self._rows + got[0] == shape[0]:
            self._next, self._rows = self._next + 1, 0
        else:
            self._rows += got[0]

    def add_file(self, name: str, content: str | bytes) -> None:
        try:
            (self.tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        except OSError as exc:
            raise os_error(f"{self._role}: writing {name} failed", exc) from None

    def copy_files(self, files: Iterable[Path]) -> None:
        for f in files:
            try:
                shutil.copyfile(f, self.tmp / f.name)
            except OSError as exc:
                raise os_error(f"copying {f.name}", exc) from None

    def finish(self) -> Path:
        """Close the last shard, write the index, and move the folder into place."""
        if self._next != len(self.specs):
            raise RuntimeError(f"writer got {self._next} of {len(self.specs)} tensors")
        self._stop()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {self.specs[i][0]: self.files[s] for s, idx in enumerate(self.shards) for i in idx}}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2))
        self._swap()
        return self.out_dir

    def _swap(self) -> None:
        """Rename the finished folder into place. Without `overwrite` one rename does it, and fails
        if the target was filled meanwhile (another merge to the same folder): the first one to
        finish keeps it. With `overwrite` the old folder (or link) is moved aside first and put back
        if that fails or is interrupted: the target is always either the old or the new folder."""
        if not self.overwrite and not self.out_dir.is_symlink():
            try:
                os.rename(self.tmp, self.out_dir)  # atomic; replaces only a missing or empty folder
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise MergeError(f"{self._role}: something was written there while merging (another "
                                     "merge to the same folder?); left as it is, pass --overwrite to replace "
                                     "it") from None
                raise os_error(f"{self._role}: cannot move the merged model into place", exc) from None
            return
        old = None
        try:
            if self.out_dir.exists() or self.out_dir.is_symlink():
                old = _sibling(self.out_dir, "old")
                os.replace(self.out_dir, old)
            os.replace(self.tmp, self.out_dir)
        except BaseException as exc:
            if old is not None and not self.out_dir.exists():
                os.replace(old, self.out_dir)
            if isinstance(exc, OSError):
                raise os_error(f"{self._role}: cannot move the merged model into place", exc) from None
            raise
        if old is not None:
            if old.is_symlink() or not old.is_dir():
                old.unlink(missing_ok=True)  # the link only, never what it points to
            else:
                shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        try:
            self._stop()
        except MergeError:
            pass  # already failing: the first error is the one reported
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "StreamingModelWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
