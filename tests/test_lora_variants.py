"""LoRA adapter variants against PEFT's own merge_and_unload: per-module ranks and alphas
(`rank_pattern`, `alpha_pattern`), whole modules trained beside the adapter (`modules_to_save`),
and DoRA, which is refused with a message that names it."""
from __future__ import annotations

import json

import pytest
import torch

from merging import Checkpoint, MergeError, load_source, parse_config, plan_from_config
from merging.engine import merge_to_dir
from tests.conftest import load_sd


def peft_adapter(base_dir, folder, seed: int = 0, **lora):
    """A PEFT LoRA adapter of the base saved to `folder`, and PEFT's merged state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(fan_in_fan_out=True, init_lora_weights=False, **lora))
    for name, module in model.named_modules():  # modules_to_save: the trained copy moves away from the base
        if name.endswith("modules_to_save.default"):
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.25 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def assert_deltas_match_peft(base_dir, adapter_dir, merged) -> set[str]:
    """θ₀ + τ equals PEFT's merged weights for every tensor of the base; returns the changed names."""
    base = Checkpoint(base_dir)
    src = load_source(adapter_dir)
    changed = set()
    for key in base.keys():
        b = base.get(key).float()
        delta = src.delta(key, b)
        torch.testing.assert_close(b + delta, merged[key].float(), atol=1e-6, rtol=1e-5, msg=key)
        if delta.abs().sum() > 0:
            changed.add(key)
    return changed


def test_rank_and_alpha_patterns_match_peft(tiny_zoo, tmp_path):
    # overlapping alpha patterns: PEFT takes the first key that matches (peft.utils.other.get_pattern_key)
    adapter, merged = peft_adapter(
        tiny_zoo["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
        rank_pattern={"h.1.attn.c_attn": 2, "c_fc": 3},
        alpha_pattern={"h.0.attn.c_attn": 2, "c_fc": 12, "h.0.mlp.c_fc": 5})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    changed = assert_deltas_match_peft(tiny_zoo["base"], adapter, merged)
    assert changed == {f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}


def test_rslora_with_patterns_matches_peft(tiny_zoo, tmp_path):
    adapter, merged = peft_adapter(tiny_zoo["base"], tmp_path / "ad", seed=1, r=4, lora_alpha=6,
                                   target_modules=["c_proj"], use_rslora=True,
                                   rank_pattern={"mlp.c_proj": 2}, alpha_pattern={"h.1.attn.c_proj": 3})
    assert len(assert_deltas_match_peft(tiny_zoo["base"], adapter, merged)) == 4


def test_modules_to_save_are_merged_as_full_weights(tiny_zoo, tmp_path):
    adapter, merged = peft_adapter(tiny_zoo["base"], tmp_path / "ad", seed=2, r=2, lora_alpha=4,
                                   target_modules=["c_attn"], modules_to_save=["ln_f"])
    changed = assert_deltas_match_peft(tiny_zoo["base"], adapter, merged)
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= changed
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"} <= changed
    # through a YAML merge to disk (w = λ = 1): exactly PEFT's merged model
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                        "models": [{"model": str(adapter)}]})
    out = load_sd(merge_to_dir(plan_from_config(cfg), tmp_path / "out"))
    for k, v in out.items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-5, msg=k)


def test_dora_adapter_is_refused_by_name(tiny_zoo, tmp_path):
    adapter, _ = peft_adapter(tiny_zoo["base"], tmp_path / "dora", r=2, lora_alpha=4,
                              target_modules=["c_attn"], use_dora=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    with pytest.raises(MergeError, match="DoRA"):
        load_source(adapter)
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                        "models": [{"model": str(tiny_zoo["ft0"])}, {"model": str(adapter)}]})
    with pytest.raises(MergeError) as err:
        plan_from_config(cfg)
    assert "DoRA" in str(err.value) and "dora" in str(err.value)  # names the method and the adapter
    assert len(str(err.value).splitlines()) == 1


