"""mergekit's own configs (bench/fixtures/mergekit) against mergekit 0.1.5's stored outputs.

The expected tensors in tests/data/mergekit_expected were written by real mergekit on the same
generated models (`python bench/mergekit_fixtures.py --arch llama-tiny --write-expected ...`, layer
tensors kept); here only our merge runs. bfloat16 results must be bit-equal, float32 within 1e-6.
"""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from mergekit_fixtures import FIXTURES, SHAPES, make_models, render  # noqa: E402

from merging import load_config, merge_to_dir, plan_from_config  # noqa: E402

EXPECTED = Path(__file__).resolve().parent / "data" / "mergekit_expected"
CASES = sorted(p.stem for p in EXPECTED.glob("*.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("mk"), "llama-tiny")


def test_every_stored_case_has_its_fixture():
    assert len(CASES) >= 15
    for case in CASES:
        assert (FIXTURES / f"{case.rsplit('-', 1)[0]}.yml").exists()


@pytest.mark.parametrize("case", CASES)
def test_fixture_equals_mergekit(case, models, tmp_path):
    name, dtype = case.rsplit("-", 1)
    cfg = tmp_path / "c.yml"
    cfg.write_text(render(FIXTURES / f"{name}.yml", models, dtype, SHAPES["llama-tiny"]["num_hidden_layers"]))
    out = merge_to_dir(plan_from_config(load_config(cfg), allow_hub=False), tmp_path / "out")
    ours = load_file(out / "model.safetensors")
    expected = load_file(EXPECTED / f"{case}.safetensors")
    assert expected and set(expected) <= set(ours)
    for k, theirs in expected.items():
        mine = ours[k]
        assert mine.dtype == getattr(torch, dtype), k
        if dtype == "float32":
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=f"{case}: {k}")
        else:  # bit-equal (mergekit writes arcee_fusion's float32 result for a bfloat16 config: round it)
            assert torch.equal(mine, theirs.to(mine.dtype)), f"{case}: {k} differs"


def test_bfloat16_is_computed_in_bfloat16_unless_compute_dtype_says_float32(models, tmp_path):
    """`dtype: bfloat16` computes in bfloat16 like mergekit; `compute_dtype: float32` accumulates in
    float32 and only rounds the result (ties' trim then keeps other entries: the outputs differ)."""
    text = render(FIXTURES / "ties.yml", models, "bfloat16", 2)
    outs = {}
    for tag, extra in (("mk", ""), ("f32", "compute_dtype: float32\n")):
        cfg = tmp_path / f"{tag}.yml"
        cfg.write_text(text + extra)
        outs[tag] = load_file(merge_to_dir(plan_from_config(load_config(cfg)), tmp_path / tag) / "model.safetensors")
    expected = load_file(EXPECTED / "ties-bfloat16.safetensors")
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(outs["mk"][k], expected[k])
    assert outs["f32"][k].dtype == torch.bfloat16 and not torch.equal(outs["f32"][k], expected[k])


def test_passthrough_slices_stack_layers(models, tmp_path):
    """examples/orcamini-platy-44layer.yml: layers [0, 2) of A then [1, 2) of B — a 3-layer model whose
    embeddings come from A and final norm and head from B; transformers loads it."""
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "c.yml"
    cfg.write_text(render(FIXTURES / "orcamini_platy_layers.yml", models, "float32", 2))
    out = merge_to_dir(plan_from_config(load_config(cfg), allow_hub=False), tmp_path / "out")
    merged = load_file(out / "model.safetensors")
    a, b = load_file(models["MODEL_A"] / "model.safetensors"), load_file(models["MODEL_B"] / "model.safetensors")
    for k in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(merged[f"model.layers.0.{k}"], a[f"model.layers.0.{k}"])
        assert torch.equal(merged[f"model.layers.1.{k}"], a[f"model.layers.1.{k}"])
        assert torch.equal(merged[f"model.layers.2.{k}"], b[f"model.layers.1.{k}"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3


def test_unsupported_slices_are_refused_by_name(models, tmp_path):
    from merging import MergeError, parse_config

    with pytest.raises(MergeError, match="only with passthrough"):
        parse_config({"merge_method": "ties", "base_model": "x", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]}, {"sources": [{"model": "b", "layer_range": [1, 2]}]}]})
    cfg = parse_config({"merge_method": "linear", "slices": [{"sources": [
        {"model": str(models["MODEL_A"]), "layer_range": [0, 1]}, {"model": str(models["MODEL_B"]), "layer_range": [0, 1]}]}]})
    with pytest.raises(MergeError, match="not the whole model"):
        plan_from_config(cfg)


