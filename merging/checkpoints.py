"""Read checkpoints lazily, one tensor at a time, from a folder, a file or a Hub id.

safetensors first (their headers give names, shapes and sizes without reading data); a `.bin`
only through `torch.load(weights_only=True)`, which refuses pickled code.
"""
from __future__ import annotations

import json
import os
import re
import struct
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open

from .errors import MergeError, os_error, shown

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "vocab.txt",
)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


INDEX = {".safetensors": "model.safetensors.index.json", ".bin": "pytorch_model.bin.index.json"}
MAX_REF_CHARS = 512  # a Hub id is at most 96 characters; longer local paths are refused unread
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def resolve(ref: str | os.PathLike, allow_hub: bool = True, allowed_roots: Iterable[Path] | None = None) -> Path:
    """A local folder or file as a Path; a Hub id is downloaded (weights, config, tokenizer only).

    `allowed_roots`, when given, restricts local paths to those folders (a public app must not
    read arbitrary files of its host): the path is checked lexically first, so a path outside
    them is refused without touching the disk, then again after resolving symlinks.
    """
    text = str(ref)
    if allowed_roots is not None:
        return _resolve_allowed(text, allow_hub, [Path(r).resolve() for r in allowed_roots])
    if "\0" in text:
        raise MergeError(f"{shown(text)!r}: not a valid path (it contains a NUL character)")
    path = Path(os.path.expanduser(text))
    try:
        if path.exists():
            return path.resolve()
    except OSError as exc:  # a name over 255 bytes, a path too long, a folder we may not enter
        raise os_error(shown(text), exc) from None
    revision = None
    if text.count("@") == 1 and not text.startswith("@") and not text.endswith("@"):  # mergekit's model@revision
        name, _, revision = text.partition("@")
        try:
            if Path(os.path.expanduser(name)).exists():  # a local folder has one version (as in mergekit)
                return Path(os.path.expanduser(name)).resolve()
        except OSError:
            pass
        text = name
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith((".safetensors", ".bin"))
    if looks_local or not allow_hub:
        raise MergeError(f"{ref}: no such file or folder")
    return _download(text, revision)


def _resolve_allowed(text: str, allow_hub: bool, roots: list[Path]) -> Path:
    if not text or len(text) > MAX_REF_CHARS or any(ord(c) < 32 for c in text):
        shown = text[:40] + "…" if len(text) > 40 else text
        raise MergeError(f"{shown!r}: not a valid model path or Hub id (at most {MAX_REF_CHARS} characters, "
                         "no control characters)")
    if text.startswith("~"):
        raise MergeError(f"{text}: local paths outside the allowed folders are not accepted here")
    lexical = Path(os.path.normpath(os.path.join(os.getcwd(), text)))  # no disk access
    inside = any(lexical.is_relative_to(r) for r in roots)
    if not inside:
        if allow_hub and _HUB_ID.fullmatch(text) and not text.startswith("."):
            return _download(text)
        raise MergeError(f"{text}: local paths outside the allowed folders are not accepted here")
    try:
        exists = lexical.exists()
        path = lexical.resolve() if exists else lexical
    except OSError:
        exists = False
    if not exists:
        if allow_hub and _HUB_ID.fullmatch(text):
            return _download(text)
        raise MergeError(f"{text}: no such file or folder")
    if not any(path.is_relative_to(r) for r in roots):  # a symlink out of the allowed folders
        raise MergeError(f"{text}: local paths outside the allowed folders are not accepted here")
    return path


def _download(repo_id: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise MergeError(f"{repo_id}: not a local path, and huggingface_hub is not installed") from None
    patterns = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except HFValidationError:
        raise MergeError(f"{repo_id}: no such file or folder, and not a valid Hub id") from None
    except RepositoryNotFoundError:
        raise MergeError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private)") from None
    except Exception as exc:  # offline, DNS, proxy: all surface as connection errors of various types
        if os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower() or "offline" in str(exc).lower():
            raise MergeError(f"{repo_id}: not a local path, and cannot reach the Hugging Face Hub (offline)") from None
        raise MergeError(f"{repo_id}: download from the Hugging Face Hub failed: {exc}") from None


