"""Every shipped config runs end to end on data in its dataset's published layout, every fragment combines with
every config, every key is commented, and the paper configs hold the authors' settings.

The dry runs: each ``configs/*.yaml`` is matched (:data:`DATASETS`) with the DataModule it must declare and a writer
of its dataset's published layout (:mod:`layouts`); the writer puts a tiny copy where a user puts the download
(``data/<Name>`` in the working directory, the path the config names), and ``fit`` (two epochs), ``test`` and
``predict`` run through the real CLI in-process with only what a CPU test must change (:func:`dry_run_args`). A new
config without an entry fails until its dataset's layout is added.
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_encoder
from layouts import LayoutWriter, Written, write_debtags, write_lf, write_raw_text, write_xc_sparse

from datamodules.text import TokenizedTextDataModule
from xmc_dst.cli import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FRAGMENTS = sorted((ROOT / "configs" / "fragments").glob("*.yaml"))
PAPER = ["wiki10-31k", "amazon-670k", "wiki-500k"]
KEY = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:")


@dataclass(frozen=True)
class Dataset:
    """The dataset a config is for: the DataModule it must declare, the folder the data lives in relative to the
    working directory (None: shipped, the dry run writes ``data/<config>`` and passes it as ``data_dir``) and the
    writer of its published layout."""

    datamodule: str
    folder: str | None
    write: LayoutWriter


DATASETS: dict[str, Dataset] = {
    "wiki10-31k": Dataset("Wiki10_31K", "data/Wiki10-31K", functools.partial(write_raw_text, clusters=False)),
    "amazon-670k": Dataset("Amazon670K", "data/Amazon-670K", functools.partial(write_raw_text, clusters=True)),
    "wiki-500k": Dataset("Wiki500K", "data/Wiki-500K", functools.partial(write_raw_text, clusters=True)),
    "lf-amazontitles-131k": Dataset("LFAmazonTitles131K", "data/LF-AmazonTitles-131K", write_lf),
    "raw-text": Dataset("Debtags", None, write_debtags),
    "bibtex": Dataset("Bibtex", None, write_xc_sparse),
    "delicious": Dataset("Delicious", None, write_xc_sparse),
}


def _config(name: str) -> str:
    return str(ROOT / "configs" / f"{name}.yaml")


def _fragment(name: str) -> str:
    return str(ROOT / "configs" / "fragments" / f"{name}.yaml")


def _yaml(path: Path | str) -> dict:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _dataset(path: Path) -> Dataset:
    if path.stem not in DATASETS:
        pytest.fail(f"configs/{path.name} has no entry in DATASETS (tests/test_configs.py): add its DataModule and "
                    "the writer of its dataset's published layout (tests/layouts.py)")
    return DATASETS[path.stem]


def _datamodule_class(path: Path) -> type:
    module, _, name = _yaml(path)["data"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def wide_encoder(tmp_path_factory) -> Path:
    """A tiny random BERT 160 wide, so that the configs' fan-ins (up to 128) fit the head's input as they are."""
    return build_tiny_encoder(tmp_path_factory.mktemp("wide_encoder"), hidden_size=160)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, Written]]:
    """A working directory holding every config's dataset where the config (or the dry run) looks for it."""
    root = tmp_path_factory.mktemp("workspace")
    written = {}
    for path in CONFIGS:
        if path.stem in DATASETS:
            dataset = DATASETS[path.stem]
            written[path.stem] = dataset.write(root / (dataset.folder or f"data/{path.stem}"))
    return root, written


@pytest.fixture
def in_workspace(workspace, monkeypatch) -> tuple[Path, dict[str, Written]]:
    """Run in the workspace (relative paths as a user has them), with the caches inside it."""
    root, _ = workspace
    monkeypatch.chdir(root)
    monkeypatch.setenv("XMC_DST_CACHE", str(root / "cache"))
    return workspace


