"""The embedding rows mergekit writes when a tokenizer is chosen (`tokenizer_source` or `tokenizer:`).

mergekit then gives the token-indexed tensors (input embeddings, output head) exactly one row per
token of the output tokenizer, padded with the rows' mean up to `pad_to_multiple_of`: a model whose
embedding has spare rows (a padded vocabulary) comes out with fewer. Every model here shares one
tokenizer, so the rows keep their order; `VocabView` presents a checkpoint with its token-indexed
tensors cut (or padded) to that size, before merging, in the dtype the merge computes in.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .errors import MergeError

VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "lm_head.weight", "embed_out.weight",
                 "word_embeddings.weight")


def output_rows(tokenizer_folder, rows: int, pad_to_multiple_of: int | None) -> tuple[int, int] | None:
    """(tokens, output rows), or None when the output keeps its `rows` (nothing to change)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except Exception as exc:  # a folder without a loadable tokenizer: mergekit invents one; we refuse
        raise MergeError(f"tokenizer: cannot load the tokenizer in {getattr(tokenizer_folder, 'name', tokenizer_folder)} "
                         f"({type(exc).__name__})") from None
    ids = sorted(tok.get_vocab().values())
    n = len(ids)
    if ids != list(range(n)):
        raise MergeError("tokenizer: its token ids are not 0…n−1; re-indexing the embedding rows is not supported")
    if n > rows:
        raise MergeError(f"tokenizer: {n} tokens but {rows} embedding rows; growing the embedding is not supported")
    size = n
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    return None if size == rows else (n, size)


class VocabView:
    """A checkpoint whose token-indexed tensors have `size` rows: the first `n` of its own, then
    (when padded) their mean, computed in `dtype` as mergekit computes it."""

    def __init__(self, inner, rows: int, n: int, size: int, dtype: torch.dtype):
        self._inner, self._rows, self._n, self._size, self._dtype = inner, rows, n, size, dtype
        self.ref, self.name, self.path = inner.ref, getattr(inner, "name", inner.ref), inner.path
        self.folder = getattr(inner, "folder", None)
        self.config = dict(inner.config)
        for key in ("vocab_size",):
            if key in self.config:
                self.config[key] = size
        self.training = getattr(inner, "training", {})
        self._last: tuple[str, torch.Tensor] | None = None  # the vocabulary tensor whose blocks are being read

    def _is_vocab(self, key: str) -> bool:
        shape = self._inner.shape(key)
        return key.endswith(VOCAB_TENSORS) and len(shape) >= 1 and shape[0] == self._rows

    def keys(self) -> list[str]:
        return self._inner.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._inner

    def shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self._inner.shape(key))
        return (self._size, *shape[1:]) if self._is_vocab(key) else shape

    def dtype(self, key: str) -> torch.dtype:
        return self._inner.dtype(key)

    def is_float(self, key: str) -> bool:
        return self._inner.is_float(key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or its rows [start, stop) (a large embedding is merged in blocks of rows: the padded
        whole is built once, for its mean row, and kept while its blocks are read)."""
        if not self._is_vocab(key):
            return self._inner.get(key) if rows is None else self._inner.get(key, rows)
        if self._last is None or self._last[0] != key:
            t = self._inner.get(key)
            out = torch.zeros((self._size, *t.shape[1:]), dtype=self._dtype)
            out[:self._n] = t[:self._n].to(self._dtype)
            if self._size > self._n:
                out[self._n:] = torch.mean(out[:self._n], dim=0)
            self._last = (key, out)
        out = self._last[1]
        return out if rows is None else out[rows[0]:rows[1]]

    def side_files(self, names: Iterable[str]) -> list[Any]:
        return self._inner.side_files(names)
