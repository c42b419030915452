"""Every shipped config parses and instantiates (hub encoders replaced by the tiny local one), the small ones run a
``fast_dev_run``, the fragments combine, every key is commented, and the paper configs hold the authors' settings."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from xmc_dst.cli import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FRAGMENTS = sorted((ROOT / "configs" / "fragments").glob("*.yaml"))
PAPER = ["wiki10-31k", "amazon-670k", "wiki-500k"]
SMALL = ["debtags", "bibtex", "delicious"]
KEY = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:")


def _config(name: str) -> str:
    return str(ROOT / "configs" / f"{name}.yaml")


def _fragment(name: str) -> str:
    return str(ROOT / "configs" / "fragments" / f"{name}.yaml")


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory) -> Path:
    """A tiny raw-text dataset standing in for the paper's benchmarks (labels are numeric strings, like theirs)."""
    directory = tmp_path_factory.mktemp("tiny_raw")
    words = ["python", "game", "network", "data", "file", "library"]
    for split, count in (("train", 24), ("test", 8)):
        texts = [f"the {words[i % 6]} {words[(i * 5) % 6]} tool" for i in range(count)]
        labels = [f"{100 + i % 6} {200 + (i * 5) % 6}" for i in range(count)]
        (directory / f"{split}_raw_texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        (directory / f"{split}_labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    groups = np.empty(3, dtype=object)  # the authors' label_group format: label names per cluster
    groups[0], groups[1], groups[2] = np.array(["100", "101", "200"]), np.array(["102", "103", "201"]), \
        np.array(["104", "105", "202", "203", "204", "205"])
    np.save(directory / "label_group0.npy", groups, allow_pickle=True)
    return directory


def _local(tmp: Path, name: str) -> list[str]:
    """Overrides keeping a run inside ``tmp`` (logs, caches) and on the CPU."""
    args = ["--trainer.logger.init_args.save_dir", str(tmp / "logs"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1"]
    if name not in ("bibtex", "delicious"):
        args += ["--data.init_args.cache_dir", str(tmp / "cache")]
    return args


def _paper_overrides(tiny_raw: Path, encoder: Path, tmp: Path, name: str) -> list[str]:
    args = ["--data.init_args.data_dir", str(tiny_raw), "--data.init_args.tokenizer", str(encoder),
            "--data.init_args.num_workers", "0", "--data.init_args.num_proc", "1",
            "--trainer.precision", "32-true", *_local(tmp, name)]
    if name != "wiki10-31k":
        # fan_in 128 of the tiny 32-wide encoder (no intermediate layer here) is an error: the tiny width's fan-in
        args += ["--model.aux_cluster_file", str(tiny_raw / "label_group0.npy"), "--model.head.fan_in", "16"]
    return args


@pytest.mark.parametrize("path", CONFIGS + FRAGMENTS, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("#") or not KEY.match(line):
            continue
        assert "  # " in line, f"{path.name}:{number}: key without a comment: {line.strip()}"


def test_the_configs_and_fragments_are_all_here():
    assert {p.stem for p in CONFIGS} == {"debtags", "bibtex", "delicious", *PAPER}
    assert {p.stem for p in FRAGMENTS} >= {"bf16-mixed", "16-mixed", "ddp", "dense-head", "fast-dev-run",
                                          "overfit-batches"}


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_instantiate_with_a_local_encoder(name, tiny_raw, tiny_encoder_dir, tmp_path):
    run = cli(["--config", _config(name), *_paper_overrides(tiny_raw, tiny_encoder_dir, tmp_path, name)], run=False)
    model, data = run.model, run.datamodule
    assert model.hparams.num_labels == data.num_labels == 12
    assert model.encoder.location == str(tiny_encoder_dir)
    assert model.hparams.head["class_path"] == "xmc_dst.heads.FixedFanInHead"
    assert model.head.fan_in == model.hparams.head["init_args"]["fan_in"] == (64 if name == "wiki10-31k" else 16)
    kinds = {type(cb).__name__ for cb in run.trainer.callbacks}
    assert "DynamicSparseTraining" in kinds and ("AuxiliaryObjective" in kinds) == (name != "wiki10-31k")
    if name == "wiki10-31k":
        assert model.intermediate[0].out_features == 4096 and model.aux_head is None
    else:
        assert model.intermediate is None
        # the clusters are label names, resolved against the data's vocabulary in setup()
        assert model.aux_head.out_features == 3 and model._clusters_pending
        model._trainer = SimpleNamespace(datamodule=data)  # what setup() reads of the trainer
        model.setup("fit")
        names = data.label_names
        expected = [0 if n in ("100", "101", "200") else 1 if n in ("102", "103", "201") else 2 for n in names]
        assert model.label_clusters.tolist() == expected


# The authors' settings (their code where paper and code differ), per config.
AUTHORS = {
    "wiki10-31k": dict(pooling="mean", max_length=128, batch_size=32, dropout=0.6, intermediate_dim=4096, fan_in=64,
                       epochs=100, lrs=(1e-5, 1e-2, 5e-4, 1e-2), a=0.55, b=1.5, interval=300, threshold=0.01,
                       aux=None),
    "amazon-670k": dict(pooling="cls", max_length=128, batch_size=64, dropout=0.6, intermediate_dim=0, fan_in=128,
                        epochs=110, lrs=(1e-5, 2e-4, 5e-4, 1e-2), a=0.6, b=2.6, interval=800, threshold=0.01,
                        aux=(0.4, 15)),
    "wiki-500k": dict(pooling="mean", max_length=128, batch_size=128, dropout=0.5, intermediate_dim=0, fan_in=128,
                      epochs=50, lrs=(5e-5, 2e-4, 5e-4, 5e-2), a=0.5, b=0.4, interval=600, threshold=0.05,
                      aux=(0.4, 8)),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_hold_the_authors_settings(name):
    config = yaml.safe_load(Path(_config(name)).read_text(encoding="utf-8"))
    want = AUTHORS[name]
    model, data, trainer = config["model"], config["data"]["init_args"], config["trainer"]
    encoder = model["encoder"]["init_args"]
    assert data["tokenizer"] == "bert-base-uncased" and encoder["pooling"] == want["pooling"]
    assert data["max_length"] == want["max_length"] and data["batch_size"] == want["batch_size"]
    assert encoder["dropout"] == want["dropout"] and model["intermediate_dim"] == want["intermediate_dim"]
    assert model["intermediate_activation"] == "identity"
    head = model["head"]["init_args"]
    assert head["fan_in"] == want["fan_in"] and model["head"]["class_path"] == "xmc_dst.heads.FixedFanInHead"
    assert model["loss"] == "squared_hinge" and model["loss_reduction"] == "auto"
    assert model["encoder_optimizer"] == head["optimizer"] == "adamw"
    lrs = (model["encoder_lr"], model["intermediate_lr"], model["aux_lr"], head["lr"])
    assert lrs == pytest.approx(want["lrs"])
    assert model["encoder_weight_decay"] == 0.01 and head["weight_decay"] == 1e-4
    assert model["warmup_steps"] == 1000 and model["lr_schedule"] == "cosine"
    assert config["seed_everything"] == 42 and config["monitor"] == "val/P@3"
    assert trainer["max_epochs"] == want["epochs"] and trainer["precision"] == "16-mixed"
    assert (data["propensity_a"], data["propensity_b"]) == (want["a"], want["b"])
    assert bool(model["aux_cluster_file"]) == bool(want["aux"])
    callbacks = {c["class_path"]: c["init_args"] for c in trainer["callbacks"]}
    dst = callbacks["callbacks.DynamicSparseTraining"]
    assert (dst["interval"], dst["end"], dst["prune"], dst["regrow"]) == (want["interval"], 0.66, "threshold", "random")
    assert (dst["threshold"], dst["threshold_floor"]) == (want["threshold"], 1e-4)
    if want["aux"]:
        aux = callbacks["callbacks.AuxiliaryObjective"]
        assert (aux["alpha"], aux["cutoff_epoch"]) == want["aux"]
    else:
        assert "callbacks.AuxiliaryObjective" not in callbacks


def test_debtags_fast_dev_run_with_the_shipped_encoder(tmp_path, capsys):
    run = cli(["fit", "--config", _config("debtags"), "--config", _fragment("fast-dev-run"), *_local(tmp_path, "d")])
    model, data = run.model, run.datamodule
    assert type(data).__name__ == "Debtags" and model.hparams.num_labels == 595
    assert model.hparams.tokenizer == data.tokenizer_name and Path(data.tokenizer_name).is_dir()
    assert run.trainer.global_step == 1
    assert "test/P@1" in run.trainer.callback_metrics and "test/PSP@5" in run.trainer.callback_metrics
    assert "Test Debtags" in capsys.readouterr().out


def test_debtags_config_on_any_raw_text_directory(tiny_raw, tmp_path):
    """Another data folder in the raw-text layout: the label count comes from its files, the rest from the yaml."""
    run = cli(["--config", _config("debtags"), "--data", "datamodules.RawTextXMCDataModule",
               "--data.data_dir", str(tiny_raw), *_local(tmp_path, "raw")], run=False)
    data, model = run.datamodule, run.model
    assert type(data).__name__ == "RawTextXMCDataModule" and data.max_length == 32 and data.batch_size == 64
    assert model.hparams.num_labels == data.num_labels == 12 and model.head.out_features == 12
    assert model.hparams.tokenizer == data.tokenizer_name  # the shipped MiniLM, the DataModule's default


def test_bibtex_fast_dev_run_and_overfit_fragment(tmp_path):
    run = cli(["fit", "--config", _config("bibtex"), "--config", _fragment("fast-dev-run"),
               *_local(tmp_path, "bibtex")])
    assert run.model.hparams.num_features == 1836 and run.model.hparams.num_labels == 159
    assert run.model.encoder.num_features == 1836
    assert "test/P@1" in run.trainer.callback_metrics
    run = cli(["fit", "--config", _config("bibtex"), "--config", _fragment("overfit-batches"),
               *_local(tmp_path, "bibtex"), "--test_after_fit", "false", "--trainer.enable_progress_bar", "false"])
    rows = list(csv.DictReader((Path(run.trainer.log_dir) / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert run.trainer.global_step == 80 and len(losses) == 80
    assert losses[-1] < 0.2 * losses[0]  # it fits its 2 batches


def test_fragments_combine(tiny_raw, tiny_encoder_dir, tmp_path):
    base = ["--config", _config("wiki10-31k"), *_paper_overrides(tiny_raw, tiny_encoder_dir, tmp_path, "wiki10-31k")]
    dense = cli([*base, "--model.head.lr", "0.003", "--config", _fragment("dense-head"), "--trainer.precision",
                 "32-true"], run=False)
    assert isinstance(dense.model.head, torch.nn.Linear) and dense.model.head.out_features == 12
    assert dense.model.head.optimizer_settings.lr == 0.003  # the head's optimizer settings carry over
    assert not any(type(cb).__name__ == "DynamicSparseTraining" for cb in dense.trainer.callbacks)
    bf16 = cli([*base, "--config", _fragment("bf16-mixed")], run=False)
    assert bf16.trainer.precision == "bf16-mixed"
    ddp = cli([*base, "--config", _fragment("ddp"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
               "--trainer.precision", "32-true"], run=False)
    assert type(ddp.trainer.strategy).__name__ == "DDPStrategy" and ddp.trainer.num_devices == 2
    fp16 = yaml.safe_load(Path(_fragment("16-mixed")).read_text(encoding="utf-8"))
    assert fp16 == {"trainer": {"precision": "16-mixed"}}


@pytest.mark.gpu
def test_fp16_fragment_instantiates_on_gpu(tiny_raw, tiny_encoder_dir, tmp_path):
    base = ["--config", _config("wiki10-31k"), *_paper_overrides(tiny_raw, tiny_encoder_dir, tmp_path, "wiki10-31k")]
    run = cli([*base, "--config", _fragment("16-mixed"), "--trainer.accelerator", "gpu"], run=False)
    assert run.trainer.precision == "16-mixed"