def dry_run_args(path: Path, encoder: Path, *later: str) -> list[str]:
    """The config, then ``later`` (fragments), then only what a dry run on the CPU test tier must change."""
    config, dataset = _yaml(path), _dataset(path)
    data, encoder_args = config["data"]["init_args"], config["model"]["encoder"].get("init_args") or {}
    args = ["--config", str(path), *later,
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",  # the test tier has no GPU
            "--trainer.max_epochs", "2"]  # a few steps: one or two per epoch on the tiny folders
    if config["trainer"].get("precision", "32-true") != "32-true" and not later:
        args += ["--trainer.precision", "32-true"]  # half-precision matmuls crawl on a CPU (fragments: trained below)
    if dataset.folder is None:  # shipped by default: point it at the written copy
        args += ["--data.init_args.data_dir", f"data/{path.stem}"]
    if issubclass(_datamodule_class(path), TokenizedTextDataModule):  # the tiny encoder for the hub/shipped one
        args += ["--data.init_args.tokenizer", str(encoder)]
    if encoder_args.get("compile"):
        args += ["--model.encoder.init_args.compile", "false"]  # torch.compile costs 15 s+ per graph on a CPU
    if data.get("num_workers"):
        args += ["--data.init_args.num_workers", "0"]  # no loader processes on the test machine's shared cores
    if data.get("num_proc", 1) > 1:
        args += ["--data.init_args.num_proc", "1"]
    return args