def read_safetensors_header(path: Path, owner: str | None = None) -> dict[str, dict[str, Any]]:
    """Names, dtypes and shapes of a safetensors file from its JSON header (no tensor data read);
    errors name the file within `owner` (the model as typed) where given."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:100]
        where = path.name if not owner else shown(owner) if owner.endswith(path.name) else f"{shown(owner)}: {path.name}"
        raise MergeError(f"{where}: not a readable safetensors file ({why})") from None
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """A model's weights by name, read on demand; plus its config, tokenizer and training record."""

    def __init__(self, ref: str | os.PathLike, *, allow_hub: bool = True, allowed_roots=None,
                 trust_remote_code: bool = False):
        self.ref = str(ref)
        self.path = resolve(ref, allow_hub=allow_hub, allowed_roots=allowed_roots)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.name = Path(self.ref).name or self.ref
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype code)
        self._bin: dict[str, torch.Tensor] | None = None
        self._spans: dict[str, tuple[int, int]] = {}  # name -> byte range in its file's data section
        self._index_files()
        if not trust_remote_code and self.config.get("auto_map"):
            raise MergeError(f"{self.ref}: this model needs trust_remote_code (custom code in its repository); "
                             "it is refused unless you turn trust_remote_code on")

    # ---------------------------------------------------------------- discovery
    def _index_files(self) -> None:
        files, listed = self._weight_files()
        if not files:
            raise MergeError(f"{self.ref}: no weights found (expected *.safetensors or pytorch_model*.bin)")
        if files[0].suffix == ".safetensors":
            if any(f.name.startswith("adapter_model") for f in files) and (self.folder / "adapter_config.json").exists():
                raise MergeError(f"{self.ref}: this is a LoRA adapter, not a full model; add it as an adapter")
            for f in files:
                header = read_safetensors_header(f, self.ref)
                for key in [k for k, v in (listed or {}).items() if v == f.name and k not in header][:1]:
                    raise MergeError(f"{self.ref}: {INDEX['.safetensors']} puts tensor {key} in {f.name}, "
                                     "which does not hold it")
                for key, info in header.items():
                    if listed is not None and listed.get(key) != f.name:  # the index decides (mergekit's reading)
                        continue
                    self._files[key] = f
                    self._meta[key] = (tuple(info["shape"]), info["dtype"])
                    self._spans[key] = tuple(info.get("data_offsets", (0, 0)))
        elif files[0].suffix == ".bin":
            self._load_bin(files, listed)
        else:
            raise MergeError(f"{self.ref}: unsupported weight file {files[0].name} (use .safetensors)")

    def _weight_files(self) -> tuple[list[Path], dict[str, str] | None]:
        """The files that hold the weights, as mergekit finds them: `model.safetensors` (or its shards,
        as `model.safetensors.index.json` lists them), else `pytorch_model.bin` (or its index); other
        weight files beside them (a stale shard, Mistral's consolidated.safetensors) are not the model.
        Without those names, every *.safetensors (else *.bin) in the folder. With an index, also its
        weight map (tensor -> file name)."""
        if self.path.is_file():
            return [self.path], None
        for suffix, index_name in INDEX.items():
            index = self.path / index_name
            if index.is_file():
                return self._indexed(index)
            single = self.path / index_name.removesuffix(".index.json")
            if single.is_file():
                return [single], None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            files = sorted(p for p in self.path.glob("*.bin") if "training_args" not in p.name)
        return files, None

    def _indexed(self, index: Path) -> tuple[list[Path], dict[str, str]]:
        where = f"{shown(self.ref)}: {index.name}"
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise MergeError(f"{where}: expected a weight_map of tensor names to file names")
        files = []
        for name in sorted(set(weight_map.values())):
            f = self.path / name
            if Path(name).name != name:
                raise MergeError(f"{where}: {name!r} is not a file name in the model's folder")
            if not f.is_file():
                n = sum(v == name for v in weight_map.values())
                raise MergeError(f"{where}: lists {name} ({n} tensor(s)), which is missing; the model is incomplete")
            files.append(f)
        return files, weight_map

    def _load_bin(self, files: list[Path], listed: dict[str, str] | None = None) -> None:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            part = read_bin(f)
            if listed is not None:
                for key in [k for k, v in listed.items() if v == f.name and k not in part][:1]:
                    raise MergeError(f"{self.ref}: {INDEX['.bin']} puts tensor {key} in {f.name}, "
                                     "which does not hold it")
                part = {k: v for k, v in part.items() if listed.get(k) == f.name}
            state.update(part)
        seen: dict[int, str] = {}
        for key, t in list(state.items()):  # tied weights are saved twice in .bin: keep one name
            ptr = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            if ptr in seen and state[seen[ptr]].shape == t.shape:
                del state[key]
            else:
                seen[ptr] = key
        self._bin = state
        for key, t in state.items():
            self._meta[key] = (tuple(t.shape), _code(t.dtype))

    # ---------------------------------------------------------------- tensors
    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        code = self._meta[key][1]
        if code not in _DTYPES:
            raise MergeError(f"{self.ref}: tensor {key} has unsupported dtype {code}")
        return _DTYPES[code]

    def is_float(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> bool:
        """Read a safetensors tensor's bytes (or rows [start, stop) of it, dim 0) straight into `out`
        (same dtype and size, contiguous): one copy from the page cache, no intermediate tensor.
        False where that does not apply."""
        if key not in self._spans or not out.is_contiguous() or self.dtype(key) != out.dtype:
            return False
        begin, end = self._spans[key]
        if rows is not None:
            row_bytes = (end - begin) // max(1, self.shape(key)[0])
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        if end - begin != out.numel() * out.element_size():
            return False
        path = self._files[key]
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n + begin)
            got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        if got != end - begin:
            raise MergeError(f"{path}: truncated: tensor {key} needs {end - begin} bytes, the file has {got}")
        return True

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `key`, or only its rows [start, stop) (dim 0: a large tensor merged in blocks)."""
        if key not in self._meta:
            raise MergeError(f"{self.ref}: has no tensor {key}")
        if self._bin is not None:
            t = self._bin[key]
            return t if rows is None else t[rows[0]:rows[1]]
        with safe_open(self._files[key], framework="pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]

    # ---------------------------------------------------------------- side files
    @cached_property
    def config(self) -> dict[str, Any]:
        return _read_json(self.folder / "config.json") or {}

    @cached_property
    def training(self) -> dict[str, Any]:
        """Training metadata (steps, learning rate, ...) where the checkpoint records it."""
        return read_training_metadata(self.folder)

    def side_files(self, names: Iterable[str]) -> list[Path]:
        return [self.folder / n for n in names if (self.folder / n).is_file()]


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch .bin, through torch.load(weights_only=True) only; anything but a dict of
    tensors (after a "state_dict" wrapper) is a MergeError naming the file."""
    try:
        loaded = _torch_load(path)
    except Exception as exc:
        raise MergeError(f"{path}: refused: not a plain tensor checkpoint "
                         f"(torch.load with weights_only=True failed: {_load_failure(exc)})") from None
    part = _unwrapped(loaded)
    if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
        raise MergeError(f"{path}: refused: expected a dict of tensors{_nested(part)}")
    return part


