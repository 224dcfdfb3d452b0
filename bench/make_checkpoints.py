"""Generate a GPT-2-small-shaped base (~124M params, float32) and 4 synthetic fine-tunes, locally.

Architecture: GPT2LMHeadModel. mergekit 0.1.5 ships `_data/architectures/gpt2.json`, which
expects exactly the names transformers writes ("transformer.h.N...", tied lm_head optional),
so both tools read the same folders unchanged.

Every folder gets a real tokenizer (a WordLevel `tokenizers` vocabulary of exactly vocab_size
entries, saved through PreTrainedTokenizerFast): mergekit otherwise invents one.

Fine-tune i = base + perturbation (seeded, deterministic):
  ft0: 1e-3·N(0,1) everywhere            ft1: 1e-3·N(0,1), other seed
  ft2: 2e-3·N(0,1) on a random half       ft3: 5e-4·N(0,1)  (a "short" fine-tune)

    python bench/make_checkpoints.py [--scale 2] [--out bench/_work/ckpt-1x]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK  # noqa: E402

N_EMBD, N_HEAD, VOCAB, N_POS = 768, 12, 50257, 1024
PER_LAYER = 12 * N_EMBD * N_EMBD + 13 * N_EMBD  # params of one GPT-2 block
FINETUNES = [  # (name, seed, scale, fraction perturbed)
    ("ft0", 1, 1e-3, 1.0),
    ("ft1", 2, 1e-3, 1.0),
    ("ft2", 3, 2e-3, 0.5),
    ("ft3", 4, 5e-4, 1.0),
]


def n_layers(scale: float) -> int:
    base = VOCAB * N_EMBD + N_POS * N_EMBD + 12 * PER_LAYER + 2 * N_EMBD
    return 12 + round(base * (scale - 1) / PER_LAYER)


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<eos>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in range(33, 127):
        vocab.setdefault(chr(c), len(vocab))
    i = 0
    while len(vocab) < VOCAB:
        vocab[f"w{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="model size relative to GPT-2 small (more layers)")
    ap.add_argument("--out", default=None, help="output folder (default bench/_work/ckpt-<scale>x)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the folders exist")
    args = ap.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(args.out) if args.out else WORK / f"ckpt-{args.scale:g}x"  # from any working directory
    names = ["base"] + [f[0] for f in FINETUNES]
    if not args.force and all((out / n / "model.safetensors").exists() for n in names):
        print(f"{out}: exists (use --force to regenerate)")
        return 0
    t0 = time.perf_counter()
    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=N_POS, n_embd=N_EMBD, n_layer=n_layers(args.scale),
                     n_head=N_HEAD, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).float().eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f}M parameters, {cfg.n_layer} layers")
    base_sd = {k: v.detach().clone() for k, v in model.named_parameters()}

    def save(name: str, meta: dict) -> None:
        folder = out / name
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        (folder / "training.json").write_text(json.dumps(meta) + "\n")
        print(f"  {folder}  ({time.perf_counter() - t0:.0f} s)")

    save("base", {"note": "synthetic base"})
    for name, seed, scale, frac in FINETUNES:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen) * scale
                if frac < 1:
                    noise *= torch.rand(p.shape, generator=gen) < frac
                p.copy_(base_sd[k] + noise)
        save(name, {"steps": 100 * seed, "learning_rate": 1e-4, "seed": seed, "scale": scale, "fraction": frac})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