def merged_into(model_dir, adapter_dir, folder):
    """PEFT's merge_and_unload of the adapter into another model, saved (what mergekit does for `model+adapter`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    model.merge_and_unload().save_pretrained(folder)
    return folder


def test_an_adapter_on_any_model_merges_as_peft_merged_it(tiny_zoo, tmp_path):
    """mergekit's `model+adapter` on a model other than the base, as the base, or as the first model of
    a merge without a base (linear): the model with PEFT's merge_and_unload of the adapter. Before: "a
    LoRA adapter is only supported on the base model", and as base_model or a linear's first model
    "no such file or folder"."""
    from shutil import copytree

    adapter, _ = peft_adapter(tiny_zoo["base"], tmp_path / "ad", seed=3, r=4, lora_alpha=8,
                              target_modules=["c_attn", "c_fc"])
    ft1_ad = merged_into(tiny_zoo["ft1"], adapter, tmp_path / "ft1-merged")
    base_ad = merged_into(tiny_zoo["base"], adapter, tmp_path / "base-merged")
    plus = copytree(tiny_zoo["ft1"], tmp_path / "ft1+copy")  # a folder whose name has a '+' is that folder

    def run(name, method, models, base=None, params=None):
        cfg = {"merge_method": method, "models": [{"model": str(m), "parameters": {"weight": w, **(params or {})}}
                                                   for m, w in zip(models, (0.7, 0.5))]}
        if base is not None:
            cfg["base_model"] = str(base)
        return load_sd(merge_to_dir(plan_from_config(parse_config(cfg)), tmp_path / name))

    cases = [  # (ours with model+adapter, the same merge on PEFT's merged folders)
        (("linear", [f"{tiny_zoo['ft1']}+{adapter}", tiny_zoo["ft0"]]), ("linear", [ft1_ad, tiny_zoo["ft0"]])),
        (("linear", [f"{tiny_zoo['base']}+{adapter}", tiny_zoo["ft0"]]), ("linear", [base_ad, tiny_zoo["ft0"]])),
        (("ties", [f"{tiny_zoo['ft1']}+{adapter}", tiny_zoo["ft0"]], tiny_zoo["base"], {"density": 0.6}),
         ("ties", [ft1_ad, tiny_zoo["ft0"]], tiny_zoo["base"], {"density": 0.6})),
        (("task_arithmetic", [tiny_zoo["ft1"], tiny_zoo["ft0"]], f"{tiny_zoo['base']}+{adapter}"),
         ("task_arithmetic", [tiny_zoo["ft1"], tiny_zoo["ft0"]], base_ad)),
        (("task_arithmetic", [plus, tiny_zoo["ft0"]], tiny_zoo["base"]),
         ("task_arithmetic", [tiny_zoo["ft1"], tiny_zoo["ft0"]], tiny_zoo["base"])),
    ]
    for i, (ours, theirs) in enumerate(cases):
        got, want = run(f"ours{i}", *ours), run(f"peft{i}", *theirs)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (i, k)
    # the adapter changed what it targets (the cases above would pass on a no-op adapter otherwise)
    assert not torch.equal(load_sd(ft1_ad)["transformer.h.0.attn.c_attn.weight"],
                           load_sd(tiny_zoo["ft1"])["transformer.h.0.attn.c_attn.weight"])


def test_an_adapter_on_a_model_without_its_targets_is_refused(tiny_zoo, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    adapter, _ = peft_adapter(tiny_zoo["base"], tmp_path / "ad", r=2, target_modules=["c_attn"])
    cfg = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "one-layer")
    with pytest.raises(MergeError, match=r"one-layer\+.*targets tensors one-layer does not have: transformer.h.1"):
        plan_from_config(parse_config({"merge_method": "linear", "models": [
            {"model": f"{tmp_path / 'one-layer'}+{adapter}"}, {"model": str(tmp_path / "one-layer")}]}))


def test_an_adapter_of_a_tied_output_head_updates_the_embedding_as_peft_does(tiny_zoo, tmp_path):
    """LoRA on lm_head of a tied GPT-2: PEFT saves lm_head's A, B and its base_layer weight, and its
    merge_and_unload changes the shared embedding. It was refused ("the adapter targets tensors the
    base does not have: lm_head.base_layer.weight, lm_head.weight"); now it merges to PEFT's tensors,
    as an adapter folder and as model+adapter."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice about tied layers
        adapter, merged = peft_adapter(tiny_zoo["base"], tmp_path / "ad", seed=4, r=4, lora_alpha=8,
                                       target_modules=["lm_head", "c_fc"])
        ft0_ad = merged_into(tiny_zoo["ft0"], adapter, tmp_path / "ft0-merged")
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert any("lm_head.base_layer" in k for k in f.keys())
    base, src = Checkpoint(tiny_zoo["base"]), load_source(adapter)
    assert "lm_head.weight" not in base  # tied: the head is the embedding
    src.bind(base)  # what every plan does (check_compatible)
    wte = base.get("transformer.wte.weight")
    torch.testing.assert_close(wte + src.delta("transformer.wte.weight", wte), merged["transformer.wte.weight"],
                               atol=1e-6, rtol=1e-5)
    assert not torch.equal(merged["transformer.wte.weight"], wte)
    for i, model in enumerate([adapter, f"{tiny_zoo['ft0']}+{adapter}"]):
        cfg = {"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]), "models": [{"model": str(model)}]}
        got = load_sd(merge_to_dir(plan_from_config(parse_config(cfg)), tmp_path / f"out{i}"))
        want = merged if i == 0 else load_sd(ft0_ad)
        for k, v in got.items():
            torch.testing.assert_close(v, want[k], atol=1e-6 if i == 0 else 0, rtol=1e-5 if i == 0 else 0, msg=k)


def test_an_adapter_over_conv1d_and_linear_layers_keeps_each_layers_orientation(tiny_zoo, tmp_path):
    """PEFT decides fan_in_fan_out per layer (GPT-2's Conv1D: true, nn.Linear: false) and saves one flag,
    the last it set: here false, though attn.c_proj is a Conv1D. Its square weight was merged untransposed
    (wrong, silently: the shape fits); the layer's kind now comes from the architecture."""
    import warnings

    from transformers import GPT2LMHeadModel

    from tests.conftest import tiny_config

    config = tiny_config()
    config.tie_word_embeddings = False  # a head of its own: only the orientation is at stake here
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "untied")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter, merged = peft_adapter(tmp_path / "untied", tmp_path / "ad", seed=5, r=4, lora_alpha=8,
                                       target_modules=["attn.c_proj", "lm_head"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")  # without lm_head's saved base weight (the
    save_file({k: v for k, v in tensors.items() if "base_layer" not in k},  # base's own): A and B alone
              adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "untied"), "models": [{"model": str(adapter)}]}
    got = load_sd(merge_to_dir(plan_from_config(parse_config(cfg)), tmp_path / "out"))
    square = "transformer.h.0.attn.c_proj.weight"
    assert got[square].shape[0] == got[square].shape[1]
    for k, v in got.items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-5, msg=k)


def test_similarity_reads_model_plus_adapter_as_merge_does(tiny_zoo, tmp_path, capsys):
    """`similarity` took no `model+adapter` ("no such file or folder") while `merge` does: the same
    parsing now gives the same task vectors: on the base, the adapter's ΔW (as its folder alone); on
    another model, that model with the adapter merged in (PEFT's merge_and_unload, saved); as --base,
    the base with the adapter merged in. The same refusals as merge, in one line."""
    from merging.cli import main

    adapter, _ = peft_adapter(tiny_zoo["base"], tmp_path / "ad", seed=6, r=4, lora_alpha=8,
                              target_modules=["c_attn", "c_fc"])
    ft1_ad = merged_into(tiny_zoo["ft1"], adapter, tmp_path / "ft1-merged")
    base_ad = merged_into(tiny_zoo["base"], adapter, tmp_path / "base-merged")

    def similarity(base, *models) -> tuple[int, dict, str]:
        capsys.readouterr()
        code = main(["similarity", "--base", str(base), *map(str, models), "--no-progress",
                     "--json", str(tmp_path / "sim.json")])
        err = capsys.readouterr().err
        return code, json.loads((tmp_path / "sim.json").read_text()) if code == 0 else {}, err

    base, ft0, ft1 = (str(tiny_zoo[k]) for k in ("base", "ft0", "ft1"))
    code, got, err = similarity(base, f"{base}+{adapter}", adapter, f"{ft1}+{adapter}", ft1_ad, ft0, base_ad)
    assert code == 0, err
    assert got["names"] == ["base+ad", "ad", "ft1+ad", "ft1-merged", "ft0", "base-merged"]
    cos, norms = got["cosine"], got["norms"]
    assert norms[0] == norms[1] and cos[0][1] == pytest.approx(1, abs=1e-12)  # τ = ΔW, exactly the folder's
    assert cos[2][:2] + cos[2][4:] == cos[3][:2] + cos[3][4:] and norms[2] == norms[3]  # PEFT's merged model
    assert cos[0][5] == pytest.approx(1, abs=1e-6) and norms[0] == pytest.approx(norms[5], rel=1e-5)
    assert 0.1 < norms[0] and abs(cos[0][4]) < 0.5  # the adapter is not nothing, nor like ft0

    code, got, err = similarity(f"{base}+{adapter}", base_ad, ft0)  # the base with the adapter merged in
    assert code == 0, err
    assert got["names"] == ["base-merged", "ft0"] and got["norms"][0] == 0 and "base-merged: zero task vector" in err

    for ref in (f"{ft0}+", f"{ft0}+{tmp_path / 'missing'}"):  # the same one-line refusals as merge
        with pytest.raises(MergeError) as merge_err:
            plan_from_config(parse_config({"merge_method": "task_arithmetic", "base_model": base,
                                           "models": [{"model": ref}]}))
        code, _, err = similarity(base, ref)
        assert code == 2 and err.strip() == f"error: {merge_err.value}", (err, str(merge_err.value))


@pytest.mark.parametrize("method,dtype", [("task_arithmetic", "float32"), ("linear", "bfloat16")])
def test_an_adapted_tensor_merged_in_row_blocks_makes_its_update_once(tiny_zoo, tmp_path, monkeypatch, method, dtype):
    """model+adapter on a tensor large enough to be merged in blocks of rows (an embedding, an MLP
    matrix): every block made the whole ΔW = B·A again (and read the whole tensor). Now ΔW is made once
    per tensor, and the folder is byte for byte the one merged whole (the float32 path and the exact
    one); the adapter's embedding (LoRA on nn.Embedding) and Conv1D layers (stored transposed) both."""
    import warnings

    from merging.engine import work_units
    from merging.task_vectors import LoraAdapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter, _ = peft_adapter(tiny_zoo["base"], tmp_path / "ad", seed=7, r=4, lora_alpha=8,
                                  target_modules=["wte", "c_attn", "c_fc"])
    base, ft0, ft1 = (str(tiny_zoo[k]) for k in ("base", "ft0", "ft1"))
    cfg = {"merge_method": method, "dtype": dtype,
           "models": [{"model": f"{ft1}+{adapter}", "parameters": {"weight": 0.6}},
                      {"model": ft0, "parameters": {"weight": 0.7}}]}
    if method == "task_arithmetic":
        cfg["base_model"] = f"{base}+{adapter}"
    budget = 3000
    plan = plan_from_config(parse_config(cfg))
    adapted = {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"}
    blocks = [n for n, rows in work_units(plan, 4, budget) if rows is not None]
    assert all(blocks.count(k) >= 3 for k in adapted), blocks

    calls: dict[tuple[int, str], int] = {}
    update = LoraAdapter._update

    def counted(self, key, *args):
        calls[id(self), key] = calls.get((id(self), key), 0) + 1
        return update(self, key, *args)

    monkeypatch.setattr(LoraAdapter, "_update", counted)
    blocked = load_sd(merge_to_dir(plan, tmp_path / "blocked", block_bytes=budget))
    assert adapted <= {k for _, k in calls} and set(calls.values()) == {1}, calls  # was: once per block
    whole = load_sd(merge_to_dir(plan_from_config(parse_config(cfg)), tmp_path / "whole"))
    assert set(whole) == set(blocked)
    for k in whole:
        assert whole[k].dtype == blocked[k].dtype and torch.equal(whole[k], blocked[k]), k


def test_an_adapter_saved_as_bin_is_read_with_the_checks_of_a_model_bin(tiny_zoo, tmp_path):
    """adapter_model.bin (older PEFT): the same deltas as its safetensors twin; a file that holds more
    than tensors is refused in one line naming the file, without torch's advice text or a repr."""
    from safetensors.torch import load_file

    adapter, merged = peft_adapter(tiny_zoo["base"], tmp_path / "ad", r=2, lora_alpha=4, target_modules=["c_attn"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert assert_deltas_match_peft(tiny_zoo["base"], adapter, merged)

    torch.save({"weights": tensors, "step": 3}, adapter / "adapter_model.bin")  # a dict that is not of tensors
    with pytest.raises(MergeError) as err:
        load_source(adapter)
    msg = str(err.value)
    assert "adapter_model.bin" in msg and "expected a dict of tensors" in msg and "'weights'" in msg, msg
    torch.save({"fn": torch.nn.Linear(2, 2)}, adapter / "adapter_model.bin")  # a pickled module: never runs
    with pytest.raises(MergeError) as err:
        load_source(adapter)
    msg = str(err.value)
    assert "not a plain tensor checkpoint" in msg and "\x1b" not in msg and len(msg.splitlines()) == 1, msg
