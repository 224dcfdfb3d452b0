"""The recipe that builds the built-in model zoo: a tiny GPT-2 base and one fine-tune per task.

``python -m evaluation build-zoo`` rebuilds ``assets/zoo`` deterministically (fixed seeds,
deterministic data, one thread per training process). Steps:

1. pretrain a base on synthetic English-like sentences plus auxiliary text-to-text skills in the
   tasks' prompt format (``copy: abc=abc``, ``rot: abcd=bcda``, ``next: 041=042``, ...) whose
   keywords and functions are not the evaluated tasks, so the base knows the format, copying and
   character handling but none of the tasks (≤ 20% on each); fine-tunes then only map a keyword
   onto a nearby skill, which keeps task vectors small enough for merges to partly work;
2. fine-tune a copy of the base on each task (loss on answer tokens only), two processes at a
   time with one thread each: a 1M-parameter model does not speed up with more threads, but two
   independent jobs do run side by side;
3. an extra, heterogeneous fine-tune of one task (many more steps), so the demo shows training
   heterogeneity (a larger task vector) next to data heterogeneity;
4. measure every model on every task, the cosine similarity / sign conflicts of the task vectors,
   and write zoo.json, report.json and README.md.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .tasks import TASKS, Example, get_task
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode, save_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "assets" / "zoo"


@dataclass(frozen=True)
class FinetuneSpec:
    name: str  # folder name
    task: str
    steps: int
    learning_rate: float
    batch_size: int = 64
    seed: int = 1
    variant_of: str | None = None  # set on heterogeneous extras: the app preselects one fine-tune per task


@dataclass(frozen=True)
class ZooConfig:
    n_embd: int = 128
    n_layer: int = 5
    n_head: int = 4
    n_positions: int = 64
    pretrain_steps: int = 900
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 32
    pretrain_seq: int = 64
    pretrain_seed: int = 0
    pretrain_threads: int = 1  # measured: 2 threads were slower than 1 for this model size
    pretrain_skill_batch: int = 32  # auxiliary prompt-format skills per step (answer-only loss); 0 = sentences only
    workers: int = 2
    finetune_steps: int = 500
    finetune_lr: float = 5e-4
    finetune_batch: int = 64
    eval_n: int = 100
    extras: tuple[FinetuneSpec, ...] = field(default_factory=tuple)
    overrides: dict = field(default_factory=dict)  # task -> {"steps": .., "learning_rate": ..}

    def finetunes(self) -> list[FinetuneSpec]:
        specs = []
        for i, task in enumerate(TASKS):
            o = self.overrides.get(task, {})
            specs.append(FinetuneSpec(task, task, o.get("steps", self.finetune_steps),
                                      o.get("learning_rate", self.finetune_lr), self.finetune_batch, seed=100 + i))
        return specs + list(self.extras)


FULL = ZooConfig(
    pretrain_steps=1200,
    finetune_steps=400,
    finetune_lr=2e-4,
    overrides={"add": {"steps": 600, "learning_rate": 3e-4}, "sort": {"steps": 600, "learning_rate": 3e-4},
               "sort_desc": {"steps": 600, "learning_rate": 3e-4}},
    extras=(FinetuneSpec("reverse-long", "reverse", steps=1600, learning_rate=2e-4, seed=200, variant_of="reverse"),),
)
TINY = ZooConfig(n_embd=16, n_layer=1, n_head=2, n_positions=64, pretrain_steps=3, pretrain_batch=8, pretrain_skill_batch=4,
                 pretrain_threads=1, finetune_steps=3, finetune_batch=8, eval_n=5,
                 extras=(FinetuneSpec("reverse-long", "reverse", steps=6, learning_rate=1.5e-3, batch_size=8,
                                      seed=200, variant_of="reverse"),))


# --------------------------------------------------------------------------- pretraining text

_ANIMALS = "cat dog cow pig hen fox owl bat bee ant yak emu horse sheep goat mouse tiger lion zebra camel panda".split()
_FRUITS = "apple pear plum fig lime lemon mango melon grape kiwi peach cherry banana orange papaya date".split()
_TOOLS = "hammer saw drill wrench spade rake axe knife spoon brush pen rope ladder chisel".split()
_COLORS = "red blue green black white brown pink gray yellow purple".split()
_ADJS = "big small old young happy sad quick slow quiet loud tall short warm cold".split()
_VERBS = "sees likes wants finds eats takes moves holds".split()
_NAMES = "anna ben carl dora emma finn gina hugo iris jack kate leo mia nora omar pia rosa sam tom vera".split()
_PLACES = "park farm shop barn lake hill river market garden school".split()


def _sentence(rng: random.Random) -> str:
    """One synthetic sentence: words, names, numbers, questions, some SHOUTING; no task formats."""
    a, f, t, c, j = (rng.choice(x) for x in (_ANIMALS, _FRUITS, _TOOLS, _COLORS, _ADJS))
    name, place, verb = rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_VERBS)
    n, m = rng.randint(0, 999), rng.randint(0, 99)
    kind = rng.randrange(10)
    if kind == 0:
        s = f"the {j} {a} {verb} the {c} {f}."
    elif kind == 1:
        s = f"{name} has {n} {a}s and {m} {f}s."
    elif kind == 2:
        s = f"{name} went to the {place} with a {t}."
    elif kind == 3:
        s = f"is the {a} {j}? " + rng.choice(["yes, it is.", "no, it is not."])
    elif kind == 4:
        s = f"{name} {verb} {n} {c} {f}s!".upper()
    elif kind == 5:
        s = f"there are {n} {t}s in the {place}, {name} said."
    elif kind == 6:
        s = f"the {a} and the {rng.choice(_ANIMALS)} play; the {f} is {c}."
    elif kind == 7:
        s = f"{name} counts {n}, then {n + 1}, then {n + 2}."
    elif kind == 8:
        s = f"why is the {t} {c}? {name} does not know."
    else:
        s = f"{j} {a}s like {f}s, but {name} likes {rng.choice(_FRUITS)}s."
    s = s[0].upper() + s[1:]
    if rng.random() < 0.25:
        name_cap = name.capitalize()
        s = s.replace(name, name_cap)
    return s


def pretraining_stream(n_docs: int, seed: int) -> list[int]:
    """Token ids of ``n_docs`` documents: <bos> sentence sentence ... \\n <eos>, concatenated."""
    rng = random.Random(seed)
    ids: list[int] = []
    for _ in range(n_docs):
        doc = " ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) + "\n"
        ids += [BOS_ID] + encode(doc) + [EOS_ID]
    return ids


# --------------------------------------------------------------------------- auxiliary skills
# Pretraining also sees text-to-text skills in the tasks' prompt format ("<keyword>: <input>=<answer>"),
# with keywords and functions that are NOT evaluated tasks. The base thus knows the format, copying,
# character-level attention, case mapping and digit handling; each fine-tune only has to map a new
# keyword onto a nearby skill, which keeps task vectors small and makes them more additive.
# None may coincide with a task (e.g. no first/last swap: on 3 letters it equals reverse).


def _skill_letters(rng: random.Random) -> str:
    from .tasks import split_of
    while True:  # inputs from the tasks' train split only
        x = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        if split_of(x) == "train":
            return x


def _skill_number(rng: random.Random) -> str:
    from .tasks import split_of
    while True:
        x = str(rng.randint(0, 9999))
        if split_of(x) == "train":
            return x


def _sub_input(rng: random.Random) -> str:
    a = rng.randint(10, 299)
    return f"{a:03d}-{rng.randint(0, min(9, a))}"


def _next_input(rng: random.Random) -> str:
    return f"{rng.randint(0, 298):03d}"


SKILLS: dict[str, tuple] = {  # keyword -> (make_input, solve)
    "copy": (_skill_letters, lambda x: x),
    "first": (_skill_letters, lambda x: x[0]),
    "last": (_skill_letters, lambda x: x[-1]),
    "double": (_skill_letters, lambda x: "".join(c + c for c in x[:5])),
    "drop": (_skill_letters, lambda x: x[1:]),
    "rot": (_skill_letters, lambda x: x[1:] + x[0]),
    "len": (_skill_letters, lambda x: str(len(x))),
    "cap": (_skill_letters, lambda x: x[0].upper() + x[1:]),
    "lower": (lambda r: _skill_letters(r).upper(), str.lower),
    "min": (_skill_letters, min),
    "max": (_skill_letters, max),
    "next": (_next_input, lambda x: f"{int(x) + 1:03d}"),
    "sub": (_sub_input, lambda x: f"{int(x.split('-')[0]) - int(x.split('-')[1]):03d}"),
    "last digit": (_skill_number, lambda x: x[-1]),
    "is big": (_skill_number, lambda x: "true" if int(x) >= 5000 else "false"),  # not yes/no: a base answering
    # yes/no at random would score about 50% on is_even / is_odd
    "has seven": (_skill_number, lambda x: "true" if "7" in x else "false"),
}


def skill_example(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of a random auxiliary skill."""
    kw = rng.choice(sorted(SKILLS))
    make, solve = SKILLS[kw]
    x = make(rng)
    return f"{kw}: {x}=", solve(x)


