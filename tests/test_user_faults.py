"""A careless user drives the command line and the Python API (issue 15): nothing is lost, nothing is silently
wrong, and every mistake ends in one ``xmc-dst: error:`` line with exit status 2.

Runs in-process (``cli``/``main``) on a tiny bag-of-words dataset (fast) and, where texts are needed, on a tiny
raw-text dataset with the tiny local encoder. ``XMCModule.training_step``/``test_step`` are wrapped to count calls,
so "no step ran" is observed. Each failing case has a control that succeeds.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_topic_dataset

from xmc_dst.cli import cli, main
from xmc_dst.model import XMCModule

NAMES = [f"tag-{i}" for i in range(6)]


def write_bow(directory: Path, train: int = 64, test: int = 16, names: list[str] | None = NAMES,
              seed: int = 0) -> Path:
    """Single-file sparse format; label l is signalled by features 3l and 3l+1 (learnable), one noise feature."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        lines = [f"{count} 20 6"]
        for _ in range(count):
            labels = sorted(rng.sample(range(6), rng.randint(1, 2)))
            features = sorted({f for label in labels for f in (3 * label, 3 * label + 1)} | {rng.randrange(20)})
            lines.append(",".join(map(str, labels)) + " " + " ".join(f"{f}:1" for f in features))
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if names is not None:
        (directory / "label_names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return directory


def bow_args(data: Path, logs: Path, *extra: str) -> list[str]:
    """8 batches of 8 per epoch; last.ckpt every 5 steps; every step's loss in metrics.csv."""
    return ["--data", "datamodules.BoWXMCDataModule", "--data.data_dir", str(data), "--data.batch_size", "8",
            "--model.encoder", "xmc_dst.encoders.BagOfWordsEncoder", "--model.encoder.embedding_dim", "16",
            "--model.encoder.hidden_dim", "0", "--model.head", "xmc_dst.heads.FixedFanInHead",
            "--model.head.fan_in", "4", "--model.warmup_steps", "0", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.name", "t",
            "--trainer.log_every_n_steps", "1", "--last_checkpoint.every_n_train_steps", "5", *extra]


@pytest.fixture(scope="module")
def bow(tmp_path_factory) -> Path:
    return write_bow(tmp_path_factory.mktemp("bow") / "bow")


@pytest.fixture
def steps(monkeypatch) -> list[str]:
    """The training and test steps that ran, in order."""
    seen: list[str] = []
    train, test = XMCModule.training_step, XMCModule.test_step

    def counting_train(self, batch, batch_idx):
        seen.append("train")
        return train(self, batch, batch_idx)

    def counting_test(self, batch, batch_idx):
        seen.append("test")
        return test(self, batch, batch_idx)

    monkeypatch.setattr(XMCModule, "training_step", counting_train)
    monkeypatch.setattr(XMCModule, "test_step", counting_test)
    return seen


@pytest.fixture
def data_reads(monkeypatch) -> list[Path]:
    """Folders the bag-of-words DataModule parsed: the model is built after the data's label count is read, so none
    read means no model was built either."""
    from datamodules import BoWXMCDataModule

    seen: list[Path] = []
    original = BoWXMCDataModule._load

    def counting(self):
        seen.append(self.data_dir)
        return original(self)

    monkeypatch.setattr(BoWXMCDataModule, "_load", counting)
    return seen


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def error_line(capsys) -> str:
    """The one line the user reads: ``xmc-dst: error: ...`` (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("xmc-dst: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- 1. resume history


def test_a_resumed_run_keeps_every_metrics_row_of_the_interrupted_one(bow, tmp_path, monkeypatch):
    """A run crashing at step 13 (last.ckpt at step 10, rows of steps 10-12 flushed by the crash) resumed with
    --ckpt_path last: its metrics.csv is, row for row, the uninterrupted run's (before the fix: the rows before the
    resume point were deleted). config.yaml stays the interrupted run's; the resumed one is written beside it."""
    cli(["fit", *bow_args(bow, tmp_path / "straight", "--trainer.max_epochs", "3")])
    straight = rows(tmp_path / "straight" / "t" / "version_0" / "metrics.csv")
    assert len({row["step"] for row in straight if row["train/loss"]}) == 24  # every step logged

    original = XMCModule.training_step

    def crash_at_13(self, batch, batch_idx):
        if self.trainer.global_step == 13:
            raise RuntimeError("the machine went down")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(XMCModule, "training_step", crash_at_13)
    with pytest.raises(RuntimeError, match="went down"):
        cli(["fit", *bow_args(bow, tmp_path / "killed", "--trainer.max_epochs", "3")])
    version = tmp_path / "killed" / "t" / "version_0"
    interrupted = rows(version / "metrics.csv")
    assert max(int(row["step"]) for row in interrupted) == 12  # rows after the checkpoint, to be replayed
    config = (version / "config.yaml").read_text()
    monkeypatch.setattr(XMCModule, "training_step", original)

    cli(["fit", *bow_args(bow, tmp_path / "killed", "--trainer.max_epochs", "3", "--ckpt_path", "last")])
    assert not (version.parent / "version_1").exists()
    assert rows(version / "metrics.csv") == straight
    assert (version / "config.yaml").read_text() == config
    assert "ckpt_path: last" in (version / "config.resumed-1.yaml").read_text()