def test_tokenizer_union_chat_template_and_refusals(models, tmp_path):
    """`tokenizer: {}` means union (mergekit's default); with one shared tokenizer that is the base's.
    `chat_template: chatml` lands in tokenizer_config.json. Different vocabularies are refused."""
    import json
    import shutil

    from merging import MergeError

    cfg = tmp_path / "c.yml"
    cfg.write_text(render(FIXTURES / "tokenizer_union.yml", models, "float32", 2))
    out = merge_to_dir(plan_from_config(load_config(cfg)), tmp_path / "out")
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert (out / "tokenizer.json").read_bytes() == (models["MODEL_C"] / "tokenizer.json").read_bytes()

    other = tmp_path / "other"
    shutil.copytree(models["MODEL_B"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["model"]["vocab"]["extra"] = len(tj["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg.write_text(render(FIXTURES / "tokenizer_union.yml", {**models, "MODEL_B": other}, "float32", 2))
    with pytest.raises(MergeError, match="tokenizer differs"):
        plan_from_config(load_config(cfg))
    with pytest.raises(MergeError, match="chat_template"):
        load_config_text(tmp_path, cfg.read_text().replace("chatml", "vicuna"))


def load_config_text(tmp_path, text):
    p = tmp_path / "t.yml"
    p.write_text(text)
    return load_config(p)


def test_della_keep_probability_follows_the_magnitude_rank():
    """DELLA (mergekit's della_magprune): keep probability density − ε for the smallest magnitude of a
    row up to density + ε for the largest; with rescale the row keeps its L1 norm."""
    from merging.sparsify import exact_della

    x = torch.randn(32, 4096, generator=torch.Generator().manual_seed(0))
    kept = exact_della(x, 0.5, 0.2, seed=7, rescale=False) != 0
    n = kept.numel()
    assert abs(float(kept.float().mean()) - 0.5) < 5 * (0.25 / n) ** 0.5
    order = x.abs().argsort(dim=1)
    top = kept.gather(1, order[:, -400:]).float().mean()  # ranks ≥ 0.9: p ≈ 0.5 + 0.2·0.95
    low = kept.gather(1, order[:, :400]).float().mean()
    assert abs(float(top) - 0.69) < 0.03 and abs(float(low) - 0.31) < 0.03
    r = exact_della(x, 0.5, 0.2, seed=7, rescale=True)
    torch.testing.assert_close(r.abs().sum(), x.abs().sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("fixture", ["gradient_slerp", "orcamini_platy_layers"])
def test_merge_config_of_a_slices_merge_reproduces_it(fixture, models, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(render(FIXTURES / f"{fixture}.yml", models, "bfloat16", 2))
    first = merge_to_dir(plan_from_config(load_config(cfg)), tmp_path / "a")
    again = merge_to_dir(plan_from_config(load_config(first / "merge_config.yml")), tmp_path / "b")
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_cuts_a_padded_vocabulary_to_its_tokens(tmp_path):
    """Embedding rows beyond the tokenizer's tokens (a padded vocabulary) are dropped when a tokenizer
    is chosen, as mergekit does; the kept rows are the merge's rows (task arithmetic works per entry)."""
    padded = make_models(tmp_path / "m", "llama-padded")
    outs = {}
    for tag, extra in (("plain", ""), ("union", "tokenizer_source: union\n")):
        cfg = tmp_path / f"{tag}.yml"
        cfg.write_text(render(FIXTURES / "task_arithmetic.yml", padded, "float32", 2) + extra)
        outs[tag] = merge_to_dir(plan_from_config(load_config(cfg)), tmp_path / tag)
    plain, cut = (load_file(outs[t] / "model.safetensors") for t in ("plain", "union"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert plain[k].shape[0] == 100 and cut[k].shape[0] == 96
        assert torch.equal(cut[k], plain[k][:96])
    import json

    assert json.loads((outs["union"] / "config.json").read_text())["vocab_size"] == 96


def test_passthrough_stacks_layers_of_models_of_different_depths(tmp_path):
    """Slices from a 2-layer and a 3-layer model of one width (mergekit stacks them: 4 layers here). The
    whole-model check refused it ("unknown tensors transformer.h.2...") though every stacked layer
    fits; layers of another width are refused, naming the layer."""
    import yaml
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    from merging import MergeError
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(n_layer=2)).save_pretrained(tmp_path / "two")
    torch.manual_seed(1)
    GPT2LMHeadModel(tiny_config(n_layer=3)).save_pretrained(tmp_path / "three")
    GPT2LMHeadModel(tiny_config(n_layer=3, n_embd=32)).save_pretrained(tmp_path / "wide")

    def stack(second: str):
        cfg = tmp_path / f"{second}.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": str(tmp_path / "two"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tmp_path / second), "layer_range": [1, 3]}]}]}))
        return merge_to_dir(plan_from_config(load_config(cfg), allow_hub=False), tmp_path / f"out-{second}")

    out = stack("three")
    merged = load_file(out / "model.safetensors")
    two, three = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "three" / "model.safetensors")
    for k in ("attn.c_attn.weight", "mlp.c_proj.bias", "ln_1.weight"):
        for i, (src, j) in enumerate([(two, 0), (two, 1), (three, 1), (three, 2)]):
            assert torch.equal(merged[f"transformer.h.{i}.{k}"], src[f"transformer.h.{j}.{k}"]), (i, k)
    assert torch.equal(merged["transformer.wte.weight"], two["transformer.wte.weight"])
    assert torch.equal(merged["transformer.ln_f.weight"], three["transformer.ln_f.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 4
    with pytest.raises(MergeError, match=r"slices\[1\]: layer 1 of .*wide does not match .*two layer 0"):
        stack("wide")


def test_embed_slerp_of_published_configs_is_accepted_and_changes_nothing(models, tmp_path):
    """`embed_slerp: true` (in many published slerp configs) was refused ("slerp has no parameter
    'embed_slerp'"); mergekit 0.1.5 reads it nowhere and merges as without it: so do we."""
    text = render(FIXTURES / "gradient_slerp.yml", models, "bfloat16", SHAPES["llama-tiny"]["num_hidden_layers"])
    cfg = tmp_path / "c.yml"
    cfg.write_text(text.replace("parameters:\n", "parameters:\n  embed_slerp: true\n", 1))
    assert "embed_slerp" in cfg.read_text()
    out = load_file(merge_to_dir(plan_from_config(load_config(cfg), allow_hub=False), tmp_path / "out")
                    / "model.safetensors")
    expected = load_file(EXPECTED / "gradient_slerp-bfloat16.safetensors")
    assert expected and all(torch.equal(out[k], v) for k, v in expected.items())
