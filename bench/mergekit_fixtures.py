"""mergekit's own test and example configs (ported as bench/fixtures/mergekit/*.yml) through both tools.

Small generated models (llama- and GPT-2-shaped: a base MODEL_C and three fine-tunes of it, each
folder with a real tokenizer), every fixture in float32, bfloat16 and float16 (the YAML's
`dtype` overridden). mergekit runs all configs in one process of its own venv (bench/_mergekit_runner.py,
HF_HUB_OFFLINE=1); ours runs in this process through the same path as the CLI. Deterministic
configs: max |Δ| per tool output (float32 target ≤ 1e-6; bfloat16: bit-equal or ≤ 1 ulp). Random
ones (DARE, DELLA; different generators): the kept fraction of each tensor, as a z-score against
the binomial spread, and the L1 norm of the update.

    python bench/mergekit_fixtures.py [--arch llama,gpt2,llama-padded] [--dtypes float32,bfloat16,float16] [--only ties,slerp]
                                      [--write-expected tests/data/mergekit_expected] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import WORK, add_record_flag, append_results, mergekit_env, mergekit_venv  # noqa: E402

FIXTURES = ROOT / "bench" / "fixtures" / "mergekit"
STOCHASTIC = ("dare_ties", "della", "della_linear", "dare_linear")
VOCAB = 96
SHAPES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64),
    # a padded vocabulary: 100 embedding rows, a tokenizer of 96 tokens (mergekit cuts the rows to 96)
    "llama-padded": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB + 4, max_position_embeddings=64),
    "llama-tiny": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32),
}


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<bos>", "<eos>", "<pad>"])}
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def make_models(root: Path, arch: str) -> dict[str, Path]:
    """MODEL_C (the base) and MODEL_A, MODEL_B, MODEL_D = base + seeded noise (different scales),
    float32 safetensors plus config and tokenizer. Deterministic: same bytes on every machine."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    paths = {k: root / arch / k for k in ("MODEL_C", "MODEL_A", "MODEL_B", "MODEL_D")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    shape = SHAPES[arch]
    if arch.startswith("gpt2"):
        cfg = GPT2Config(**shape, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1234)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for k in sorted(sd):
            sd[k] = torch.randn(sd[k].shape, generator=g) * 0.1 + (1.0 if k.endswith("norm.weight")
                                                                   or "ln_" in k and k.endswith("weight") else 0.0)
    tok = make_tokenizer()
    for i, (key, path) in enumerate(paths.items()):
        theta = {k: (v if i == 0 else v + (0.02 * (i + 1)) * torch.randn(v.shape, generator=g)).contiguous()
                 for k, v in sd.items()}
        model.load_state_dict(theta, strict=False)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    return paths


def render(fixture: Path, paths: dict[str, Path], dtype: str, layers: int) -> str:
    text = fixture.read_text()
    for key, p in paths.items():
        text = text.replace(key, str(p))
    text = text.replace("LAYERS", str(layers))
    lines = [ln for ln in text.splitlines() if not ln.startswith("dtype:")]
    return "\n".join(lines) + f"\ndtype: {dtype}\n"


