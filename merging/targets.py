"""Where an output goes, checked before any work: one set of rules for every file or folder we write.

A merge, a similarity report, a study's report folder and a zoo build all write somewhere the user
typed. Each checks it the same way, so the same mistake gets the same one-line message whichever
command it was typed into: an empty or NUL-holding name, a name longer than the file system
allows, the root, a file where a folder is needed, and a place we cannot write. Permissions alone
do not tell the last one (root may write nowhere in /proc): a hidden folder is made there and
removed.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import MergeError, shown

NAME_MAX = 255  # bytes in one path component on the usual file systems


def sibling(target: Path, tag: str) -> Path:
    """A hidden name beside `target`, `.NAME.tag-xxxxxxxx`, NAME cut so that any legal name fits."""
    room = NAME_MAX - len(f"..{tag}-") - 8
    name = target.name.encode()[:room].decode(errors="ignore")
    return target.with_name(f".{name}.{tag}-{secrets.token_hex(4)}")


@contextmanager
def replaced(target: Path) -> Iterator[Path]:
    """A hidden file beside `target` to write; renamed onto `target` when the block ends without error, else
    removed: a Ctrl-C or a full disk leaves the previous file, not half of one, and a symlink is replaced,
    not written through."""
    temp = sibling(target, "tmp")
    try:
        yield temp
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def role(option: str, typed: str | os.PathLike) -> str:
    """How messages name the target: the option (or argument) and the path as typed."""
    text = os.fspath(typed)
    return f"{option} {shown(text)}" if text.strip() else option


def as_typed(typed: str | os.PathLike) -> Callable[[Path], str]:
    """Shows a path derived from `typed` the way the user typed it: relative if `typed` was."""
    if os.path.isabs(os.fspath(typed)):
        return lambda p: shown(str(p))
    return lambda p: shown(os.path.relpath(p))


def absolute(option: str, typed: str | os.PathLike, *, resolve_parent: bool = False) -> Path:
    """The target as an absolute path, or a MergeError naming it: not empty, no NUL, no name longer
    than NAME_MAX bytes, not the root.

    `resolve_parent` resolves the folder the target is in but keeps its own name (a symlink there
    is replaced, not followed): in `out/x/../x` a rename that replaces `x` would otherwise pull the
    ground from under `x/..`."""
    text, who = os.fspath(typed), role(option, typed)
    if not text.strip():
        raise MergeError(f"{who}: empty; name a file or folder")
    if "\0" in text:
        raise MergeError(f"{who}: not a valid path")
    if any(len(part.encode()) > NAME_MAX for part in Path(text).parts):
        raise MergeError(f"{who}: a name in the path is longer than {NAME_MAX} bytes")
    path = Path(text)
    if resolve_parent:
        path = path.resolve() if path.name in ("", ".", "..") else path.parent.resolve() / path.name
    else:
        path = Path(os.path.abspath(text))
    if path.parent == path:
        raise MergeError(f"{who}: the file system's root; name a folder under it")
    return path


def existing_folder(option: str, typed: str | os.PathLike, path: Path) -> Path:
    """The nearest folder that exists at or above `path` (where the missing ones will be made)."""
    ancestor = path
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MergeError(f"{role(option, typed)}: {as_typed(typed)(ancestor)} is a file, not a folder")
    return ancestor


def probe(option: str, typed: str | os.PathLike, folder: Path, name: str = "probe") -> None:
    """Make and remove a hidden folder in `folder`, or a MergeError saying why not. Its name is as
    long as `name` allows: the temporary folder a writer makes there later must fit too."""
    trial = sibling(folder / name, "probe")
    try:
        trial.mkdir()
        trial.rmdir()
    except OSError as exc:
        why = (exc.strerror or "not writable").lower()
        raise MergeError(f"{role(option, typed)}: cannot write there ({why})") from None


def output_file(option: str, typed: str | os.PathLike) -> Path:
    """A file to be written: not a folder, under folders (existing or to be made) we can write in."""
    path = absolute(option, typed)
    if path.is_dir():
        raise MergeError(f"{role(option, typed)}: is a folder; give a file name")
    probe(option, typed, existing_folder(option, typed, path.parent), path.name)
    return path


def output_folder(option: str, typed: str | os.PathLike, *, beside: bool = False,
                  resolve_parent: bool = False) -> Path:
    """A folder to be written: not a file, under folders we can write in. `beside`: it is built
    in a hidden folder next to it and renamed into place (a merge, a zoo), so its parent must take
    a new folder; else files are written into it. What it may already hold is the caller's rule
    (a merge needs --overwrite, a report folder is added to)."""
    path = absolute(option, typed, resolve_parent=resolve_parent)
    try:
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise MergeError(f"{role(option, typed)}: exists and is not a folder")
        folder = path if path.is_dir() and not beside else existing_folder(option, typed, path.parent)
    except OSError as exc:  # a folder we may not even look into
        raise MergeError(f"{role(option, typed)}: {(exc.strerror or 'cannot be used').lower()}") from None
    probe(option, typed, folder, path.name)
    return path
