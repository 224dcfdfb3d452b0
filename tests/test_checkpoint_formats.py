"""Input formats a merge must read like plain safetensors: legitimate `.bin` files, tied weights,
sharded folders, bf16/fp16 weights. Tiny GPT-2s built here; merged through the YAML API to disk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from merging import Checkpoint, MergeError, parse_config, plan_from_config
from merging.engine import merge_to_dir
from tests.conftest import load_sd, tiny_models

WEIGHTS = [0.7, 1.2]
LAM = 0.8


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes of a tiny GPT-2 (tied lm_head), each as safetensors."""
    return tiny_models(tmp_path_factory.mktemp("formats"), 1, [30, 31])


def merge(tmp: Path, base: Path, fts: list[Path], name: str = "out", **extra) -> Path:
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(base),
                        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, WEIGHTS)],
                        "parameters": {"lambda": LAM}, **extra})
    return merge_to_dir(plan_from_config(cfg), tmp / name)


def reference(base: dict, fts: list[dict]) -> dict[str, torch.Tensor]:
    """θ₀ + λ Σ wᵢ(θᵢ − θ₀), in float64, from the float tensors of the safetensors files."""
    out = {}
    for k, b in base.items():
        b64 = b.double()
        out[k] = b64 + LAM * sum(w * (ft[k].double() - b64) for w, ft in zip(WEIGHTS, fts))
    return out


def as_bin(src: Path, dst: Path) -> Path:
    """The same model as a transformers-era `pytorch_model.bin`: torch.save of the module's
    state_dict, so the tied lm_head.weight is saved too, sharing wte's storage."""
    from transformers import GPT2LMHeadModel

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = GPT2LMHeadModel.from_pretrained(src).state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_bin_checkpoint_merges_like_its_safetensors_twin(models, tmp_path):
    want = load_sd(merge(tmp_path, models["base"], [models["ft0"], models["ft1"]], "st"))
    bins = [as_bin(models[k], tmp_path / f"{k}-bin") for k in ("base", "ft0", "ft1")]
    ck = Checkpoint(bins[1])
    # the tie is de-duplicated: lm_head.weight is read once, as transformers' safetensors have it
    assert "lm_head.weight" not in ck.keys() and "transformer.wte.weight" in ck.keys()
    assert sorted(ck.keys()) == sorted(Checkpoint(models["ft0"]).keys())
    got = load_sd(merge(tmp_path, bins[0], bins[1:], "bin"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # mixed: a .bin fine-tune over a safetensors base
    mixed = load_sd(merge(tmp_path, models["base"], [bins[1], models["ft1"]], "mixed"))
    assert all(torch.equal(mixed[k], want[k]) for k in want)


class NotATensor:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.mark.parametrize("content,needles", [
    (lambda w: {"transformer.wte.weight": NotATensor()}, ["refused", "weights_only", "pickles", "NotATensor"]),
    (lambda w: {"transformer.wte.weight": w, "step": 3}, ["refused", "dict of tensors"]),
    (lambda w: [w], ["refused", "dict of tensors"]),
], ids=["pickled-object", "non-tensor-value", "not-a-dict"])
def test_bin_with_anything_but_tensors_is_refused(models, tmp_path, content, needles):
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(models["base"] / "config.json", folder / "config.json")
    torch.save(content(torch.zeros(40, 16)), folder / "pytorch_model.bin")
    with pytest.raises(MergeError) as err:
        merge(tmp_path, models["base"], [models["ft0"], folder])
    msg = str(err.value)
    assert all(n in msg for n in needles), msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1
    assert "\x1b" not in msg and "weights_only=False" not in msg  # not torch's advice to load it unsafely
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_tied_weights_stay_tied_and_merge_once(models, tmp_path):
    from transformers import AutoModelForCausalLM

    fts = [models["ft0"], models["ft1"]]
    assert "lm_head.weight" not in load_sd(models["base"])  # transformers writes the tie once
    out = merge(tmp_path, models["base"], fts)
    merged = load_sd(out)
    assert "lm_head.weight" not in merged  # ... and so does the merge
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    expected = reference(load_sd(models["base"]), [load_sd(f) for f in fts])
    torch.testing.assert_close(merged["transformer.wte.weight"], expected["transformer.wte.weight"].float(),
                               rtol=0, atol=2e-7)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])


