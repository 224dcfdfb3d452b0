"""The engine on real checkpoints: streaming to disk, the dict API, per-tensor parameters, LoRA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from merging import (AGGREGATORS, Checkpoint, LiveModel, MergeError, TaskVectorStack, load_source, merge_state_dicts,
                     parse_config, plan_from_config)
from merging.engine import merge_to_dir
from merging.plan import layer_positions
from tests.conftest import load_sd


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _hp(method):
    return {"steps": [100, 200, 400]} if method == "fednova" else {}


@pytest.mark.parametrize("method", [m for m, a in AGGREGATORS.items()
                                    if a.min_models <= 3 and (a.max_models or 3) >= 3])
def test_streaming_merge_equals_dict_merge(tiny_zoo, tmp_path, method):
    base = load_sd(tiny_zoo["base"])
    fts = [load_sd(tiny_zoo[f"ft{i}"]) for i in range(3)]
    weights = [0.5, 1.0, 0.8]
    in_memory = merge_state_dicts(base, fts, method, weights=weights, lam=0.9, **_hp(method))
    cfg = parse_config({
        "merge_method": method, "base_model": str(tiny_zoo["base"]),
        "models": [{"model": str(tiny_zoo[f"ft{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "parameters": {"lambda": 0.9},
    })
    out = merge_to_dir(plan_from_config(cfg), tmp_path / "out", shard_bytes=20_000)
    on_disk = load_sd(out)
    assert set(on_disk) == set(in_memory)
    for k in in_memory:
        torch.testing.assert_close(on_disk[k], in_memory[k], rtol=0, atol=0)
    assert (out / "model.safetensors.index.json").exists()  # sharded: 20 kB shards
    assert (out / "config.json").exists() and (out / "merge_config.yml").exists() and (out / "README.md").exists()


def test_merged_folder_loads_with_transformers(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_config({"merge_method": "ties", "base_model": str(tiny_zoo["base"]),
                        "models": [{"model": str(tiny_zoo["ft0"])}, {"model": str(tiny_zoo["ft1"])}],
                        "parameters": {"density": 0.5}, "dtype": "float16"})
    out = merge_to_dir(plan_from_config(cfg), tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float16
    assert "ties" in (out / "README.md").read_text()


def test_task_arithmetic_formula_on_real_checkpoints(tiny_zoo):
    base = load_sd(tiny_zoo["base"])
    fts = [load_sd(tiny_zoo[f"ft{i}"]) for i in range(2)]
    out = merge_state_dicts(base, fts, "task_arithmetic", weights=[0.3, 0.6], lam=1.5)
    for k in base:
        expected = base[k] + 1.5 * (0.3 * (fts[0][k] - base[k]) + 0.6 * (fts[1][k] - base[k]))
        torch.testing.assert_close(out[k], expected)


def test_cclip_clips_by_the_whole_model_norm(tiny_zoo):
    base = load_sd(tiny_zoo["base"])
    fts = [load_sd(tiny_zoo[f"ft{i}"]) for i in range(3)]
    norms = [sum(float((ft[k] - base[k]).pow(2).sum()) for k in base) ** 0.5 for ft in fts]
    rho = min(norms) / 2
    out = merge_state_dicts(base, fts, "cclip", rho=rho)
    for k in list(base)[:4]:
        expected = base[k] + sum(min(1, rho / n) * (ft[k] - base[k]) for ft, n in zip(fts, norms))
        torch.testing.assert_close(out[k], expected)


def test_fednova_reads_steps_from_training_metadata(tiny_zoo, tmp_path):
    cfg = parse_config({"merge_method": "fednova", "base_model": str(tiny_zoo["base"]),
                        "models": [{"model": str(tiny_zoo[f"ft{i}"])} for i in range(3)]})
    plan = plan_from_config(cfg)
    assert plan.params_for(plan.tensor_names[0]).hyper["steps"] == [100, 200, 400]
    base = load_sd(tiny_zoo["base"])
    fts = [load_sd(tiny_zoo[f"ft{i}"]) for i in range(3)]
    out = dict(__import__("merging.engine", fromlist=["iter_merged"]).iter_merged(plan))
    explicit = merge_state_dicts(base, fts, "fednova", steps=[100, 200, 400])
    for k in base:
        torch.testing.assert_close(out[k], explicit[k])


def test_layer_positions_follow_mergekit():
    names = ["transformer.wte.weight"] + [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(5)] + ["transformer.ln_f.weight"]
    t = layer_positions(names)
    assert t["transformer.wte.weight"] == 0 and t["transformer.ln_f.weight"] == 0
    assert [t[f"transformer.h.{i}.mlp.c_fc.weight"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1.0]


def test_gradient_and_filter_parameters_resolve_per_tensor(tiny_zoo):
    cfg = parse_config({
        "merge_method": "ties", "base_model": str(tiny_zoo["base"]),
        "models": [{"model": str(tiny_zoo["ft0"]), "parameters": {"weight": [0.0, 1.0]}},
                   {"model": str(tiny_zoo["ft1"]), "parameters": {"density": 0.2}}],
        "parameters": {"density": [{"filter": "attn", "value": 0.7}, {"value": 0.4}], "weight": 0.5},
    })
    plan = plan_from_config(cfg)
    p0 = plan.params_for("transformer.h.0.attn.c_attn.weight")
    p1 = plan.params_for("transformer.h.1.mlp.c_fc.weight")
    emb = plan.params_for("transformer.wte.weight")
    assert p0.weights.tolist() == [0.0, 0.5] and p1.weights.tolist() == [1.0, 0.5]
    assert emb.weights.tolist() == [0.0, 0.5]
    assert p0.hyper["density"] == [0.7, 0.2] and p1.hyper["density"] == [0.4, 0.2]


def test_linear_without_base_is_the_plain_average(tiny_zoo, tmp_path):
    cfg = parse_config({"merge_method": "linear",
                        "models": [{"model": str(tiny_zoo["ft0"]), "parameters": {"weight": 1.0}},
                                   {"model": str(tiny_zoo["ft1"]), "parameters": {"weight": 3.0}}]})
    out = load_sd(merge_to_dir(plan_from_config(cfg), tmp_path / "lin"))
    a, b = load_sd(tiny_zoo["ft0"]), load_sd(tiny_zoo["ft1"])
    for k in a:
        torch.testing.assert_close(out[k], (a[k] + 3 * b[k]) / 4)


def test_slerp_with_base_and_one_model_is_mergekit_style(tiny_zoo, tmp_path):
    from merging.aggregators import slerp_tensors

    cfg = parse_config({"merge_method": "slerp", "base_model": str(tiny_zoo["base"]),
                        "models": [{"model": str(tiny_zoo["base"])}, {"model": str(tiny_zoo["ft0"])}],
                        "parameters": {"t": 0.3}})
    out = load_sd(merge_to_dir(plan_from_config(cfg), tmp_path / "s"))
    a, b = load_sd(tiny_zoo["base"]), load_sd(tiny_zoo["ft0"])
    for k in a:
        torch.testing.assert_close(out[k], slerp_tensors(0.3, a[k], b[k]), atol=2e-6, rtol=1e-5)


def test_live_model_writes_in_place_and_matches_dict_api(tiny_zoo):
    from transformers import AutoModelForCausalLM

    base = Checkpoint(tiny_zoo["base"])
    sources = [load_source(tiny_zoo[f"ft{i}"]) for i in range(3)]
    stack = TaskVectorStack(base, sources)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["base"])
    live = LiveModel(model, stack)
    param = model.transformer.h[0].attn.c_attn.weight
    ptrs = {param.data_ptr()}
    expected = merge_state_dicts(load_sd(tiny_zoo["base"]), [load_sd(tiny_zoo[f"ft{i}"]) for i in (0, 2)],
                                 "fedgma", weights=[0.5, 1.5], lam=0.8, rho=0.7)
    for rho in (0.2, 0.4, 0.7):  # non-linear merges alternate between two buffers: no allocation per merge
        live.apply("fedgma", [0.5, 1.5], lam=0.8, select=[0, 2], rho=rho)
        assert model.transformer.h[0].attn.c_attn.weight is param
        ptrs.add(param.data_ptr())
    assert len(ptrs) == 2
    sd = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(sd[k], v)
    with pytest.raises(MergeError, match="lambda: must be finite"):
        live.apply("task_arithmetic", [1.0, 1.0, 1.0], lam=float("nan"))
    torch.testing.assert_close(model.state_dict()["transformer.wte.weight"], expected["transformer.wte.weight"])


# ----------------------------------------------------------------- LoRA: exact ΔW, checked against PEFT

@pytest.mark.parametrize("rslora", [False, True])
def test_lora_task_vector_matches_peft_merge_and_unload(tiny_zoo, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["base"])
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                     use_rslora=rslora, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload().state_dict()

    base = Checkpoint(tiny_zoo["base"])
    src = load_source(adapter_dir)
    changed = 0
    for key in base.keys():
        b = base.get(key).float()
        delta = src.delta(key, b)
        torch.testing.assert_close(b + delta, merged[key].float(), atol=1e-6, rtol=1e-5)
        changed += bool(delta.abs().sum() > 0)
    assert changed == 4  # c_attn and c_fc in both layers


def test_lora_adapter_in_a_yaml_merge(tiny_zoo, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_zoo["base"]),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["c_proj"], fan_in_fan_out=True,
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "ad")
    merged = peft_model.merge_and_unload().state_dict()
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                        "models": [{"model": str(tmp_path / "ad")},
                                   {"model": f"{tiny_zoo['base']}+{tmp_path / 'ad'}", "parameters": {"weight": 0.0}}]})
    out = load_sd(merge_to_dir(plan_from_config(cfg), tmp_path / "o"))
    for k, v in out.items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-5)


def test_linear_soup_reads_the_models_not_the_base():
    """`linear` (normalised, λ = 1) is Σ cᵢθᵢ: the base's values are never read, like mergekit's
    linear. A base tensor full of NaN would be refused on any path that read it."""
    g = torch.Generator().manual_seed(0)
    fts = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    good_base = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    weights = [0.2, 0.5, 0.3]
    soup = merge_state_dicts({k: torch.full_like(v, float("nan")) for k, v in good_base.items()}, fts, "linear",
                             weights=weights)
    for k in good_base:
        expected = sum(w * ft[k] for w, ft in zip(weights, fts)) / sum(weights)
        torch.testing.assert_close(soup[k], expected)
        # λ ≠ 1 takes the task-vector path: θ₀ + λ·Σcᵢτᵢ
        via_base = merge_state_dicts(good_base, fts, "linear", weights=weights, lam=0.5)
        torch.testing.assert_close(via_base[k], good_base[k] + 0.5 * (expected - good_base[k]))
    with pytest.raises(MergeError, match="non-finite|NaN"):  # Σwᵢ ≠ 1: θ₀ is part of the result
        merge_state_dicts({k: torch.full_like(v, float("nan")) for k, v in good_base.items()}, fts,
                          "task_arithmetic", weights=[1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def bf16_zoo(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """The tiny zoo's checkpoints saved in bfloat16 (as Hub checkpoints mostly are)."""
    import shutil

    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bf16zoo")
    out = {}
    for key, folder in tiny_zoo.items():
        dst = root / key
        shutil.copytree(folder, dst)
        for f in dst.glob("*.safetensors"):
            f.unlink()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_sd(folder).items()},
                  dst / "model.safetensors", metadata={"format": "pt"})
        out[key] = dst
    return out