@pytest.mark.parametrize("path", CONFIGS + FRAGMENTS, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("#") or not KEY.match(line):
            continue
        assert "  # " in line, f"{path.name}:{number}: key without a comment: {line.strip()}"


def test_every_dataset_entry_has_its_config():
    assert set(DATASETS) <= {p.stem for p in CONFIGS}, "an entry of DATASETS without its config"
    assert {p.stem for p in FRAGMENTS} >= {"bf16-mixed", "16-mixed", "ddp", "dense-head", "fast-dev-run",
                                          "overfit-batches"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_declares_its_datamodule(path):
    """The DataModule is the config's dataset, and the config's folder and run name are that dataset's."""
    config, dataset = _yaml(path), _dataset(path)
    assert config["data"]["class_path"] == f"datamodules.{dataset.datamodule}"
    cls = _datamodule_class(path)
    data_dir = config["data"]["init_args"].get("data_dir")
    if dataset.folder is None:
        assert data_dir is None  # the shipped copy
    else:
        assert data_dir == dataset.folder == str(cls.default_dir)
        assert config["trainer"]["logger"]["init_args"]["name"] == cls.default_name == path.stem
        cluster_file = config["model"].get("aux_cluster_file")
        assert cluster_file is None or Path(cluster_file).parent == Path(dataset.folder)


def _predictions(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_fit_test_and_predict_on_its_published_layout(path, wide_encoder, in_workspace):
    dataset = _dataset(path)
    _, written = in_workspace
    data_written = written[path.stem]
    args = dry_run_args(path, wide_encoder)
    run = cli(["fit", *args, "--trainer.enable_progress_bar", "false"])
    data, model = run.datamodule, run.model
    assert type(data).__name__ == dataset.datamodule
    assert data.label_names == data_written.label_names
    assert model.hparams.num_labels == model.head.out_features == len(data_written.label_names)
    if hasattr(data, "dropped_test_labels"):
        assert data.dropped_test_labels["unseen_labels"] == data_written.unseen_test_labels
    if data_written.clusters is not None:  # the authors' cluster file, resolved against this data's labels
        assert model.label_clusters.tolist() == [data_written.clusters[name] for name in data.label_names]
    label_docs = len(data_written.label_names) if getattr(data, "label_documents", False) else 0
    total = data_written.train_docs + label_docs
    assert data.num_train_docs == total - round(total * data.val_fraction)
    assert run.trainer.global_step == 2 * math.ceil(data.num_train_docs / data.batch_size)
    fitted = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith("test/")}
    assert {"test/P@1", "test/P@5", "test/PSP@5", "test/nDCG@3"} <= set(fitted)

    best = run.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file()
    tested = cli(["test", *args, "--ckpt_path", best, "--trainer.enable_progress_bar", "false"])
    assert {k: float(v) for k, v in tested.trainer.callback_metrics.items() if k.startswith("test/")} == \
        pytest.approx(fitted, abs=1e-4)  # the same checkpoint on the same test split

    predicted = cli(["predict", *args, "--ckpt_path", best, "--trainer.enable_progress_bar", "false"])
    records = _predictions(Path(predicted.trainer.log_dir))
    assert [r["index"] for r in records] == list(range(data_written.test_docs))
    k = model.hparams.predict_k
    for record in records:
        assert len(record["labels"]) == len(set(record["labels"])) == min(k, len(data_written.label_names))
        assert set(record["labels"]) <= set(data_written.label_names)
        assert record["scores"] == sorted(record["scores"], reverse=True)


def _parsed(run):
    """The parsed configuration of a run (of its subcommand's, for a run with one)."""
    return run.config[run.subcommand] if run.subcommand else run.config


def _dense(run) -> bool:
    kinds = {type(cb).__name__ for cb in run.trainer.callbacks}
    return isinstance(run.model.head, torch.nn.Linear) and not kinds & {"DynamicSparseTraining",
                                                                        "AuxiliaryObjective"}


# What each fragment must have changed in the run it joins; extra arguments after it (ddp: two CPU processes).
FRAGMENT_CHECKS = {
    "16-mixed": ([], lambda run: _parsed(run)["trainer"]["precision"] == "16-mixed"  # Lightning runs it as
                 and run.trainer.precision == ("16-mixed" if torch.cuda.is_available() else "bf16-mixed")),
    "bf16-mixed": ([], lambda run: run.trainer.precision == "bf16-mixed"),
    "ddp": (["--trainer.devices", "2"], lambda run: type(run.trainer.strategy).__name__ == "DDPStrategy"
            and run.trainer.num_devices == 2),
    "dense-head": ([], lambda run: _dense(run) and run.model.aux_head is None),
    "fast-dev-run": ([], lambda run: run.trainer.fast_dev_run is True),
    "overfit-batches": ([], lambda run: run.trainer.overfit_batches == 2),
}


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_fragment_combines_with_every_config(path, fragment, wide_encoder, in_workspace):
    if fragment.stem not in FRAGMENT_CHECKS:
        pytest.fail(f"configs/fragments/{fragment.name} has no entry in FRAGMENT_CHECKS: say what it changes")
    extra, check = FRAGMENT_CHECKS[fragment.stem]
    args = dry_run_args(path, wide_encoder, "--config", str(fragment))
    run = cli([*args, *extra], run=False)
    assert type(run.datamodule).__name__ == _dataset(path).datamodule
    assert check(run), f"{fragment.stem} did not take effect on {path.stem}"


@pytest.mark.parametrize("fragment", [f for f in FRAGMENTS if f.stem != "ddp"], ids=lambda p: p.stem)
def test_every_fragment_trains(fragment, in_workspace):
    """Each fragment (but ddp, whose two processes tests/test_ddp.py runs) through fit on the Bibtex layout."""
    path = ROOT / "configs" / "bibtex.yaml"
    args = dry_run_args(path, Path("unused"), "--config", str(fragment))
    if fragment.stem == "overfit-batches":
        args[args.index("--trainer.max_epochs") + 1] = "4"
    run = cli(["fit", *args, "--trainer.enable_progress_bar", "false"])
    assert FRAGMENT_CHECKS[fragment.stem][1](run)
    assert run.trainer.global_step > 0 and "test/P@1" in run.trainer.callback_metrics


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


def test_lf_config_holds_the_authors_settings():
    """configs/lf-amazontitles-131k.yaml against the authors' config/dataset/lfamazontitles131k.yaml."""
    config = _yaml(_config("lf-amazontitles-131k"))
    model, data, trainer = config["model"], config["data"]["init_args"], config["trainer"]
    encoder, head = model["encoder"]["init_args"], model["head"]["init_args"]
    assert data["tokenizer"] == "sentence-transformers/msmarco-distilbert-base-v4"
    assert (encoder["pooling"], encoder["dropout"], encoder["compile"]) == ("mean", 0.7, True)
    assert (data["max_length"], data["batch_size"], data["eval_batch_size"]) == (32, 512, 512)
    assert data["label_documents"] is True and data["use_content"] is False
    assert data["filter_file"] == "filter_labels_test.txt"
    assert (head["fan_in"], head["optimizer"], head["lr"], head["weight_decay"], head["momentum"]) == \
        (128, "sgd", 0.08, 1e-4, 0.9)
    assert model["intermediate_dim"] == 0 and model["loss"] == "bce" and model["loss_reduction"] == "auto"
    lrs = (model["encoder_lr"], model["intermediate_lr"], model["aux_lr"])
    assert lrs == pytest.approx((1e-5, 2e-4, 5e-4)) and model["encoder_weight_decay"] == 0.01
    assert model["warmup_steps"] == 5000 and model["lr_schedule"] == "cosine"
    assert (data["propensity_a"], data["propensity_b"]) == (0.6, 2.6)
    assert trainer["max_epochs"] == 100 and trainer["precision"] == "16-mixed"
    callbacks = {c["class_path"]: c["init_args"] for c in trainer["callbacks"]}
    dst = callbacks["callbacks.DynamicSparseTraining"]
    assert (dst["interval"], dst["end"], dst["prune"], dst["regrow"]) == (1000, 0.66, "fraction", "random")
    assert dst["drop_fraction"] == dst["drop_fraction_floor"] == 0.15  # constant, as the authors' rewire_fraction
    aux = callbacks["callbacks.AuxiliaryObjective"]
    assert (aux["alpha"], aux["cutoff_epoch"]) == (0.4, 12)
    assert model["aux_cluster_file"] == "data/LF-AmazonTitles-131K/label_group0.npy"


def _local(tmp: Path, name: str) -> list[str]:
    """Overrides keeping a run inside ``tmp`` (logs, caches) and on the CPU."""
    args = ["--trainer.logger.init_args.save_dir", str(tmp / "logs"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1"]
    if name not in ("bibtex", "delicious"):
        args += ["--data.init_args.cache_dir", str(tmp / "cache")]
    return args


def test_raw_text_fast_dev_run_with_the_shipped_encoder(tmp_path, capsys):
    run = cli(["fit", "--config", _config("raw-text"), "--config", _fragment("fast-dev-run"), *_local(tmp_path, "d")])
    model, data = run.model, run.datamodule
    assert type(data).__name__ == "Debtags" and model.hparams.num_labels == 595
    assert model.hparams.tokenizer == data.tokenizer_name and Path(data.tokenizer_name).is_dir()
    assert run.trainer.global_step == 1
    assert "test/P@1" in run.trainer.callback_metrics and "test/PSP@5" in run.trainer.callback_metrics
    assert "Test Debtags" in capsys.readouterr().out


def test_raw_text_config_on_any_raw_text_directory(workspace, tmp_path):
    """Another data folder in the raw-text layout: the label count comes from its files, the rest from the yaml."""
    _, written = workspace
    run = cli(["--config", _config("raw-text"), "--data", "datamodules.RawTextXMCDataModule",
               "--data.data_dir", str(written["amazon-670k"].directory), *_local(tmp_path, "raw")], run=False)
    data, model = run.datamodule, run.model
    assert type(data).__name__ == "RawTextXMCDataModule" and data.max_length == 32 and data.batch_size == 64
    assert model.hparams.num_labels == data.num_labels == 12 and model.head.out_features == 12
    assert model.hparams.tokenizer == data.tokenizer_name  # the shipped MiniLM, the DataModule's default



@pytest.mark.parametrize(("class_path", "data_dir", "name"), [
    ("datamodules.RawTextXMCDataModule", "/data/My-Set", "My-Set"), ("datamodules.Debtags", None, "debtags"),
    ("datamodules.DebianFiles", None, "debian-files"), ("datamodules.Debtags", "/data/other", "other")])
def test_the_recipes_runs_are_named_after_their_data(class_path, data_dir, name):
    from xmc_dst.cli import _name_run_after_own_folder

    config = {"data": {"class_path": class_path, "init_args": {"data_dir": data_dir}},
              "trainer": {"logger": {"init_args": {"name": _yaml(_config("raw-text"))["trainer"]["logger"]["init_args"]
                                                   ["name"]}}}}
    _name_run_after_own_folder(config)
    assert config["trainer"]["logger"]["init_args"]["name"] == name


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
