"""A character-level tokenizer that loads with plain ``AutoTokenizer.from_pretrained(folder)``.

One token per character (spaces and newlines included), so every task string round-trips
exactly. It is a ``tokenizers`` WordLevel model behind a one-character split and a ``Fuse``
decoder, saved as tokenizer.json + tokenizer_config.json (``PreTrainedTokenizerFast``): no custom
code, no trust_remote_code. A ``<bos>`` is prepended by the post-processor so prompts typed in the
UI look exactly like the training sequences.
"""
from __future__ import annotations

import string
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# Every character the tasks and the pretraining text use. Order is part of the checkpoints: append only.
CHARS = list(" \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?:;=+-'")
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIALS)


def build_tokenizer(model_max_length: int = 64):
    """Return a ``PreTrainedTokenizerFast`` over ``VOCAB`` (left padding, for batched generation)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="left", model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(folder: str | Path, model_max_length: int = 64) -> None:
    """Write tokenizer.json + tokenizer_config.json into ``folder``.

    transformers 5 records its own class name; ``PreTrainedTokenizerFast`` loads in 4.x and 5.x alike.
    """
    import json

    build_tokenizer(model_max_length).save_pretrained(str(folder))
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def encode(text: str) -> list[int]:
    """Character ids of ``text`` without specials (fast path used by training and the harness)."""
    return [VOCAB.get(c, UNK_ID) for c in text]


def decode(ids) -> str:
    """Inverse of :func:`encode`; special tokens are dropped."""
    inv = _INV
    return "".join(inv[i] for i in ids if i >= len(SPECIALS))


_INV = {i: t for t, i in VOCAB.items()}