def test_extending_a_finished_run_appends_and_keeps_its_memory_report(bow, tmp_path, capsys):
    """A finished 2-epoch run continued to 3 epochs: the 2 epochs' rows come first, unchanged, then only steps of
    the third; memory.json stays and the continued run's report is memory.resumed-1.json. Continuing it again with
    the same max_epochs trains nothing, and says so."""
    profiler = ["--trainer.callbacks+=callbacks.MemoryProfiler", "--trainer.callbacks.print_table", "false"]
    cli(["fit", *bow_args(bow, tmp_path, "--trainer.max_epochs", "2", *profiler)])
    version = tmp_path / "t" / "version_0"
    first, report = rows(version / "metrics.csv"), (version / "memory.json").read_text()
    cli(["fit", *bow_args(bow, tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last", *profiler)])
    after = rows(version / "metrics.csv")
    assert after[:len(first)] == first
    assert after[len(first):] and all(int(row["step"]) >= 16 for row in after[len(first):])
    assert (version / "memory.json").read_text() == report
    assert json.loads((version / "memory.resumed-1.json").read_text())["peak_bytes"] > 0
    capsys.readouterr()
    assert main(["fit", *bow_args(bow, tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")]) == 0
    assert "xmc-dst: warning: fit trained no step (global step 24" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 2. label sets


@pytest.fixture(scope="module")
def trained(bow, tmp_path_factory) -> Path:
    """last.ckpt of a 2-epoch run on ``bow`` (labels ``NAMES``)."""
    logs = tmp_path_factory.mktemp("trained")
    cli(["fit", *bow_args(bow, logs, "--trainer.max_epochs", "2")])
    return logs / "t" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(("names", "message"), [
    (NAMES[:5] + ["other"], "6 labels in the checkpoint, 6 in the data; label id 5 is 'tag-5' in the checkpoint "
                            "and 'other' in the data; 1 of the checkpoint's names are not the data's, e.g. 'tag-5'"),
    (NAMES[::-1], "label id 0 is 'tag-0' in the checkpoint and 'tag-5' in the data; the same names in another order"),
])
def test_a_checkpoint_of_another_label_set_of_the_same_size_is_refused(bow, trained, tmp_path, steps, capsys, names,
                                                                       message):
    other = write_bow(tmp_path / "other", names=names)  # the same features and label ids, other label names
    for subcommand in ("test", "predict", "fit"):
        assert main([subcommand, *bow_args(other, tmp_path / "logs", "--ckpt_path", str(trained))]) == 2
        line = error_line(capsys)
        assert line.startswith("xmc-dst: error: the checkpoint was trained on another label set: ") and message in line
        assert "--reinit_head true" in line
    assert steps == []
    assert main(["test", *bow_args(bow, tmp_path / "logs", "--ckpt_path", str(trained))]) == 0  # its own labels
    assert steps and set(steps) == {"test"}


def test_reinit_head_starts_a_new_run_from_the_encoder_for_a_new_label_space(bow, trained, tmp_path, capsys):
    other = write_bow(tmp_path / "other", names=[f"new-{i}" for i in range(6)])
    saved = torch.load(trained, weights_only=True)["state_dict"]
    run = cli(["fit", *bow_args(other, tmp_path / "logs", "--ckpt_path", str(trained), "--reinit_head", "true",
                                "--trainer.max_epochs", "1", "--model.encoder_lr", "0", "--model.encoder_weight_decay",
                                "0")])
    assert run.trainer.global_step == 8  # a new run of one epoch, not the checkpoint's step 16 continued
    assert run.model.label_names == [f"new-{i}" for i in range(6)]
    encoder = {k: v for k, v in run.model.state_dict().items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, saved[k]) for k, v in encoder.items())  # loaded, not trained (lr 0)
    assert not torch.equal(run.model.head.weight, saved["head.weight"])
    assert main(["test", *bow_args(other, tmp_path / "logs", "--ckpt_path", str(trained), "--reinit_head",
                                   "true")]) == 2
    assert "--reinit_head applies to fit only" in error_line(capsys)


# ---------------------------------------------------------------------------------------------- 3. encodings


BOM = "\ufeff"


def test_a_byte_order_mark_and_unicode_whitespace_in_every_format(tiny_encoder_dir, tmp_path):
    """Each reader gives the same result for a file with a UTF-8 BOM (and label lists separated by other Unicode
    whitespace) as for the plain file. Before: the BOM became part of the first label, header or JSON line."""
    from datamodules import BoWXMCDataModule, LFXMCDataModule, RawTextXMCDataModule
    from datamodules.formats import iter_json_lines, read_filter_pairs, read_xc_single, read_xc_split
    from datamodules.text import text_only_docs

    plain, marked = tmp_path / "plain", tmp_path / "marked"
    write_topic_dataset(plain)
    shutil.copytree(plain, marked)
    for name in ("train_labels.txt", "train_texts.txt", "test_labels.txt"):
        text = (plain / name).read_text(encoding="utf-8")
        if "labels" in name:
            text = text.replace(" ", "\u00a0\u3000", 3).replace(" ", "\t", 2)  # no-break and ideographic spaces
        (marked / name).write_text(BOM + text, encoding="utf-8")
    modules = [RawTextXMCDataModule(d, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c") for d in
               (plain, marked)]
    assert modules[1].label_names == modules[0].label_names and not any(BOM in n for n in modules[1].label_names)
    for module in modules:
        module.setup("test")
    assert [b["input_ids"].tolist() for b in modules[1].test_dataloader()] == [
        b["input_ids"].tolist() for b in modules[0].test_dataloader()]
    assert [d["text"] for d in text_only_docs(str(marked / "train_texts.txt"))] == [
        d["text"] for d in text_only_docs(str(plain / "train_texts.txt"))]  # prediction files

    single = "3 4 2\n0 0:1\n1 1:1 2:0.5\n0,1 3:2\n"
    (tmp_path / "a.txt").write_text(single)
    (tmp_path / "b.txt").write_text(BOM + single)
    a, b = read_xc_single(tmp_path / "a.txt"), read_xc_single(tmp_path / "b.txt")
    assert a.label_indices.tolist() == b.label_indices.tolist()
    assert a.feature_values.tolist() == b.feature_values.tolist()
    (tmp_path / "x.txt").write_text(BOM + "2 3\n0:1\n2:1\n")
    (tmp_path / "y.txt").write_text(BOM + "2 2\n1:1\n0:1\n")
    assert read_xc_split(tmp_path / "x.txt", tmp_path / "y.txt").label_indices.tolist() == [1, 0]
    bow = write_bow(tmp_path / "bow")
    (bow / "label_names.txt").write_text(BOM + "\n".join(f"{n} \r" for n in NAMES) + "\n", encoding="utf-8")
    assert BoWXMCDataModule(bow).label_names == NAMES

    lines = [json.dumps({"uid": str(i), "title": t, "target_ind": [i % 2]}) for i, t in enumerate(["x y", "z"])]
    (tmp_path / "lf").mkdir()
    for name in ("trn.json", "tst.json", "lbl.json"):
        (tmp_path / "lf" / name).write_text(BOM + "\n".join(lines) + "\n", encoding="utf-8")
    assert [r["title"] for _, r in iter_json_lines(tmp_path / "lf" / "lbl.json", ("title",))] == ["x y", "z"]
    (tmp_path / "lf" / "filter_labels_test.txt").write_text(BOM + "1 0\n")
    assert read_filter_pairs(tmp_path / "lf" / "filter_labels_test.txt").tolist() == [[1, 0]]
    assert LFXMCDataModule(tmp_path / "lf", tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c").label_names \
        == ["x y", "z"]


def test_a_labels_file_of_empty_lines_is_named(tmp_path, tiny_encoder_dir, capsys, steps):
    data = write_topic_dataset(tmp_path / "raw")
    labels = data / "train_labels.txt"
    labels.write_text("\n" * 48, encoding="utf-8")
    args = ["fit", "--data", "datamodules.RawTextXMCDataModule", "--data.data_dir", str(data), "--data.tokenizer",
            str(tiny_encoder_dir), "--data.cache_dir", str(tmp_path / "c"), "--model.encoder",
            "xmc_dst.encoders.TransformerEncoder", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    assert main(args) == 2
    assert error_line(capsys) == (f"xmc-dst: error: {labels}: expected space-separated label names on the lines of "
                                  "the training documents, got '48 lines without a label'")
    assert steps == [] and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------- 4. one text


@pytest.fixture(scope="module")
def text_checkpoint(tiny_encoder_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    data = write_topic_dataset(root / "raw")
    cli(["fit", "--data", "datamodules.RawTextXMCDataModule", "--data.data_dir", str(data), "--data.tokenizer",
         str(tiny_encoder_dir), "--data.max_length", "16", "--data.batch_size", "16", "--data.cache_dir",
         str(root / "c"), "--model.encoder", "xmc_dst.encoders.TransformerEncoder", "--model.head",
         "xmc_dst.heads.FixedFanInHead", "--model.head.fan_in", "8", "--model.warmup_steps", "0",
         "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(root / "logs"), "--trainer.logger.init_args.name", "t"])
    return root / "logs" / "t" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_single_string_is_one_document_in_every_batch_entry_point(text_checkpoint):
    """Before: predict("one document") scored each of its characters as a document."""
    from xmc_dst.inference import Predictor

    predictor = Predictor.from_checkpoint(text_checkpoint, device="cpu")
    text = "python library the tool"
    one = predictor.predict(text, k=3)
    assert one == predictor.predict([text], k=3) and len(one) == 1 and len(one[0]) == 3
    scores, ids = predictor.topk(text, k=2)
    reference = predictor.topk((t for t in [text]), k=2)  # any iterable of texts is a batch
    assert scores.shape == (1, 2) and torch.equal(ids, reference[1])
    assert predictor.encode(text)["input_ids"].shape[0] == 1
    for bad, message in ((b"bytes", "takes a text or a list of texts"), ([text, 3], "item 1 is int"),
                         ({"text": text}, "got dict")):
        with pytest.raises(TypeError, match=message):
            predictor.predict(bad)
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"k must be an integer >= 1 .*got {k}"):
            predictor.predict(text, k=k)


def test_a_damaged_or_foreign_checkpoint_is_named_by_the_predictor(text_checkpoint, tmp_path):
    from xmc_dst.inference import Predictor
    from xmc_dst.model import CheckpointError

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(text_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} cannot be read .*truncated"):
        Predictor.from_checkpoint(truncated, device="cpu")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'none.ckpt'} does not exist"):
        Predictor.from_checkpoint(tmp_path / "none.ckpt", device="cpu")


# ---------------------------------------------------------------------------------------------- user mistakes


def _checkpoint_files(tmp_path: Path, trained: Path) -> dict[str, Path]:
    truncated, noise, foreign = tmp_path / "truncated.ckpt", tmp_path / "noise.ckpt", tmp_path / "weights.pt"
    truncated.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    return {"missing": tmp_path / "nowhere.ckpt", "truncated": truncated, "noise": noise, "foreign": foreign}


@pytest.mark.parametrize(("options", "message"), [
    (["--data.batch_size", "0"], "BoWXMCDataModule: batch_size must be an integer >= 1, got 0"),
    (["--data.eval_batch_size", "-4"], "BoWXMCDataModule: eval_batch_size must be an integer >= 1, got -4"),
    (["--data.num_workers", "-1"], "num_workers must be >= 0, got -1"),
    (["--trainer.max_epochs", "0"], "--trainer.max_epochs 0: fit would train nothing"),
    (["--trainer.max_steps", "0"], "--trainer.max_steps 0: fit would train nothing"),
    (["--trainer.max_epochs", "-1"], "--trainer.max_epochs -1 without max_steps or a callbacks.TrainingBudget"),
    (["--model.predict_k", "0"], "model.predict_k must be an integer >= 1 (labels per document), got 0"),
    (["--model.ks", "[1, 0]"], "every k of model.ks must be an integer >= 1"),
    (["--model.intermediate_dim", "-8"], "model.intermediate_dim must be >= 0, got -8"),
])
def test_non_positive_sizes_fail_with_one_line_before_a_step(bow, tmp_path, steps, capsys, options, message):
    assert main(["fit", *bow_args(bow, tmp_path / "logs", *options)]) == 2
    assert message in error_line(capsys)
    assert steps == [] and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("kind", ["missing", "truncated", "noise", "foreign"])
@pytest.mark.parametrize("subcommand", ["fit", "test", "predict"])
def test_a_bad_ckpt_path_is_named_before_anything_is_built(bow, trained, tmp_path, steps, capsys, data_reads, kind,
                                                           subcommand):
    path = _checkpoint_files(tmp_path, trained)[kind]
    assert main([subcommand, *bow_args(bow, tmp_path / "logs", "--ckpt_path", str(path))]) == 2
    line = error_line(capsys)
    expected = {"missing": f"checkpoint {path} does not exist",
                "truncated": f"checkpoint {path} cannot be read (", "noise": f"checkpoint {path} cannot be read (",
                "foreign": f"{path} is a PyTorch file but not a checkpoint of xmc-dst"}[kind]
    assert line.startswith(f"xmc-dst: error: {expected}") and "best-*.ckpt or last.ckpt" in line
    assert data_reads == [] and steps == []


def test_a_folder_that_cannot_be_written_fails_before_the_model_is_built(bow, tmp_path, steps, capsys, data_reads):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["fit", *bow_args(bow, blocker / "logs")]) == 2
    assert error_line(capsys).startswith(f"xmc-dst: error: --trainer.logger.init_args.save_dir {blocker / 'logs'} "
                                         f"cannot be made: {blocker} is a file, not a folder")
    output = blocker / "predictions.jsonl"
    assert main(["predict", *bow_args(bow, tmp_path / "logs", "--prediction_writer.output", str(output))]) == 2
    assert f"--prediction_writer.output {blocker} cannot be made" in error_line(capsys)
    assert data_reads == [] and steps == []
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["fit", *bow_args(bow, locked / "logs")]) == 2
        assert f"{locked / 'logs'} cannot be written" in error_line(capsys)


def test_extra_subcommands_report_mistakes_as_the_lightning_ones(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    config = Path(__file__).resolve().parents[1] / "configs" / "bibtex.yaml"
    for argv, message in (
        (["estimate-memory", "--config", str(tmp_path / "none.yaml")], f"config {tmp_path / 'none.yaml'} does not "
                                                                       "exist"),
        (["estimate-memory", "--config", str(empty)], f"estimate-memory: config {empty} is empty"),
        (["estimate-memory", "--config", str(config), "--budget-gib", "0"], "--budget-gib must be positive, got 0"),
        (["estimate-memory", "--config", str(config), "--budget-gib", "-2"], "--budget-gib must be positive, got -2"),
        (["estimate-memory", "--config", str(config), "--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["data-info", str(tmp_path), "--config", str(empty)], f"data-info: config {empty} is empty"),
        (["data-info", str(tmp_path), "--sample", "-1"], "--sample must be >= 0"),
    ):
        assert main(argv) == 2, argv
        assert message in error_line(capsys), argv
    assert main(["estimate-memory", "--config", str(config), "--budget-gib", "80", "--json"]) == 0  # the control


# ---------------------------------------------------------------------------------------------- folders and names


def test_a_users_folder_under_a_named_config_is_named_after_the_folder(tiny_encoder_dir, tmp_path, recwarn):
    """configs/bibtex.yaml on the user's folder: logs under the folder's name, no warning about Bibtex's published
    statistics; a text dataset's cache is named after the folder too. A folder named like the dataset is that
    dataset (a download kept elsewhere): its statistics are compared."""
    from datamodules import Bibtex, Debtags

    config = Path(__file__).resolve().parents[1] / "configs" / "bibtex.yaml"
    mine = write_bow(tmp_path / "my-tags")
    run = cli(["fit", "--config", str(config), "--data.data_dir", str(mine), "--data.val_fraction", "0",
               "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--test_after_fit", "false"])
    assert Path(run.trainer.log_dir) == tmp_path / "logs" / "my-tags" / "version_0"
    assert not [w for w in recwarn if "published statistics" in str(w.message)]
    raw = write_topic_dataset(tmp_path / "my-debs")
    debs = Debtags(data_dir=raw, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    debs.setup("test")
    assert debs.cache_path.parent == tmp_path / "c" / "my-debs"
    assert not [w for w in recwarn if "published statistics" in str(w.message)]
    with pytest.warns(UserWarning, match="published statistics are 4,880/2,515/159"):
        Bibtex(data_dir=write_bow(tmp_path / "elsewhere" / "bibtex")).setup()


def test_a_run_failing_before_it_logged_leaves_no_version_folder(bow, tmp_path, steps, capsys):
    """A cluster file of label names lacking a training label fails in setup, after config.yaml was written: the
    version folder goes again (before: version_0/ holding only config.yaml). The control keeps its folder."""
    groups = np.empty(2, dtype=object)
    groups[:] = [np.array(NAMES[:3]), np.array(NAMES[3:5])]
    np.save(tmp_path / "groups.npy", groups, allow_pickle=True)
    assert main(["fit", *bow_args(bow, tmp_path / "logs", "--model.aux_cluster_file",
                                  str(tmp_path / "groups.npy"))]) == 2
    assert "labels in no cluster: 1, e.g. label 5 ('tag-5')" in error_line(capsys)
    assert steps == [] and list((tmp_path / "logs" / "t").iterdir()) == []
    assert main(["fit", *bow_args(bow, tmp_path / "logs", "--trainer.max_steps", "1")]) == 0
    assert (tmp_path / "logs" / "t" / "version_0" / "metrics.csv").is_file()


def test_fast_dev_run_writes_no_checkpoint_anywhere(bow, tmp_path, monkeypatch, steps):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *bow_args(bow, tmp_path / "logs", "--trainer.fast_dev_run", "1")]) == 0
    assert steps == ["train"]
    assert list(tmp_path.rglob("*.ckpt")) == []  # before: ./checkpoints/last.ckpt