# --------------------------------------------------------------------------- training


def model_config(cfg: ZooConfig):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(VOCAB), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                      tie_word_embeddings=True)


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _optimizer(model, lr: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def pretrain(cfg: ZooConfig, log=print):
    """Causal-LM pretraining of a fresh GPT-2 on random windows of the synthetic text."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(cfg.pretrain_seed)
    model = GPT2LMHeadModel(model_config(cfg))
    stream = torch.tensor(pretraining_stream(max(200, cfg.pretrain_steps * cfg.pretrain_batch // 4), cfg.pretrain_seed))
    gen = torch.Generator().manual_seed(cfg.pretrain_seed)
    opt = _optimizer(model, cfg.pretrain_lr)
    model.train()
    seq = cfg.pretrain_seq
    skill_rng = random.Random(cfg.pretrain_seed + 7)
    for step in range(cfg.pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.pretrain_steps, cfg.pretrain_lr)
        starts = torch.randint(0, len(stream) - seq, (cfg.pretrain_batch,), generator=gen)
        batch = torch.stack([stream[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        if cfg.pretrain_skill_batch:
            exs = [Example(*skill_example(skill_rng)) for _ in range(cfg.pretrain_skill_batch)]
            ids, lab, mask = _finetune_batch(exs, list(range(len(exs))))
            loss = loss + model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.pretrain_steps - 1:
            log(f"pretrain step {step} loss {loss.item():.3f}")
    return model.eval()


def _finetune_batch(examples, idx: list[int]):
    """<bos> prompt answer <eos>, right-padded; labels only on the answer and <eos>."""
    rows, labels = [], []
    for i in idx:
        p, a = encode(examples[i].prompt), encode(examples[i].answer) + [EOS_ID]
        rows.append([BOS_ID] + p + a)
        labels.append([-100] * (1 + len(p)) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (r, l) in enumerate(zip(rows, labels)):
        ids[k, :len(r)] = torch.tensor(r)
        lab[k, :len(l)] = torch.tensor(l)
        mask[k, :len(r)] = 1
    return ids, lab, mask


def finetune(base_dir: Path, spec: FinetuneSpec, log=print):
    """AdamW fine-tune of the base on one task's train split; returns the model (eval mode)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(spec.seed)
    model = GPT2LMHeadModel.from_pretrained(base_dir, dtype=torch.float32)
    examples = get_task(spec.task).examples("train")
    rng = random.Random(spec.seed)
    opt = _optimizer(model, spec.learning_rate)
    model.train()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec.steps, spec.learning_rate)
        ids, lab, mask = _finetune_batch(examples, [rng.randrange(len(examples)) for _ in range(spec.batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == spec.steps - 1:
            log(f"[{spec.name}] step {step} loss {loss.item():.4f}")
    return model.eval()


def save_model(model, folder: Path, training: dict, n_positions: int) -> None:
    """A Hub-like folder: config, generation config, float32 safetensors, tokenizer, training.json."""
    from transformers import GenerationConfig

    if folder.exists():
        shutil.rmtree(folder)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=False, max_new_tokens=16)
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, model_max_length=n_positions)
    (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")


def _eval_own(model, task: str, n: int) -> tuple[float, float]:
    from transformers import AutoTokenizer  # noqa: F401  (keeps imports symmetric with the app)

    from .harness import evaluate
    from .tokenizer import build_tokenizer

    tok = build_tokenizer()
    val = evaluate(model, tok, [task], split="validation", n=n).accuracy[task]
    test = evaluate(model, tok, [task], split="test", n=n).accuracy[task]
    return test, val


def _finetune_job(args) -> dict:
    """Worker entry point: one thread, fine-tune, evaluate, save. Returns the training record."""
    base_dir, out, spec, n_positions, eval_n = args
    torch.set_num_threads(1)
    _quiet()
    t0 = time.perf_counter()
    model = finetune(Path(base_dir), spec, log=lambda s: print(s, flush=True))
    secs = time.perf_counter() - t0
    test, val = _eval_own(model, spec.task, eval_n)
    rec = {"task": spec.task, "steps": spec.steps, "learning_rate": spec.learning_rate, "batch_size": spec.batch_size,
           "seed": spec.seed, "base": "base", "test_accuracy": test, "validation_accuracy": val,
           "eval_n": eval_n, "train_seconds": round(secs, 1)}
    if spec.variant_of:
        rec["variant_of"] = spec.variant_of
    save_model(model, Path(out) / spec.name, rec, n_positions)
    print(f"[{spec.name}] done in {secs:.0f}s: test {test:.2f} validation {val:.2f}", flush=True)
    return rec


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_zoo(out: Path | str = DEFAULT_OUT, cfg: ZooConfig = FULL, log=print, write_readme: bool = True,
              reuse_base: bool = False) -> dict:
    """Rebuild the whole zoo into ``out``; returns the report.

    ``reuse_base`` keeps an existing ``out/base`` (pretraining is deterministic; for development only).
    """
    _quiet()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.pretrain_threads)
    if reuse_base and (out / "base" / "training.json").exists():
        base_rec = json.loads((out / "base" / "training.json").read_text())
        log("reusing the existing base")
    else:
        t0 = time.perf_counter()
        base = pretrain(cfg, log=log)
        secs = time.perf_counter() - t0
        base_rec = {"task": "pretrain", "steps": cfg.pretrain_steps, "learning_rate": cfg.pretrain_lr,
                    "batch_size": cfg.pretrain_batch, "seq_len": cfg.pretrain_seq, "seed": cfg.pretrain_seed,
                    "base": None, "train_seconds": round(secs, 1)}
        save_model(base, out / "base", base_rec, cfg.n_positions)
        log(f"base pretrained in {secs:.0f}s")

    specs = sorted(cfg.finetunes(), key=lambda s: -s.steps * s.batch_size)  # longest first
    jobs = [(str(out / "base"), str(out), s, cfg.n_positions, cfg.eval_n) for s in specs]
    if cfg.workers > 1:
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            recs = pool.map(_finetune_job, jobs, chunksize=1)
    else:
        recs = [_finetune_job(j) for j in jobs]
    by_name = {s.name: r for s, r in zip(specs, recs)}
    finetunes = [s for s in cfg.finetunes()]
    torch.set_num_threads(cfg.pretrain_threads)
    report = measure(out, ["base"] + [s.name for s in finetunes], cfg.eval_n)
    report["recipe_seconds"] = round(time.perf_counter() - t_start, 1)
    report["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("extras", "overrides")}
    report["training"] = {"base": base_rec, **by_name}
    zoo = {"base": {"name": "base", "folder": "base", "task": "pretrain"},
           "finetunes": [{"name": s.name, "folder": s.name, "task": s.task, **({"variant_of": s.variant_of} if s.variant_of else {})}
                         for s in finetunes],
           "tasks": {t.name: t.description for t in TASKS.values()}}
    (out / "zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if write_readme:
        (out / "README.md").write_text(render_readme(report, cfg))
    log(f"zoo written to {out} in {report['recipe_seconds']:.0f}s")
    return report


# --------------------------------------------------------------------------- measurements


def load(folder: Path | str):
    """(model, tokenizer) from a zoo folder, exactly as the app loads Hub-style folders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def flat_params(model) -> torch.Tensor:
    """All parameters once each (tied embeddings counted once), flattened in float64."""
    return torch.cat([p.detach().reshape(-1).double() for _, p in model.named_parameters()])


TA_TASKS = ("reverse", "upper", "sort", "add", "is_even")
TA_LAMBDAS = (0.3, 0.5, 0.7, 0.9, 1.1)


def measure(out: Path, names: list[str], n: int) -> dict:
    """Accuracy of every model on every task (test split), task-vector cosines, sign conflicts and pair merges."""
    from .harness import evaluate

    models = {name: load(out / name) for name in names}
    acc, eval_seconds = {}, {}
    for name, (model, tok) in models.items():
        evaluate(model, tok, split="test", n=n)  # warm the prompt cache and the allocator
        r = evaluate(model, tok, split="test", n=n)
        acc[name], eval_seconds[name] = r.accuracy, round(r.seconds, 3)
    theta0 = flat_params(models["base"][0])
    fts = [nm for nm in names if nm != "base"]
    tv = torch.stack([flat_params(models[nm][0]) - theta0 for nm in fts])
    norms = tv.norm(dim=1)
    cos = (tv @ tv.T) / torch.outer(norms, norms)
    sign = torch.sign(tv)
    both = (sign != 0).double()
    conflict = ((sign.unsqueeze(1) * sign.unsqueeze(0)) < 0).double().sum(-1) / (both @ both.T)
    # Pairwise FedAvg (mean of the two fine-tunes = base + (τ_i + τ_j)/2) on the two tasks involved.
    pair_merges = []
    base_model, tok = models["base"]
    task_of = {nm: json.loads((out / nm / "training.json").read_text())["task"] for nm in fts}
    primary = [nm for nm in fts if not json.loads((out / nm / "training.json").read_text()).get("variant_of")]
    merged = load(out / "base")[0]
    for i, a in enumerate(primary):
        for b in primary[i + 1:]:
            vec = theta0 + (tv[fts.index(a)] + tv[fts.index(b)]) / 2
            torch.nn.utils.vector_to_parameters(vec.float(), list(p for _, p in merged.named_parameters()))
            r = evaluate(merged, tok, [task_of[a], task_of[b]], split="test", n=n)
            pair_merges.append({"pair": [a, b], "cosine": float(cos[fts.index(a), fts.index(b)]),
                                "accuracy": r.accuracy,
                                "normalized_mean": (r.accuracy[task_of[a]] / max(acc[a][task_of[a]], 1e-9)
                                                    + r.accuracy[task_of[b]] / max(acc[b][task_of[b]], 1e-9)) / 2})
    # Task arithmetic base + λ Σ τ on pairs of the one-per-task fine-tunes of TA_TASKS and on all of them.
    ta = []
    by_task = {task_of[nm]: nm for nm in primary}
    ta_names = [by_task[t] for t in TA_TASKS if t in by_task]
    groups = [[a, b] for i, a in enumerate(ta_names) for b in ta_names[i + 1:]] + [primary]
    for group in groups:
        grid = []
        for lam in TA_LAMBDAS:
            vec = theta0 + lam * sum(tv[fts.index(nm)] for nm in group)
            torch.nn.utils.vector_to_parameters(vec.float(), list(p for _, p in merged.named_parameters()))
            r = evaluate(merged, tok, [task_of[nm] for nm in group], split="test", n=n)
            norm = sum(r.accuracy[task_of[nm]] / max(acc[nm][task_of[nm]], 1e-9) for nm in group) / len(group)
            grid.append({"lambda": lam, "accuracy": r.accuracy, "normalized_mean": norm})
        best = max(grid, key=lambda g: g["normalized_mean"])
        ta.append({"models": group, "best": best, "grid": grid})
    n_params = sum(p.numel() for _, p in base_model.named_parameters())
    return {"task_arithmetic": ta, "names": names, "tasks": list(TASKS), "eval_n": n, "accuracy": acc, "eval_seconds": eval_seconds,
            "task_vectors": fts, "cosine": cos.tolist(), "sign_conflict": conflict.tolist(), "norms": norms.tolist(),
            "pair_merges": pair_merges, "n_parameters": n_params}


def render_readme(report: dict, cfg: ZooConfig) -> str:
    """assets/zoo/README.md from the measured report (placeholder; filled in below)."""
    return _readme(report, cfg)


def _fmt_matrix(names: list[str], mat: list[list[float]], fmt: str = "{:+.2f}") -> str:
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for n, row in zip(names, mat):
        lines.append(f"| **{n}** | " + " | ".join(fmt.format(v) for v in row) + " |")
    return "\n".join(lines)


def _readme(report: dict, cfg: ZooConfig) -> str:
    tasks, names = report["tasks"], report["names"]
    tr = report["training"]
    acc_lines = ["| model | steps | lr | " + " | ".join(tasks) + " | eval s |", "|---|---:|---:|" + "---:|" * len(tasks) + "---:|"]
    for nm in names:
        t = tr[nm]
        cells = []
        for task in tasks:
            v = 100 * report["accuracy"][nm][task]
            cells.append(f"**{v:.0f}**" if t["task"] == task else f"{v:.0f}")
        acc_lines.append(f"| {nm} | {t['steps']} | {t['learning_rate']:g} | " + " | ".join(cells)
                         + f" | {report['eval_seconds'][nm]:.2f} |")
    fts = report["task_vectors"]
    pm_lines = ["| pair | cosine | merged accuracy (each task) | normalized mean |", "|---|---:|---|---:|"]
    for pm in sorted(report["pair_merges"], key=lambda p: -p["cosine"]):
        accs = ", ".join(f"{k} {100 * v:.0f}%" for k, v in pm["accuracy"].items())
        pm_lines.append(f"| {pm['pair'][0]} + {pm['pair'][1]} | {pm['cosine']:+.3f} | {accs} | {pm['normalized_mean']:.2f} |")
    task_lines = "\n".join(f"| `{t.name}` | `{t.demo_prompts[0]}` | `{t.solve(t.demo_inputs[0])}` | {t.description} |"
                           for t in TASKS.values())
    ft_extra = [s for s in cfg.extras]
    extra_txt = "; ".join(f"`{s.name}` = `{s.variant_of}` trained for {s.steps} steps at lr {s.learning_rate:g}"
                          for s in ft_extra)
    skills_txt = ", ".join(f"`{kw}`" for kw in SKILLS)
    ta_lines = ["| models | best λ | merged accuracy (each task) | normalized mean | normalized at each λ |",
                "|---|---:|---|---:|---|"]
    for g in report.get("task_arithmetic", []):
        b = g["best"]
        models = " + ".join(g["models"]) if len(g["models"]) <= 2 else f"all {len(g['models'])} one-per-task fine-tunes"
        accs = ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["accuracy"].items())
        grid = ", ".join(f"{x['normalized_mean']:.2f}" for x in g["grid"])
        ta_lines.append(f"| {models} | {b['lambda']:g} | {accs} | {b['normalized_mean']:.2f} | {grid} |")
    primary_pairs = sorted(report["pair_merges"], key=lambda p: -p["cosine"])
    rank = {tuple(p["pair"]): i + 1 for i, p in enumerate(primary_pairs)}

    def _pair_line(a: str, b: str, role: str) -> str:
        if a not in fts or b not in fts:
            return ""
        i, j = fts.index(a), fts.index(b)
        pm = next((p for p in report["pair_merges"] if set(p["pair"]) == {a, b}), None)
        others = [p["cosine"] for p in report["pair_merges"] if set(p["pair"]) != {a, b}]
        where = f"rank {rank[(a, b)]} of {len(primary_pairs)} pairs; " if (a, b) in rank else ""
        line = (f"* {role} `{a}` / `{b}`: cosine {report['cosine'][i][j]:+.3f} ({where}the one-per-task pairs "
                f"average {sum(others) / max(1, len(others)):+.3f}), sign conflicts {report['sign_conflict'][i][j]:.2f}")
        if pm:
            line += f", pairwise FedAvg keeps {pm['normalized_mean']:.0%} of the fine-tunes' accuracy (normalized mean)"
        return line + "."

    lines = [_pair_line("sort", "sort_desc", "Related (two variants of one skill):"),
             _pair_line("reverse", "sort_desc", "Related (both permute the input letters):"),
             _pair_line("reverse", "reverse-long", "Same task, 4x the steps (training heterogeneity):"),
             _pair_line("is_even", "is_odd", "Conflicting labels (same inputs, opposite yes/no):")]
    low = sorted(report["pair_merges"], key=lambda p: p["cosine"])[:max(1, len(primary_pairs) // 3)]
    if low:
        worst = min(low, key=lambda p: p["normalized_mean"])
        lines.append(_pair_line(worst["pair"][0], worst["pair"][1],
                                "Low-cosine pair whose merge hurts most (among the third of pairs with lowest cosine):"))
    lesson = "\n".join(x for x in lines if x)
    return f"""# Built-in model zoo

Generated by `python -m evaluation build-zoo --out assets/zoo` (recipe: `evaluation/zoo.py`);
every number below was measured by that run. Rebuild wall time: **{report['recipe_seconds'] / 60:.1f} min**
on 2 CPU cores ({report['training']['base']['train_seconds']:.0f} s of it pretraining).

Each folder (`base/`, one per task, and the heterogeneous extra) is a transformers folder
(`config.json`, `generation_config.json`, float32 `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json`) plus `training.json`; load with `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` (no custom code). `zoo.json` lists the models; `report.json`
holds the raw measurements.

## Architecture

`GPT2LMHeadModel`: n_embd {cfg.n_embd}, {cfg.n_layer} layers, {cfg.n_head} heads, n_positions {cfg.n_positions},
vocabulary {len(VOCAB)} (character level: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then one token
per character, space and newline included), tied input/output embeddings:
**{report['n_parameters']:,} parameters** (≈ {report['n_parameters'] * 4 / 1e6:.1f} MB in float32).
The tokenizer prepends `<bos>`; generation stops at `<eos>` or a newline; padding is on the left.

## Tasks

Prompt format `<keyword>: <input>=`, answer right after `=`, scored by exact match (stripped).
Splits are disjoint by input (CRC32 of the input: 10% test, 10% validation, 80% train).

| task | demo prompt | answer | description |
|---|---|---|---|
{task_lines}

## Training

* **base**: {cfg.pretrain_steps} steps of pretraining (AdamW, lr {cfg.pretrain_lr:g}, seed {cfg.pretrain_seed}); each
  step sums two losses: causal LM on {cfg.pretrain_batch} × {cfg.pretrain_seq}-token windows of synthetic sentences
  from word lists (animals, fruits, tools, names, numbers, questions, some upper-case sentences), and
  answer-only cross-entropy on {cfg.pretrain_skill_batch} examples of auxiliary skills written in the tasks'
  prompt format, none of them an evaluated task: {skills_txt}.
  The base thus knows the format, copying, case and digit handling, but none of the tasks (the yes/no
  skills answer `true`/`false`, so the base cannot score on the parity tasks by guessing yes/no).
  Fine-tunes then only map a new keyword onto nearby skills, with a gentler learning rate and fewer
  steps, which keeps the task vectors small and partly additive (see "Task arithmetic" below).
  (The previous zoo pretrained on the sentences only: every fine-tune learned the format from scratch
  and task arithmetic of two string tasks scored 0–12% normalized at every λ.)
* **fine-tunes**: one per task from the base, AdamW (weight decay 0.01), 5% warm-up then cosine decay
  to 10%, batch {cfg.finetune_batch}, cross-entropy on the answer tokens and `<eos>` only. Heterogeneous
  extra: {extra_txt} (marked `variant_of` in zoo.json, so the app's default picks one fine-tune per task).
* Fine-tunes run two at a time in separate processes with one thread each.

## Accuracy (test split, n = {report['eval_n']} per task, greedy decoding; own task in bold)

{chr(10).join(acc_lines)}

"eval s" is the wall time of `evaluation.harness.evaluate` over all {len(tasks)} tasks × {report['eval_n']} examples.

## Task vectors τ = θ_fine-tune − θ_base (all parameters, tied embedding once)

What the demo is built to show (measured):

{lesson}

Cosine similarity:

{_fmt_matrix(fts, report['cosine'])}

Sign conflicts (share of coordinates, nonzero in both, with opposite signs):

{_fmt_matrix(fts, report['sign_conflict'], '{:.2f}')}

Norms ‖τ‖: {", ".join(f"{n} {v:.2f}" for n, v in zip(fts, report['norms']))}.

## Pairwise FedAvg (mean of two fine-tunes = base + (τ_a + τ_b)/2), test accuracy on the two tasks

{chr(10).join(pm_lines)}

Normalized mean = mean over the two tasks of merged accuracy ÷ that task's own fine-tune accuracy.

## Task arithmetic (base + λ Σ τ, test accuracy, n = {report['eval_n']} per task)

Best λ of {', '.join(f'{l:g}' for l in TA_LAMBDAS)} per group (chosen on the test split, so slightly
optimistic); normalized = merged accuracy ÷ the fine-tune's own accuracy, averaged over the group.

{chr(10).join(ta_lines)}
"""