def test_sharded_input_merges_like_the_single_file(models, tmp_path):
    from transformers import GPT2LMHeadModel

    sharded = {}
    for k in ("base", "ft0", "ft1"):
        sharded[k] = tmp_path / f"{k}-sharded"
        GPT2LMHeadModel.from_pretrained(models[k]).save_pretrained(sharded[k], max_shard_size="10KB")
        assert len(list(sharded[k].glob("*.safetensors"))) >= 3
        assert (sharded[k] / "model.safetensors.index.json").exists()
    assert sorted(Checkpoint(sharded["ft0"]).keys()) == sorted(Checkpoint(models["ft0"]).keys())
    want = load_sd(merge(tmp_path, models["base"], [models["ft0"], models["ft1"]], "single"))
    got = load_sd(merge(tmp_path, sharded["base"], [sharded["ft0"], sharded["ft1"]], "sharded"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_merge_in_float32_and_keep_their_dtype(models, tmp_path, dtype):
    """The documented rule (MergeConfig, MergePlan.output_dtype): without `dtype`/`out_dtype` the
    merge is computed in float32 and written in the base's dtype; `out_dtype` picks another."""
    from transformers import GPT2LMHeadModel

    half = {}
    for k in ("base", "ft0", "ft1"):
        half[k] = tmp_path / f"{k}-half"
        GPT2LMHeadModel.from_pretrained(models[k]).to(dtype).save_pretrained(half[k])
    inputs = {k: load_sd(v) for k, v in half.items()}
    assert inputs["ft0"]["transformer.wte.weight"].dtype == dtype
    # θ₀ + λΣwᵢτᵢ from the half-precision values, in float64: the float32 merge is within float32 rounding
    expected = reference(inputs["base"], [inputs["ft0"], inputs["ft1"]])

    as_input = merge(tmp_path, half["base"], [half["ft0"], half["ft1"]], "same")
    got = load_sd(as_input)
    assert {t.dtype for t in got.values()} == {dtype}
    assert json.loads((as_input / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    wide = load_sd(merge(tmp_path, half["base"], [half["ft0"], half["ft1"]], "f32", out_dtype="float32"))
    assert {t.dtype for t in wide.values()} == {torch.float32}
    for k, e in expected.items():
        # computed in float32, not in the half dtype: float32 rounding only, then one rounding to `dtype`
        torch.testing.assert_close(wide[k].double(), e, rtol=1e-6, atol=1e-7)
        assert torch.equal(got[k], wide[k].to(dtype)), k
    # a merge computed in the half dtype itself (mergekit's `dtype:`) rounds at every step: not the same
    low = load_sd(merge(tmp_path, half["base"], [half["ft0"], half["ft1"]], "low", dtype=str(dtype)[6:]))
    assert {t.dtype for t in low.values()} == {dtype}
    assert any(not torch.equal(low[k], got[k]) for k in got)


def _cli(*argv: str) -> tuple[int, str]:
    """`python -m merging ...` in this process: (exit status, stderr)."""
    import contextlib
    import io

    from merging.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


def test_the_index_decides_which_files_hold_the_model(models, tmp_path):
    """A sharded folder is read as its model.safetensors.index.json lists it (mergekit's reading):
    a listed shard that is missing is refused by name (it was skipped: a passthrough wrote the
    incomplete model, a merge blamed the other model's "unknown tensors"), and another weight file
    beside the shards (a stale shard, Mistral's consolidated.safetensors) is not part of the model."""
    import yaml
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    sharded = tmp_path / "ft0-sharded"
    GPT2LMHeadModel.from_pretrained(models["ft0"]).save_pretrained(sharded, max_shard_size="10KB")
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, sharded / "consolidated.safetensors")
    assert sorted(Checkpoint(sharded).keys()) == sorted(Checkpoint(models["ft0"]).keys())
    want = load_sd(merge(tmp_path, models["base"], [models["ft0"], models["ft1"]], "single"))
    got = load_sd(merge(tmp_path, models["base"], [sharded, models["ft1"]], "with-stray"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    # a model.safetensors beside other weight files: the single file alone is the model
    single = tmp_path / "ft0-single"
    shutil.copytree(models["ft0"], single)
    save_file({"extra.weight": torch.zeros(2)}, single / "adapter_model.safetensors")
    assert sorted(Checkpoint(single).keys()) == sorted(Checkpoint(models["ft0"]).keys())

    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(index.values()))[-1]
    (sharded / gone).unlink()
    for method, entries in (("passthrough", [sharded]), ("task_arithmetic", [sharded, models["ft1"]])):
        cfg = tmp_path / f"{method}.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(models["base"]),
                                       "models": [{"model": str(m)} for m in entries]}))
        rc, err = _cli("merge", str(cfg), str(tmp_path / f"out-{method}"), "--no-progress", "--offline")
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"lists {gone}" in err and "missing" in err and "ft0-sharded" in err, err
        assert not (tmp_path / f"out-{method}").exists()
    with pytest.raises(MergeError, match="missing"):
        Checkpoint(sharded)

    # an index naming a file outside the folder, or a tensor its file does not hold
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(MergeError, match="not a file name in the model's folder"):
        Checkpoint(sharded)
    present = sorted(set(index.values()))[0]
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"nope.weight": present}}))
    with pytest.raises(MergeError, match=f"puts tensor nope.weight in {present}"):
        Checkpoint(sharded)