def _torch_load(path: Path):
    """torch.load(weights_only=True), memory-mapped; a file in torch's legacy (pre-1.6, not zip) format,
    which cannot be mapped, is read whole, through the same weights-only unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "_use_new_zipfile_serialization" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrapped(loaded: Any) -> Any:
    """The tensors of a training checkpoint saved as {"state_dict": {...}, ...} (Lightning's and many
    training scripts'), where mergekit lists them too; its other entries (epoch, optimizer state) are
    left out. Only "state_dict": mergekit unwraps no other name."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        return loaded["state_dict"]
    return loaded


def _nested(loaded: Any) -> str:
    """Where a refused .bin keeps its tensors one level down under another name ({"model": {...}})."""
    inner = [k for k, v in loaded.items() if isinstance(v, dict)][:1] if isinstance(loaded, dict) else []
    return f" (it holds a dict under {shown(str(inner[0]), 40)!r}; only a 'state_dict' wrapper is unwrapped)" \
        if inner else ""


def _load_failure(exc: Exception) -> str:
    """What torch.load(weights_only=True) refused, in one line: the pickled global it names (torch's
    own first line is advice on loading the file unsafely, with terminal escape codes)."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles {found.group(1)}, which is not a tensor"
    return re.sub(r"\x1b\[[0-9;]*m", "", text.strip().splitlines()[0] if text.strip() else type(exc).__name__)[:200]


def _code(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a model's side file (config.json, training.json, ...), None if there is none;
    anything else (broken JSON, a list, a number) is a MergeError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise MergeError(f"{path}: not a JSON text file (not UTF-8 at byte {exc.start})") from None
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a JSON object ({{...}}), not a {type(data).__name__}")
    return data


def read_training_metadata(folder: Path) -> dict[str, Any]:
    """`steps` and `learning_rate` from our training.json or a transformers Trainer's files."""
    out: dict[str, Any] = {}
    ours = _read_json(folder / "training.json") if (folder / "training.json").exists() else None
    if ours:
        out.update(ours)
    state = _read_json(folder / "trainer_state.json") if (folder / "trainer_state.json").exists() else None
    if state and "steps" not in out and state.get("global_step"):
        out["steps"] = int(state["global_step"])
    args = _read_json(folder / "training_args.json") if (folder / "training_args.json").exists() else None
    if args and "learning_rate" not in out and args.get("learning_rate"):
        out["learning_rate"] = float(args["learning_rate"])
    return out


class StateDict:
    """An in-memory dict of tensors behind the Checkpoint interface (Python API, tests)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "state dict",
                 config: dict[str, Any] | None = None, training: dict[str, Any] | None = None):
        if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise MergeError(f"{name}: expected a dict of tensors")
        self._t = dict(tensors)
        self.ref = self.name = name
        self.path = self.folder = None
        self.config = config or {}
        self.training = training or {}

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def is_float(self, key: str) -> bool:
        return self._t[key].is_floating_point()

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if key not in self._t:
            raise MergeError(f"{self.ref}: has no tensor {key}")
        return self._t[key] if rows is None else self._t[key][rows[0]:rows[1]]

    def side_files(self, names: Iterable[str]) -> list[Path]:
        return []