def test_a_padded_vocabulary_merged_in_row_blocks(tmp_path):
    """`pad_to_multiple_of` on an embedding large enough to be merged in blocks of rows: the same bytes as
    merged whole (VocabView.get took no rows: an internal error on real-sized vocabularies)."""
    from merging.engine import work_units
    from tests.conftest import ROOT

    zoo = ROOT / "assets" / "zoo"  # models with a tokenizer (78 tokens)
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(zoo / "base"),
                        "models": [{"model": str(zoo / name)} for name in ("upper", "add")],
                        "tokenizer": {"source": "base", "pad_to_multiple_of": 64}})
    plan = plan_from_config(cfg)
    assert "transformer.wte.weight" in {n for n, rows in work_units(plan, 4, 3000) if rows is not None}
    whole = load_sd(merge_to_dir(plan, tmp_path / "whole"))
    blocked = load_sd(merge_to_dir(plan_from_config(cfg), tmp_path / "blocked", block_bytes=3000))
    assert whole["transformer.wte.weight"].shape[0] % 64 == 0
    assert all(torch.equal(whole[k], blocked[k]) for k in whole)



@pytest.mark.parametrize("files", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "fednova", "cclip", "fedgma", "median", "ties"])
def test_large_tensors_merged_in_row_blocks_give_the_same_bytes(tiny_zoo, bf16_zoo, tmp_path, method, compute,
                                                                files):
    """A tensor whose stack exceeds the block budget is read, merged and written in blocks of rows
    (memory flat whatever the embedding's size) where the method is coordinate-wise; the folder is
    byte-for-byte the one merged whole. TIES (a top-k over each tensor) is never cut."""
    from merging.engine import work_units

    zoo = tiny_zoo if files == "float32" else bf16_zoo
    cfg = parse_config({"merge_method": method, "base_model": str(zoo["base"]), "dtype": compute,
                        "models": [{"model": str(zoo[f"ft{i}"]), "parameters": {"weight": w}}
                                   for i, w in enumerate([0.5, 1.0, 0.8])],
                        "parameters": {"lambda": 0.9, **_hp(method), **({"density": 0.5} if method == "ties" else {})}})
    plan = plan_from_config(cfg)
    budget = 3000  # bytes of stack per block: wte (40 × 16) and the MLP matrices are cut
    units = work_units(plan, 4, budget)
    cut = {n for n, rows in units if rows is not None}
    if method == "ties":
        assert not cut
    else:
        assert "transformer.wte.weight" in cut and len(units) > len(plan.tensor_names) + 10
    whole = load_sd(merge_to_dir(plan, tmp_path / "whole"))
    blocked = load_sd(merge_to_dir(plan_from_config(cfg), tmp_path / "blocked", block_bytes=budget, shard_bytes=4000))
    assert set(whole) == set(blocked)
    for k in whole:
        assert whole[k].dtype == blocked[k].dtype and torch.equal(whole[k], blocked[k]), k