def test_a_sharded_bin_is_read_through_its_index(models, tmp_path):
    """pytorch_model.bin shards with their index, each through torch.load(weights_only=True); a
    listed shard that is missing is refused by name."""
    from safetensors.torch import load_file

    folder = tmp_path / "ft0-bin-sharded"
    folder.mkdir()
    shutil.copy(models["ft0"] / "config.json", folder / "config.json")
    state = load_file(models["ft0"] / "model.safetensors")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    torch.save({"stale.weight": torch.zeros(3)}, folder / "pytorch_model.bin.old.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    ck = Checkpoint(folder)
    assert sorted(ck.keys()) == names
    assert all(torch.equal(ck.get(k), state[k]) for k in names)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MergeError, match="pytorch_model-00002-of-00002.bin .* missing"):
        Checkpoint(folder)


def test_side_files_that_are_not_json_objects_are_refused_by_name(models, tmp_path):
    """config.json, training.json and adapter_config.json must be JSON objects: a list was read as no
    config (a fine-tune merged with no architecture check; the base's was "no config.json"), and as an
    internal error for training.json (fednova) and adapter_config.json; a string lora_alpha likewise."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(models["base"]),
                   LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(adapter)
    good = json.loads((adapter / "adapter_config.json").read_text())

    def broken(name: str, file: str, text: str, src=models["ft0"]) -> Path:
        folder = shutil.copytree(src, tmp_path / name)
        (folder / file).write_text(text)
        return folder

    cases = [
        ("task_arithmetic", broken("cfg-list", "config.json", "[]"), "config.json: expected a JSON object", False),
        ("task_arithmetic", broken("cfg-list-base", "config.json", "[1]", models["base"]),
         "config.json: expected a JSON object", True),
        ("fednova", broken("train-list", "training.json", "[1, 2]"), "training.json: expected a JSON object", False),
        ("task_arithmetic", broken("ad-list", "adapter_config.json", "[]", adapter),
         "adapter_config.json: expected a JSON object", False),
        ("task_arithmetic", broken("ad-alpha", "adapter_config.json", json.dumps({**good, "lora_alpha": "16"}), adapter),
         "lora_alpha and alpha_pattern must be numbers", False),
    ]
    for method, folder, want, as_base in cases:
        base, model = (folder, models["ft1"]) if as_base else (models["base"], folder)
        entries = [{"model": str(model), "parameters": {"steps": 10}} if method == "fednova" and not as_base
                   else {"model": str(model)}, {"model": str(models["ft1"])}]
        cfg = tmp_path / f"{folder.name}.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": entries}))
        rc, err = _cli("merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--offline")
        assert rc == 2 and want in err and str(folder) in err and err.count("\n") == 1, (want, err)
        assert "internal error" not in err and not (tmp_path / "out").exists()


def test_a_bin_in_torchs_legacy_format_is_read_and_still_weights_only(models, tmp_path):
    """A pytorch_model.bin saved before torch 1.6 (not a zip) cannot be memory-mapped: it was refused as
    "not a plain tensor checkpoint (... mmap can only be used ...)". It is read whole, through the same
    weights-only unpickler: a pickled callable in that format is still refused, and never runs."""
    from safetensors.torch import load_file

    folder = tmp_path / "legacy-bin"
    folder.mkdir()
    shutil.copy(models["ft0"] / "config.json", folder / "config.json")
    torch.save(load_file(models["ft0"] / "model.safetensors"), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    want = load_sd(merge(tmp_path, models["base"], [models["ft0"], models["ft1"]], "st"))
    got = load_sd(merge(tmp_path, models["base"], [folder, models["ft1"]], "legacy"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    marker = tmp_path / "ran"
    torch.save({"transformer.wte.weight": RunsCode(str(marker))}, folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(MergeError, match="refused: .*weights_only=True.*pickles"):
        Checkpoint(folder)
    assert not marker.exists()


class RunsCode:
    """Unpickling it would create a file: weights_only must refuse it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("extra,want", [
    ({"out_dtype": "float16"}, "the merge result: tensor {k} has 1 value(s) beyond float16's range (±65504); "
                               "use out_dtype bfloat16 or float32"),
    ({"dtype": "bfloat16", "out_dtype": "float16"}, "the merge result: tensor {k} has 1 value(s) beyond float16's"),
    ({"dtype": "float16"}, "big: tensor {k} has 1 value(s) beyond float16's range (±65504); use dtype bfloat16"),
])
def test_values_beyond_float16_are_refused_not_written_as_inf(models, tmp_path, extra, want):
    """A bfloat16 weight of 1e6 (finite) merged into float16: the merge wrote inf into the model with
    exit 0 (out_dtype), or blamed the model for a "non-finite value" it does not hold (dtype: float16,
    mergekit's arithmetic). Refused, naming the tensor and the dtype; nothing written."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    k = "transformer.h.0.ln_1.weight"
    big = tmp_path / "big"
    GPT2LMHeadModel.from_pretrained(models["ft0"]).to(torch.bfloat16).save_pretrained(big)
    sd = load_file(big / "model.safetensors")
    sd[k][0] = 1e6
    save_file(sd, big / "model.safetensors", metadata={"format": "pt"})
    cfg = parse_config({"merge_method": "ties", "base_model": str(models["base"]), **extra,
                        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}}
                                   for m in (big, models["ft1"])]})
    with pytest.raises(MergeError) as err:
        merge_to_dir(plan_from_config(cfg), tmp_path / "out")
    assert str(err.value).startswith(want.format(k=k)), str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_bin_wrapped_as_a_training_checkpoint_is_read_through_its_state_dict(models, tmp_path):
    """torch.save({"state_dict": ..., "epoch": ..., "optimizer_states": ...}) (Lightning's layout, many
    training scripts'): mergekit lists its tensors from under "state_dict"; it was refused ("expected a
    dict of tensors"). Read the same way, still through torch.load(weights_only=True): a pickled object
    anywhere in the file is refused and never runs, a non-tensor among the weights is refused, and
    another wrapper name ({"model": ...}, which mergekit does not unwrap either) is refused naming it."""
    from transformers import GPT2LMHeadModel

    def wrapped(name: str, content) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(models["ft0"] / "config.json", folder / "config.json")
        torch.save(content, folder / "pytorch_model.bin")
        return folder

    state = GPT2LMHeadModel.from_pretrained(models["ft0"]).state_dict()  # the tied head saved twice, as in .bin
    lightning = wrapped("lightning", {"state_dict": state, "epoch": 3, "global_step": 120,
                                      "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(4)}}, "lr": 1e-3}]})
    ck = Checkpoint(lightning)
    assert sorted(ck.keys()) == sorted(Checkpoint(models["ft0"]).keys())  # the tie read once, no "epoch"
    want = load_sd(merge(tmp_path, models["base"], [models["ft0"], models["ft1"]], "st"))
    got = load_sd(merge(tmp_path, models["base"], [lightning, models["ft1"]], "wrapped"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    marker = tmp_path / "ran"
    refused = [
        ({"state_dict": state, "callbacks": RunsCode(str(marker))}, ["weights_only=True", "pickles"]),
        ({"state_dict": {**state, "transformer.wte.weight": NotATensor()}}, ["pickles", "NotATensor"]),
        ({"state_dict": {**state, "step": 3}}, ["expected a dict of tensors"]),
        ({"model": state, "epoch": 3}, ["expected a dict of tensors (it holds a dict under 'model'; "
                                        "only a 'state_dict' wrapper is unwrapped)"]),
    ]
    for i, (content, needles) in enumerate(refused):
        folder = wrapped(f"odd{i}", content)
        with pytest.raises(MergeError) as err:
            merge(tmp_path, models["base"], [models["ft0"], folder], f"odd{i}")
        msg = str(err.value)
        assert "refused" in msg and all(n in msg for n in needles) and len(msg.splitlines()) == 1, msg
        assert not (tmp_path / f"odd{i}-out").exists()
    assert not marker.exists()
