"""The CLI (`fedmerge` / `python -m merging`): merges, similarity, and every bad input it must refuse.

Commands run in-process through `merging.cli.main(argv)` (its exit status, stdout and stderr are
what a user sees); three tests start a real process for what only a process shows: the one-line
error and exit status of `python -m merging`, and the installed `fedmerge` console script.
Each refusal is one line on stderr that names the problem, a non-zero exit, no traceback and
nothing written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from merging.cli import main
from tests.conftest import ROOT, load_sd, perturbed, save_model, tiny_config


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`merge` sets torch to one thread for its process; here that process is the test run."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def run_cli(capsys):
    """`run_cli(*args)`: the CLI's main(argv) in this process, as (returncode, stdout, stderr)."""
    def run(*args) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def run_process(*args: str, cwd: Path = ROOT, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m merging ARGS` with the checkout on PYTHONPATH, or an installed `exe` without it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    if exe is None:
        env["PYTHONPATH"] = str(ROOT)
    cmd = (exe or [sys.executable, "-m", "merging"]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=180)


def yaml_file(tmp_path: Path, data, name="merge.yml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def assert_refused(result: Result | subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n.lower() in last.lower(), last


def ta(base, *models, **params):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m)} for m in models], "parameters": params}


def test_cli_merge_writes_a_complete_folder(run_cli, tiny_zoo, tmp_path):
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"], **{"lambda": 0.5}))
    r = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "merge_config.yml", "README.md"} <= files
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# Merged with FedMerge: `task_arithmetic`" in card and card.endswith(".\n") and not card.endswith("\n\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    # the written YAML reproduces the merge
    again = run_cli("merge", tmp_path / "out" / "merge_config.yml", tmp_path / "again", "--no-progress")
    assert again.returncode == 0, again.stderr
    a, b = load_sd(tmp_path / "out"), load_sd(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_refuses_to_overwrite_without_flag(run_cli, tiny_zoo, tmp_path):
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "not empty", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    r = run_cli("merge", cfg, tmp_path / "out", "--no-progress", "--overwrite")
    assert r.returncode == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_cli_overwrite_through_dotdot_replaces_the_folder(run_cli, tiny_zoo, tmp_path):
    """`out/victim/../victim`: moving `victim` aside must not pull the ground from under `victim/..`
    (the old folder was left hidden and the merge lost). An output folder that is, or holds, an input
    (a model, the YAML) is refused: --overwrite would delete it."""
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"]))
    victim = tmp_path / "out" / "victim"
    victim.mkdir(parents=True)
    (victim / "old.txt").write_text("old")
    r = run_cli("merge", cfg, f"{victim}/../victim", "--no-progress", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in victim.parent.iterdir()] == ["victim"]
    assert (victim / "model.safetensors").exists() and not (victim / "old.txt").exists()
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_zoo["ft1"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"], model), "self.yml")
    before = sorted(p.name for p in model.iterdir())
    for out, held in ((f"{model}/../model", "models[1]"), (str(tmp_path), "the config")):
        r = run_cli("merge", cfg, out, "--no-progress", "--overwrite")
        assert r.returncode == 2 and f"output folder {out}: holds {held}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in model.iterdir()) == before and (tmp_path / "self.yml").exists()  # was: replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_overwrite_spares_both_folders_of_a_base_model_with_an_adapter(run_cli, tiny_zoo, tmp_path):
    """base_model: model+adapter (mergekit's syntax, merged since it is supported there): an output
    folder that is the adapter's or the model's is refused like any input's (the adapter was deleted)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import shutil

    base = shutil.copytree(tiny_zoo["base"], tmp_path / "base")
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(adapter)
    cfg = yaml_file(tmp_path, {"merge_method": "task_arithmetic", "base_model": f"{base}+{adapter}",
                               "models": [{"model": str(tiny_zoo["ft0"])}]})
    for out in (adapter, base):
        before = sorted(p.name for p in out.iterdir())
        r = run_cli("merge", cfg, out, "--no-progress", "--overwrite")
        assert r.returncode == 2 and f"output folder {out}: holds base_model ({out})" in r.stderr, r.stderr
        assert sorted(p.name for p in out.iterdir()) == before
    r = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    assert r.returncode == 0, r.stderr


def test_cli_reads_mergekits_model_at_revision(run_cli, tiny_zoo, tmp_path):
    """`model@revision` (mergekit's syntax): a local folder is that folder (it has one version; it was
    "no such file or folder"), a Hub id is fetched at that revision (offline: one line); --overwrite of
    the folder of a `folder@revision` input is refused like any input's."""
    import shutil

    base = shutil.copytree(tiny_zoo["base"], tmp_path / "base")
    plain = yaml_file(tmp_path, ta(base, tiny_zoo["ft0"]), "plain.yml")
    at = yaml_file(tmp_path, ta(f"{base}@main", f"{tiny_zoo['ft0']}@v1.0"), "at.yml")
    for cfg, out in ((plain, "plain"), (at, "at")):
        r = run_cli("merge", cfg, tmp_path / out, "--no-progress")
        assert r.returncode == 0, r.stderr
    a, b = load_sd(tmp_path / "plain"), load_sd(tmp_path / "at")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    before = sorted(p.name for p in base.iterdir())
    r = run_cli("merge", at, base, "--no-progress", "--overwrite")
    assert r.returncode == 2 and f"holds base_model ({base})" in r.stderr, r.stderr
    assert sorted(p.name for p in base.iterdir()) == before
    hub = yaml_file(tmp_path, ta(base, "someorg/somemodel@v2"), "hub.yml")
    r = run_cli("merge", hub, tmp_path / "hub", "--no-progress", "--offline")
    assert r.returncode == 2 and r.stderr.strip() == "error: someorg/somemodel@v2: no such file or folder", r.stderr


def test_cli_overwrite_of_a_linked_output_replaces_the_link_only(run_cli, tiny_zoo, tmp_path):
    """An output that is a symlink to a folder: --overwrite puts the merge in its place and removes the
    link (it was left as a hidden `.out.old-…` link); the folder it pointed to is not touched."""
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"]))
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "theirs.txt").write_text("theirs")
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    r = run_cli("merge", cfg, tmp_path / "out", "--no-progress", "--overwrite")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert not out.is_symlink() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "merge.yml", "out"]  # no hidden leftovers


def test_a_folder_filled_during_a_merge_is_left_as_it_is(tmp_path):
    """Two merges started at once into the same new folder both passed the check and the second replaced
    the first. Now, without overwrite, the finished folder is moved in by one rename that fails on a
    filled folder: the first to finish keeps it, the other stops with one line and leaves nothing."""
    from merging.errors import MergeError
    from merging.writer import StreamingModelWriter

    out = tmp_path / "out"
    spec = [("w", (2, 2), torch.float32)]
    with pytest.raises(MergeError, match="something was written there while merging"):
        with StreamingModelWriter(out, spec) as w:
            w.write("w", torch.ones(2, 2))
            out.mkdir()  # the other merge, finishing first
            (out / "model.safetensors").write_bytes(b"first")
            w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert (out / "model.safetensors").read_bytes() == b"first"
    with StreamingModelWriter(tmp_path / "empty", spec) as w:  # an empty folder may still be filled
        w.write("w", torch.ones(2, 2))
        (tmp_path / "empty").mkdir()
        w.finish()
    assert load_sd(tmp_path / "empty")["w"].sum() == 4


def test_cli_root_output_and_a_device_as_config_are_one_line(run_cli, tiny_zoo, tmp_path):
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"]))
    r = run_cli("merge", cfg, "/", "--no-progress", "--overwrite")
    assert r.returncode == 2 and "output folder /: the file system's root" in r.stderr, r.stderr  # was: internal error
    r = run_cli("merge", "/dev/zero", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 2 and "/dev/zero: not a YAML file" in r.stderr, r.stderr  # was: read forever


@pytest.mark.parametrize("where,needles", [
    ("file/sub", ["output folder", "is a file, not a folder"]),
    ("file", ["output folder", "exists and is not a folder"]),
    ("x" * 256, ["output folder", "longer than 255 bytes"]),
    ("/proc/fedmerge-out", ["output folder", "cannot write there"]),
])
def test_cli_unusable_output_folder_is_refused_before_any_work(run_cli, tiny_zoo, tmp_path, where, needles):
    (tmp_path / "file").write_text("a file")
    # a model that does not exist: the output folder is checked first, so that is not what is reported
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tmp_path / "missing"))
    r = run_cli("merge", cfg, tmp_path / where, "--no-progress")
    assert_refused(r, *needles)
    assert "errno" not in r.stderr.lower() and "Error" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "merge.yml"]


def test_cli_any_legal_output_name_works(run_cli, tiny_zoo, tmp_path):
    """The temporary folder's name must fit where the output's name fits (255 bytes)."""
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"]))
    r = run_cli("merge", cfg, tmp_path / ("é" * 127), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / ("é" * 127) / "model.safetensors").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_cli_output_folder_follows_the_umask(run_cli, tiny_zoo, tmp_path, umask):
    """The folder is renamed into place from a temporary one: it must get the mode any new folder
    gets (not tempfile's 0700), and so must its files."""
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"]))
    old = os.umask(umask)
    try:
        r = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o666 & ~umask}


def test_cli_similarity_prints_matrix_and_writes_html(run_cli, tiny_zoo, tmp_path):
    r = run_cli("similarity", "--base", tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"], tiny_zoo["ft0"],
                "--html", tmp_path / "sim.html", "--json", tmp_path / "sim.json", "--no-progress", "--per-layer")
    assert r.returncode == 0, r.stderr
    assert "cosine similarity" in r.stdout and "sign conflicts" in r.stdout and "steps 100" in r.stdout
    data = json.loads((tmp_path / "sim.json").read_text())
    cos = data["cosine"]
    assert abs(cos[0][2] - 1) < 1e-9 and abs(cos[0][1]) < 0.5  # ft0 twice: identical; random perturbations: ~0
    assert "plotly" in (tmp_path / "sim.html").read_text()[:100000].lower()


def test_cli_similarity_checks_its_output_files_first(run_cli, tiny_zoo, tmp_path):
    """A folder given for --json, or a file in the way of --html, is refused before any computing;
    --json makes missing folders as --html does."""
    (tmp_path / "file").write_text("x")
    models = ["--base", tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"], "--no-progress"]
    for option, target, needle in [("--json", tmp_path, "is a folder"),
                                   ("--html", tmp_path / "file" / "x.html", "is a file, not a folder"),
                                   ("--json", tmp_path / "file" / "x.json", "is a file, not a folder")]:
        r = run_cli("similarity", *models, option, target)
        assert_refused(r, option, needle)
        assert r.stdout == "", r.stdout  # nothing computed
    r = run_cli("similarity", *models, "--json", "/proc/fedmerge.json")  # permissions pass /proc for root
    assert_refused(r, "--json /proc/fedmerge.json", "cannot write there")
    assert r.stdout == "", r.stdout  # was: refused only after computing
    r = run_cli("similarity", *models, "--json", tmp_path / "new" / "dir" / "sim.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "new" / "dir" / "sim.json").read_text())["names"] == ["ft0", "ft1"]


def test_cli_similarity_replaces_its_report_files_whole(run_cli, tiny_zoo, tmp_path):
    """--json/--html are written beside the target and renamed onto it (merging.targets.replaced, as the
    studies' reports): a report that is a symlink is replaced, the file it pointed to untouched, and
    no hidden file is left behind."""
    kept = tmp_path / "elsewhere.json"
    kept.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sim.json").symlink_to(kept)
    r = run_cli("similarity", "--base", tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"], "--no-progress",
                "--json", tmp_path / "out" / "sim.json", "--html", tmp_path / "out" / "sim.html")
    assert r.returncode == 0, r.stderr
    assert kept.read_text() == "keep me"
    assert not (tmp_path / "out" / "sim.json").is_symlink()
    assert json.loads((tmp_path / "out" / "sim.json").read_text())["names"] == ["ft0", "ft1"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sim.html", "sim.json"]


def test_cli_similarity_with_a_zero_task_vector_writes_valid_json(run_cli, tiny_zoo, tmp_path):
    r = run_cli("similarity", "--base", tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["base"], "--no-progress",
                "--json", tmp_path / "sim.json")
    assert r.returncode == 0, r.stderr
    assert "base: zero task vector" in r.stderr and "nan" not in r.stdout
    text = (tmp_path / "sim.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["cosine"][0][1] is None


def test_cli_similarity_tells_apart_models_whose_folders_share_a_name(run_cli, tiny_zoo, tmp_path):
    """Two fine-tunes in folders of one name (runs/a/final, runs/b/final) were both "final" in every row,
    pair and the JSON; each now gets as many parent folders as it takes (the same path twice: one name)."""
    import shutil

    a = shutil.copytree(tiny_zoo["ft0"], tmp_path / "runs" / "a" / "final")
    b = shutil.copytree(tiny_zoo["ft1"], tmp_path / "runs" / "b" / "final")
    r = run_cli("similarity", "--base", tiny_zoo["base"], a, b, tiny_zoo["ft2"], a, "--no-progress", "--per-layer",
                "--json", tmp_path / "sim.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "sim.json").read_text())["names"] == ["a/final", "b/final", "ft2", "a/final"]
    assert "a/final~b/final" in r.stdout and "final~final" not in r.stdout


def test_cli_methods_lists_the_registry(run_cli):
    r = run_cli("methods", "--markdown")
    assert r.returncode == 0
    for name in ("task_arithmetic", "fednova", "fedgma", "median", "cclip", "ties", "dare_ties", "slerp"):
        assert f"`{name}`" in r.stdout


# ----------------------------------------------------------------- bad input: one line, non-zero, nothing written

@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tiny_zoo):
    """Checkpoints that must be refused, each broken in one way."""
    from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("odd")
    torch.manual_seed(1)
    out = {}
    out["wide"] = save_model(GPT2LMHeadModel(tiny_config(n_embd=32)), root / "wide")
    out["vocab"] = save_model(GPT2LMHeadModel(tiny_config(vocab=48)), root / "vocab")
    out["deep"] = save_model(GPT2LMHeadModel(tiny_config(n_layer=3)), root / "deep")
    out["llama"] = save_model(LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           num_key_value_heads=2)), root / "llama")
    base = GPT2LMHeadModel.from_pretrained(tiny_zoo["base"])
    nan = perturbed(base, 5)
    with torch.no_grad():
        nan.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    out["nan"] = save_model(nan, root / "nan")
    # a .bin whose pickle runs code when loaded without weights_only
    evil = root / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((tiny_zoo["base"] / "config.json").read_text())
    marker = root / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, evil / "pytorch_model.bin")
    out["evil"], out["marker"] = evil, marker
    remote = root / "remote"
    save_model(perturbed(base, 6), remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    out["remote"] = remote
    return out


@pytest.mark.parametrize("which,needles", [
    ("wide", ["shape mismatch", "transformer"]),
    ("vocab", ["vocabulary size 48", "40"]),
    ("deep", ["unknown tensors", "transformer.h.2"]),
    ("llama", ["architecture llama", "gpt2"]),
    ("nan", ["non-finite", "transformer.h.1.mlp.c_fc.weight"]),
    ("remote", ["trust_remote_code"]),
])
def test_cli_refuses_incompatible_models(run_cli, tiny_zoo, odd_models, tmp_path, which, needles):
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"], odd_models[which]))
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), *needles)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_pickle_payload_is_refused_and_never_runs(run_cli, tiny_zoo, odd_models, tmp_path):
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], odd_models["evil"]))
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "refused", "weights_only")
    assert not odd_models["marker"].exists()


@pytest.mark.parametrize("text,needles", [
    ("merge_method: [unclosed", ["malformed yaml", "line"]),
    ("- just\n- a list\n", ["expected a mapping"]),
    ({"merge_method": "soup", "base_model": "x", "models": [{"model": "y"}]}, ["merge_method", "unknown merge method 'soup'"]),
    ({"merge_method": "ties", "models": [{"model": "y"}]}, ["base_model", "needs a base model"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "parameters": {"density": "half"}},
     ["parameters.density"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y", "parameters": {"rho": 1}}]},
     ["models[0].parameters.rho", "no parameter"]),
    ({"merge_method": "ties", "base_model": "x"}, ["models", "required"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "dtype": "float8"}, ["dtype", "float8"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "slices": []}, ["slices"]),
])
def test_cli_malformed_config_names_the_field(run_cli, tmp_path, text, needles):
    assert_refused(run_cli("merge", yaml_file(tmp_path, text), tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needles", [
    (b"\xffmerge_method: ties\n", ["not a yaml text file", "utf-8"]),
    ("merge_method: ties\nmerge_method: linear\nbase_model: x\nmodels: [{model: y}]\n",
     ["merge_method", "given twice"]),
    ("merge_method: ties\nbase_model: x\nmodels: [{model: y}]\nparameters: {lambda: 1" + "0" * 400 + "}\n",
     ["parameters.lambda", "outside"]),
    ({"merge_method": "ties", "base_model": "x", "modules": {"a": {}}}, ["modules: not supported"]),
    ({"merge_method": "ties", "base_model": "x", "models": "y"}, ["models: expected a list"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": 5}]}, ["models[0].model: expected a string"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "tokenizer": "z"},
     ["tokenizer: expected a mapping"]),
    ({"merge_method": "fednova", "base_model": "x", "models": [{"model": "y"}], "parameters": {"fednova_mode": "foo"}},
     ["parameters.fednova_mode", "'foo' is not one of steps, lr_steps"]),
    ({"merge_method": "median", "base_model": "x", "models": [{"model": "y"}], "parameters": {"median_kind": "upper"}},
     ["parameters.median_kind", "not one of"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "parameters": {"normalize": 2}},
     ["parameters.normalize", "expected true or false"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "parameters": {"density": []}},
     ["parameters.density", "empty list"]),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "chat_template": "{% if %}"},
     ["chat_template", "not a valid jinja template"]),
], ids=lambda v: v[:40] if isinstance(v, (str, bytes)) else None)
def test_cli_config_problems_in_plain_words(run_cli, tmp_path, text, needles):
    """What pydantic, PyYAML or Python would call a UnicodeDecodeError, an OverflowError or "Input should
    be a valid dictionary": one line naming the field, in words; nothing silently ignored."""
    path = tmp_path / "merge.yml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        yaml_file(tmp_path, text)
    r = run_cli("merge", path, tmp_path / "out")
    assert_refused(r, *needles)
    assert "Error" not in r.stderr and "Input should" not in r.stderr and "models.0" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unusable_model_paths_in_plain_words(run_cli, tiny_zoo, tmp_path):
    for ref, needles in [(f"{tiny_zoo['ft0']}\0evil", ["not a valid path", "nul"]),
                         (str(tmp_path / ("x" * 300)), ["file name too long"])]:
        r = run_cli("merge", yaml_file(tmp_path, ta(tiny_zoo["base"], ref)), tmp_path / "out", "--no-progress")
        assert_refused(r, *needles)
        assert "Error" not in r.stderr and "errno" not in r.stderr.lower(), r.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_zoo["ft0"] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    r = run_cli("merge", yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"], corrupt)), tmp_path / "out",
                "--no-progress")
    assert_refused(r, f"{corrupt}: model.safetensors: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_merges_that_would_be_silently_wrong(run_cli, tiny_zoo, tmp_path):
    """Each of these used to write a model: all zeros, θa − θb, one without config.json, the base merged
    with itself."""
    def refused(cfg, *needles):
        assert_refused(run_cli("merge", yaml_file(tmp_path, cfg), tmp_path / "out", "--no-progress"), *needles)
        assert not (tmp_path / "out").exists()

    for w in ([0, 0], [1, -1]):
        refused({"merge_method": "linear", "models": [{"model": str(tiny_zoo["ft0"]), "parameters": {"weight": w[0]}},
                                                      {"model": str(tiny_zoo["ft1"]), "parameters": {"weight": w[1]}}]},
                "linear: the weights sum to zero")
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    (noconfig / "model.safetensors").write_bytes((tiny_zoo["base"] / "model.safetensors").read_bytes())
    refused(ta(noconfig, tiny_zoo["ft0"]), f"base model {noconfig}: no config.json")
    refused(ta(tiny_zoo["base"], f"{tiny_zoo['base']}+"), "nothing after '+'")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_zoo):
    """The tiny base and a fine-tune with one tokenizer, a fine-tune whose tokenizer swaps two ids, and
    one whose tokenizer.json is the base's written differently (indented, keys reordered)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    root = tmp_path_factory.mktemp("tok")
    vocab = {f"w{i}": i for i in range(39)}  # transformers adds <|endoftext|> for a GPT-2 config: 40 rows
    swapped = {**vocab, "w3": 4, "w4": 3}
    out = {}
    for name, src, v in [("base", "base", vocab), ("same", "ft0", vocab), ("swapped", "ft1", swapped),
                         ("reformatted", "ft2", vocab)]:
        folder = root / name
        folder.mkdir()
        for f in tiny_zoo[src].iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        Tokenizer(WordLevel(v, unk_token="w0")).save(str(folder / "tokenizer.json"))
        if name == "reformatted":
            data = json.loads((folder / "tokenizer.json").read_text())
            (folder / "tokenizer.json").write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
        out[name] = folder
    return out


def test_cli_refuses_a_fine_tune_with_another_tokenizer(run_cli, tokenized, tmp_path):
    """Same vocabulary size, other ids: its embedding rows belong to other tokens. Refused unless a
    tokenizer is chosen; a tokenizer equal but written differently still merges."""
    cfg = ta(tokenized["base"], tokenized["same"], tokenized["swapped"])
    assert_refused(run_cli("merge", yaml_file(tmp_path, cfg), tmp_path / "out", "--no-progress"),
                   "swapped: its tokenizer differs from the base's", "tokenizer_source")
    assert not (tmp_path / "out").exists()
    r = run_cli("merge", yaml_file(tmp_path, {**cfg, "tokenizer_source": "base"}), tmp_path / "out", "--no-progress")
    assert r.returncode == 0, r.stderr
    cfg = ta(tokenized["base"], tokenized["same"], tokenized["reformatted"])
    for extra in ({}, {"tokenizer_source": "union"}):
        r = run_cli("merge", yaml_file(tmp_path, {**cfg, **extra}), tmp_path / "out2", "--no-progress", "--overwrite")
        assert r.returncode == 0, r.stderr


def test_cli_out_of_range_hyperparameters(run_cli, tiny_zoo, tmp_path):
    for params, needle in [({"rho": 2.0}, "rho"), ({"rho": -1}, "rho")]:
        cfg = yaml_file(tmp_path, {**ta(tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"]), "merge_method": "fedgma",
                                   "parameters": params})
        assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), needle, "outside")
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tiny_zoo["ft0"], **{"lambda": ".nan"}))
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "lambda")
    assert not (tmp_path / "out").exists()


def test_cli_missing_path_and_offline_hub_id(run_cli, tiny_zoo, tmp_path):
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], tmp_path / "nope"))
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "no such file or folder")
    cfg = yaml_file(tmp_path, ta(tiny_zoo["base"], "some-org/some-model"))
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "some-org/some-model",
                   "cannot reach the hugging face hub")


def test_cli_slerp_needs_two_models_at_most(run_cli, tiny_zoo, tmp_path):
    cfg = yaml_file(tmp_path, {**ta(tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"], tiny_zoo["ft2"]),
                               "merge_method": "slerp"})
    assert_refused(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "slerp", "at most 2")


def test_cli_device_auto_equals_cpu_and_cuda_without_gpu_is_refused(run_cli, tiny_zoo, tmp_path):
    """--device auto (here: the CPU) writes what the default writes; cuda on a machine without one
    is one line naming the problem, before anything is read or written."""
    cfg = yaml_file(tmp_path, {**ta(tiny_zoo["base"], tiny_zoo["ft0"], tiny_zoo["ft1"], **{"lambda": 0.5}),
                               "merge_method": "ties", "parameters": {"lambda": 0.5, "density": 0.5}})
    assert run_cli("merge", cfg, tmp_path / "cpu", "--no-progress").returncode == 0
    r = run_cli("merge", cfg, tmp_path / "auto", "--no-progress", "--device", "auto")
    assert r.returncode == 0, r.stderr
    a, b = load_sd(tmp_path / "cpu"), load_sd(tmp_path / "auto")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = run_cli("merge", cfg, tmp_path / "gpu", "--no-progress", "--device", "tpu")
    assert_refused(bad, "unknown device")
    if not torch.cuda.is_available():
        r = run_cli("merge", cfg, tmp_path / "gpu", "--no-progress", "--device", "cuda")
        assert_refused(r, "cuda", "no cuda gpu")
        assert not (tmp_path / "gpu").exists()



def test_cli_usage_errors_and_sizes(run_cli):
    from merging.cli import build_parser

    r = run_cli()
    assert r.returncode == 2 and "usage: fedmerge" in r.stderr
    r = run_cli("merge", "x.yml", "out", "--shard-size", "lots")
    assert r.returncode == 2 and "not a size: 'lots'" in r.stderr
    for bad in ("inf", "1e400", "nan", "0", "-5", "0.1"):  # each would write nonsense shards or overflow
        r = run_cli("merge", "x.yml", "out", "--shard-size", bad)
        assert r.returncode == 2 and f"not a size: '{bad}'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    args = build_parser().parse_args(["merge", "x.yml", "out", "--shard-size", "500MB"])
    assert args.shard_size == 500_000_000 and args.device is None and not args.overwrite  # None: $FEDMERGE_DEVICE, else cpu


# ----------------------------------------------------------------- what only a process shows

def test_process_refusal_is_one_line_and_a_non_zero_exit(tmp_path):
    """`python -m merging` from another folder: exit status 2, stderr one `error:` line, no traceback."""
    r = run_process("merge", yaml_file(tmp_path, "merge_method: [unclosed"), tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "malformed yaml" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a virtual environment, an editable install and three fresh interpreters
def test_fedmerge_console_script_from_any_folder(tmp_path):
    """pyproject.toml's `fedmerge` script, installed with `pip install -e .` into a fresh virtual
    environment: it runs `merging.cli:main` outside the checkout, as `python -m merging` does."""
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {"fedmerge": "merging.cli:main"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--no-deps", "--no-build-isolation", "-e", str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = run_process("methods", cwd=elsewhere, exe=[str(venv / "bin" / "fedmerge")])
    assert listed.returncode == 0 and "task_arithmetic" in listed.stdout and "fednova" in listed.stdout, listed.stderr
    as_module = subprocess.run([str(venv / "bin" / "python"), "-m", "merging", "methods"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=180)
    assert as_module.returncode == 0 and as_module.stdout == listed.stdout
    bad = run_process("merge", "missing.yml", "out", cwd=elsewhere, exe=[str(venv / "bin" / "fedmerge")])
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr


def test_a_tied_and_an_untied_head_are_named_as_such(run_cli, tiny_zoo, tmp_path):
    """A fine-tune that unties the output head of a tied base (or the other way round) was refused as
    'unknown tensors lm_head.weight': now the message says what differs."""
    from transformers import GPT2LMHeadModel

    cfg = tiny_config()
    cfg.tie_word_embeddings = False
    base = GPT2LMHeadModel.from_pretrained(tiny_zoo["base"])
    untied = GPT2LMHeadModel(cfg)
    state = base.state_dict()
    state["lm_head.weight"] = state["transformer.wte.weight"].clone() + 0.01
    untied.load_state_dict(state)
    save_model(untied, tmp_path / "untied")
    for b, m, untied_one in ((tiny_zoo["base"], tmp_path / "untied", "untied"), (tmp_path / "untied", tiny_zoo["ft0"], "the base")):
        r = run_cli("merge", yaml_file(tmp_path, ta(b, m)), tmp_path / "out", "--no-progress")
        assert_refused(r, f"{untied_one} has its own output head (lm_head.weight)", "tie_word_embeddings")
    assert not (tmp_path / "out").exists()


def test_both_command_lines_print_on_an_ascii_terminal(monkeypatch):
    """Tables, help and messages hold λ, ρ, τ, ×…: on a terminal whose encoding lacks them they are escaped,
    not an 'ascii codec can't encode' error (evaluation's --help: a traceback) at the end of the work."""
    import io

    from evaluation.__main__ import main as evaluation_main

    def ascii_stdout() -> io.TextIOWrapper:
        out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
        monkeypatch.setattr(sys, "stdout", out)
        return out

    out = ascii_stdout()
    assert main(["methods"]) == 0
    out.flush()
    assert b"\\u03bb" in out.buffer.getvalue() and b"task_arithmetic" in out.buffer.getvalue()
    out = ascii_stdout()
    with pytest.raises(SystemExit) as done:  # argparse's --help
        evaluation_main(["compare", "--help"])
    out.flush()
    assert done.value.code == 0 and b"grids (\\u03bb 0.1" in out.buffer.getvalue()
