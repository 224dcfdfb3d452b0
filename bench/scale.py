"""Scale curve: disk-to-disk merges of llama-shaped bfloat16 checkpoints (~0.5B and ~1.5B), ours vs mergekit.

Generates a base and 4 fine-tunes per size (sharded safetensors with an index, as on the Hub),
then, in the same run and from a cold page cache each time (`/proc/sys/vm/drop_caches` when
writable): a plain read of the five models' files (the I/O floor), `python -m merging merge` and
`mergekit-yaml` on the same YAML. Reports wall time, peak RSS (ru_maxrss of the child) and input
throughput in GB/s, the ratios ours / mergekit and ours / plain read, and the largest difference
between the two outputs. Generated files are deleted at the end (`--keep` keeps them).

`--device cuda` merges ours on the GPU (`merge --device cuda`) and mergekit with `--cuda`;
`--no-mergekit` measures ours against the plain read alone (a machine without mergekit).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_record_flag, append_results, mergekit_env, mergekit_venv, ours_env, run_measured, work_dir  # noqa: E402

# Qwen2.5-0.5B / 1.5B dimensions on the llama architecture (tied embeddings, no biases).
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),  # a smoke test of the script itself
}
METHODS = {  # method: (global parameters, per-model parameters)
    "task_arithmetic": ({}, {"weight": 0.5}),
    "ties": ({"normalize": "true"}, {"weight": 0.5, "density": 0.5}),
    "linear": ({}, {"weight": 0.25}),
}
SHARD_BYTES = 1 << 30  # 1 GiB shards
N_FINETUNES = 4


def tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,))]


def write_model(folder: Path, shape: dict, seed: int, base_seed: int | None) -> None:
    """Seeded bf16 weights written shard by shard (memory stays at one shard). A fine-tune is the
    base (regenerated from `base_seed`) plus 0.01-scale noise of its own seed."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    g_base = torch.Generator().manual_seed(base_seed if base_seed is not None else seed)
    g_ft = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = []
    part: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(part, str(folder / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(part))
        part.clear()

    for name, shp in tensor_shapes(shape):
        t = torch.ones(shp) if name.endswith("norm.weight") else torch.randn(shp, generator=g_base) * 0.02
        if base_seed is not None:
            t += torch.randn(shp, generator=g_ft) * 0.002
        t = t.to(torch.bfloat16)
        if part and size + 2 * t.numel() > SHARD_BYTES:
            flush()
            size = 0
        part[name] = t
        size += 2 * t.numel()
        total += 2 * t.numel()
    flush()
    weight_map = {}
    for j, names in enumerate(shards):
        final = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{j}.safetensors").rename(folder / final)
        weight_map.update({k: final for k in names})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = LlamaConfig(**shape, tie_word_embeddings=True, torch_dtype="bfloat16", max_position_embeddings=4096,
                      architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(folder)
    make_tokenizer(shape["vocab_size"]).save_pretrained(folder)  # mergekit copies the base's tokenizer


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries (mergekit refuses a folder without one)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<bos>", "<eos>", "<pad>"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def write_yaml(path: Path, method: str, base: Path, models: list[Path], dtype: str = "bfloat16") -> None:
    """`dtype` bfloat16: computed in bfloat16, mergekit's rounding op for op; float32: loaded and
    computed in float32, written as bfloat16 (`out_dtype`)."""
    glob, per = METHODS[method]
    lines = [f"merge_method: {method}"] + ([] if method == "linear" else [f"base_model: {base}"]) + ["models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {" + ", ".join(f"{k}: {v}" for k, v in per.items()) + "}"]
    if glob:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in glob.items()) + "}")
    lines.append(f"dtype: {dtype}")
    if dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def folder_bytes(folders: list[Path]) -> int:
    return sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))


def plain_read_cmd(folders: list[Path]) -> list[str]:
    """A child process that reads every byte of the inputs once (64 MiB buffer): the I/O floor."""
    files = [str(f) for d in folders for f in sorted(d.glob("*.safetensors"))]
    code = ("import sys\nbuf = bytearray(64 << 20)\nfor p in sys.argv[1:]:\n"
            "    with open(p, 'rb', buffering=0) as f:\n        while f.readinto(buf):\n            pass\n")
    return [sys.executable, "-c", code, *files]