def run_ours(cfg_path: Path, out: Path) -> str:
    from merging import MergeError, load_config, merge_to_dir, plan_from_config

    try:
        plan = plan_from_config(load_config(cfg_path), allow_hub=False)
        merge_to_dir(plan, out, overwrite=True)
        return "ok"
    except MergeError as exc:
        return f"refused: {exc}"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two bfloat16/float16 tensors."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    ia = torch.where(ia < 0, -32768 - ia, ia)  # sign-magnitude to a monotone integer line
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def compare(ours: Path, theirs: Path, base: Path, stochastic: bool) -> dict:
    a, b = _tensors(ours), _tensors(theirs)
    keys = sorted((set(a) & set(b)) - {"lm_head.weight"} if "lm_head.weight" not in a else set(a) & set(b))
    missing = sorted((set(a) ^ set(b)) - {"lm_head.weight"})
    res = {"max_abs": 0.0, "max_ulp": 0, "n_diff": 0, "n": 0, "missing": missing, "dtype": "",
           "z": 0.0, "l1_gap": 0.0}
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    if cfg_a.get("vocab_size") != cfg_b.get("vocab_size"):
        res["missing"].append(f"config vocab_size {cfg_a.get('vocab_size')} vs {cfg_b.get('vocab_size')}")
    t0 = _tensors(base)
    for k in keys:
        ta, tb = a[k], b[k]
        if ta.dtype != tb.dtype:  # mergekit 0.1.5 writes arcee_fusion's float32 result for a bfloat16 config
            res["dtypes"] = f"ours {str(ta.dtype)[6:]}, mergekit {str(tb.dtype)[6:]}: compared after rounding mergekit's"
            tb = tb.to(ta.dtype)
        if ta.shape != tb.shape:
            res["missing"].append(f"{k} shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
            continue
        res["dtype"] = str(tb.dtype).removeprefix("torch.")
        res["n"] += ta.numel()
        if stochastic:
            if ta.numel() < 512:
                continue
            if t0[k].shape != ta.shape:
                continue
            base_k = t0[k].to(ta.dtype).float()
            fa = float((ta.float() != base_k).float().mean())
            fb = float((tb.float() != base_k).float().mean())
            p = max(min((fa + fb) / 2, 1 - 1e-9), 1e-9)
            res["z"] = max(res["z"], abs(fa - fb) / math.sqrt(2 * p * (1 - p) / ta.numel()))
            la, lb = float((ta.float() - base_k).abs().sum()), float((tb.float() - base_k).abs().sum())
            if lb > 0:
                res["l1_gap"] = max(res["l1_gap"], abs(la - lb) / lb)
            continue
        d = (ta.double() - tb.double()).abs()
        res["max_abs"] = max(res["max_abs"], float(d.max()))
        res["n_diff"] += int((ta != tb).sum())
        if ta.dtype == tb.dtype and ta.dtype in (torch.bfloat16, torch.float16):
            res["max_ulp"] = max(res["max_ulp"], ulps(ta, tb))
    return res


def verdict(r: dict, dtype: str, stochastic: bool) -> tuple[str, bool]:
    if r["missing"]:
        return f"tensor sets differ: {r['missing'][:2]}", False
    if stochastic:
        ok = r["z"] <= 5 and r["l1_gap"] <= 0.05
        return f"kept-fraction z {r['z']:.1f}, L1 gap {r['l1_gap']:.3f} (random: statistics)", ok
    if dtype == "float32":
        ok = r["max_abs"] <= 1e-6
        return f"max|Δ| {r['max_abs']:.1e}" + ("" if r["n_diff"] == 0 else f" ({r['n_diff']}/{r['n']} differ)"), ok
    ok = r["max_ulp"] <= 1
    text = "bit-equal" if r["n_diff"] == 0 else f"{r['n_diff']}/{r['n']} differ, ≤ {r['max_ulp']} ulp, max|Δ| {r['max_abs']:.1e}"
    if r.get("dtypes"):
        text += f" ({r['dtypes']})"
    return text, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama,gpt2,llama-padded")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--only", default="", help="comma-separated fixture names")
    ap.add_argument("--write-expected", default="", help="store mergekit's outputs (llama-tiny) for the tests here")
    add_record_flag(ap)
    args = ap.parse_args(argv)

    fixtures = sorted(FIXTURES.glob("*.yml"))
    if args.only:
        wanted = set(args.only.split(","))
        fixtures = [f for f in fixtures if f.stem in wanted]
    work = WORK / "fixtures"
    work.mkdir(parents=True, exist_ok=True)
    jobs, rows_in = [], []
    for arch in args.arch.split(","):
        paths = make_models(work / "models", arch)
        layers = SHAPES[arch].get("num_hidden_layers", SHAPES[arch].get("n_layer"))
        for fx in fixtures:
            for dtype in args.dtypes.split(","):
                tag = f"{arch}-{fx.stem}-{dtype}"
                cfg = work / f"{tag}.yml"
                cfg.write_text(render(fx, paths, dtype, layers))
                out_mk, out_us = work / f"{tag}-mergekit", work / f"{tag}-ours"
                shutil.rmtree(out_mk, ignore_errors=True)
                jobs.append([str(cfg), str(out_mk)])
                rows_in.append((arch, fx.stem, dtype, cfg, out_mk, out_us, paths["MODEL_C"]))
    job_file = work / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    venv = mergekit_venv()
    print(f"mergekit: {len(jobs)} configs in one process ...", flush=True)
    with open(work / "mergekit.log", "w") as log:
        subprocess.run([str(venv / "bin" / "python"), str(ROOT / "bench" / "_mergekit_runner.py"), str(job_file)],
                       env=mergekit_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    status = json.loads((work / "jobs.json.status").read_text())

    header = f"{'arch':10} {'fixture':24} {'dtype':9} result"
    rows, n_ok, n_all = [header], 0, 0
    print(header, flush=True)
    for arch, name, dtype, cfg, out_mk, out_us, base in rows_in:
        ours = run_ours(cfg, out_us)
        theirs = status.get(str(cfg), "not run")
        stochastic = name.split("-")[0] in STOCHASTIC or any(name == s for s in STOCHASTIC)
        if theirs != "ok" or ours != "ok":
            text, ok = f"mergekit: {theirs[:70]} | ours: {ours[:70]}", theirs != "ok" and ours != "ok"
        else:
            text, ok = verdict(compare(out_us, out_mk, base, stochastic), dtype, stochastic)
        n_all += 1
        n_ok += ok
        row = f"{arch:10} {name:24} {dtype:9} {'EQUAL ' if ok and not stochastic else 'OK    ' if ok else 'DIFF  '}{text}"
        print(row, flush=True)
        rows.append(row)
        if args.write_expected and arch == "llama-tiny" and theirs == "ok" and not stochastic:
            dest = Path(args.write_expected)
            dest.mkdir(parents=True, exist_ok=True)
            save_file(_tensors(out_mk), str(dest / f"{name}-{dtype}.safetensors"))
    summary = (f"{n_ok}/{n_all} within target (deterministic: float32 ≤ 1e-6, bfloat16 / float16 ≤ 1 ulp; random: "
               "z ≤ 5 for the kept fraction of each tensor of ≥ 512 entries, L1 norm of the update within 5%)")
    print(summary)
    if not args.no_record:
        append_results("mergekit_fixtures", ["python", "bench/mergekit_fixtures.py", *(argv or sys.argv[1:])],
                       "```\n" + "\n".join(rows) + "\n```\n\n" + summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
