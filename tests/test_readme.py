"""The README stays true: every YAML example merges on the shipped zoo; the method table is current."""
from __future__ import annotations

import re

import pytest
import yaml

from merging import merge_to_dir, parse_config, plan_from_config
from merging.docs import methods_markdown
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)


def test_readme_has_yaml_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[yaml.safe_load(b)["merge_method"] for b in BLOCKS])
def test_readme_yaml_merges_on_the_zoo(block, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = parse_config(yaml.safe_load(block), "README example")
    out = merge_to_dir(plan_from_config(cfg, allow_hub=False), tmp_path / "out")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_readme_method_table_matches_the_registry():
    assert methods_markdown() in README