def max_diff(a: Path, b: Path) -> float:
    """Largest |a − b| over all tensors of two merged folders (float32 differences of bf16 values)."""
    def index(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out
    ia, ib = index(a), index(b)
    worst = 0.0
    for k, fa in ia.items():
        if k not in ib:
            continue
        with safe_open(fa, framework="pt") as ha, safe_open(ib[k], framework="pt") as hb:
            d = (ha.get_tensor(k).float() - hb.get_tensor(k).float()).abs().max()
        worst = max(worst, float(d))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5B,1.5B", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--methods", default="task_arithmetic,ties,linear")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the YAML's compute dtype (output is bfloat16 either way)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints in bench/_work/scale")
    ap.add_argument("--device", default="cpu", help="where both tools merge: cpu or cuda (ours: --device, mergekit: --cuda)")
    ap.add_argument("--no-mergekit", action="store_true", help="ours against the plain read only")
    add_record_flag(ap)
    args = ap.parse_args(argv)

    root = work_dir("scale")
    mk = None if args.no_mergekit else str(mergekit_venv() / "bin" / "mergekit-yaml")
    on_gpu = args.device.startswith("cuda")
    cold = drop_caches()
    header = (f"{'size':5} {'method':16} {'read s':>7} {'GB/s':>5} {'mergekit s':>10} {'ours s':>7} {'time x':>6} "
              f"{'ours/read':>9} {'ours GB/s':>9} {'mergekit MiB':>12} {'ours MiB':>8} {'RSS x':>6}  max|Δ|")
    rows, rss_ours = [], {}
    try:
        for size in args.sizes.split(","):
            shape = SHAPES[size]
            base = root / size / "base"
            fts = [root / size / f"ft{i}" for i in range(N_FINETUNES)]
            for j, folder in enumerate([base, *fts]):
                if not (folder / "model.safetensors.index.json").exists():
                    print(f"generating {folder} ...", flush=True)
                    shutil.rmtree(folder, ignore_errors=True)
                    write_model(folder, shape, seed=100 + j, base_seed=None if j == 0 else 100)
            nbytes = folder_bytes([base, *fts])
            gb = nbytes / 1e9
            drop_caches()
            t_read, _, rc = run_measured(plain_read_cmd([base, *fts]))
            print(f"{size}: {gb:.1f} GB of inputs, plain read {t_read:.1f} s ({gb / t_read:.2f} GB/s)", flush=True)
            for method in args.methods.split(","):
                cfg = root / f"{size}-{method}.yml"
                write_yaml(cfg, method, base, fts, args.dtype)
                out_mk, out_us = root / f"{size}-{method}-mergekit", root / f"{size}-{method}-ours"
                res = {}
                tools = [("ours", [sys.executable, "-m", "merging", "merge", str(cfg), str(out_us), "--overwrite",
                                   "--no-progress", "--device", args.device], ours_env(), out_us)]
                if mk:
                    tools.insert(0, ("mergekit", [mk, str(cfg), str(out_mk), "--cuda" if on_gpu else "--no-cuda",
                                                  "--quiet"], mergekit_env(), out_mk))
                for tool, cmd, env, out in tools:
                    shutil.rmtree(out, ignore_errors=True)
                    drop_caches()
                    wall, rss, rc = run_measured(cmd, env, log=root / f"{size}-{method}-{tool}.log")
                    if rc != 0:
                        print(f"{tool} failed on {size} {method} (exit {rc}); see {root / f'{size}-{method}-{tool}.log'}")
                        return 1
                    res[tool] = (wall, rss)
                diff = max_diff(out_us, out_mk) if mk else float("nan")
                shutil.rmtree(out_mk, ignore_errors=True)
                shutil.rmtree(out_us, ignore_errors=True)
                (w_mk, r_mk), (w_us, r_us) = res.get("mergekit", (float("nan"), float("nan"))), res["ours"]
                rss_ours.setdefault(method, {})[size] = r_us
                row = (f"{size:5} {method:16} {t_read:7.1f} {gb / t_read:5.2f} {w_mk:10.1f} {w_us:7.1f} "
                       f"{w_us / w_mk:6.2f} {w_us / t_read:9.2f} {gb / w_us:9.2f} {r_mk:12.0f} {r_us:8.0f} "
                       f"{r_us / r_mk:6.2f}  {diff:.2e}")
                print(row, flush=True)
                rows.append(row)
    finally:
        if not args.keep:  # this run's sizes only: checkpoints, YAMLs, logs, outputs
            for size in args.sizes.split(","):
                for path in [root / size, *root.glob(f"{size}-*")]:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    sizes = args.sizes.split(",")
    flat = ""
    if len(sizes) > 1:
        flat = "\n\npeak RSS of ours, largest size / smallest: " + ", ".join(
            f"{m} {v[sizes[-1]] / v[sizes[0]]:.2f}×" for m, v in rss_ours.items() if sizes[-1] in v and sizes[0] in v)
    table = "\n".join([header, *rows])
    note = ("time x / RSS x = ours / mergekit (targets ≤ 0.3 / ≤ 0.5); ours/read = our wall time over a plain read "
            "of the same input files (throughput ≥ 50% of the read = ours/read ≤ 2 for linear methods); "
            f"page cache {'dropped before every run (cold reads)' if cold else 'NOT dropped (not writable here)'}; "
            f"compute dtype {args.dtype}, bfloat16 checkpoints and output, 4 fine-tunes, 1 GiB shards; "
            f"merged on {args.device}{'' if mk else ', mergekit not run (nan)'}.")
    print("\n" + note + flat)
    if not args.no_record:
        append_results("scale", ["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])],
                       "```\n" + table + "\n```\n\n" + note + flat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
