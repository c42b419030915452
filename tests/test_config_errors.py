"""Configuration errors fail before the first training step, with a message naming the bad value or file and the fix.

Every case runs the real command line in-process (``cli(["fit", ...])``, or ``main`` for what the user sees) on a
tiny raw-text dataset with the tiny local encoder; ``XMCModule.training_step`` is wrapped to count calls, so "no
step ran" is observed rather than assumed. Each check also has a control: the same command with the suggested fix
trains (the counter moves), which shows both that the counter works and that the fix in the message is the right
one.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import BoWXMCDataModule, LFXMCDataModule, RawTextXMCDataModule
from xmc_dst.cli import cli, main
from xmc_dst.clusters import ClusterFileError
from xmc_dst.model import XMCModule

TOPICS = {"python": "lang::python", "game": "use::gameplaying", "network": "protocol::ip", "data": "works-with::db"}
LABELS = sorted(TOPICS.values())  # the label vocabulary: training labels sorted as strings


def write_raw(directory: Path, train: int = 24, test: int = 8) -> Path:
    """Raw-text layout; every label occurs in training (so the vocabulary is ``LABELS``)."""
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        rows = [rng.sample(sorted(TOPICS), rng.randint(1, 2)) for _ in range(count)]
        rows[: len(TOPICS)] = [[word] for word in sorted(TOPICS)]
        (directory / f"{split}_texts.txt").write_text("".join(" ".join(r) + " tool\n" for r in rows), "utf-8")
        (directory / f"{split}_labels.txt").write_text("".join(" ".join(TOPICS[w] for w in r) + "\n" for r in rows),
                                                       "utf-8")
    return directory


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def cause(error: BaseException, kind: type[BaseException]) -> BaseException:
    """The error of type ``kind`` in ``error``'s chain: jsonargparse re-raises a DataModule's ``__init__`` error as a
    ValueError ("Does not validate against any of the Union subtypes", quoting it) *from* the original."""
    seen = error
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, f"no {kind.__name__} behind {error!r}"
    return seen


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Indices of the training batches that reached ``XMCModule.training_step``."""
    seen: list[int] = []
    original = XMCModule.training_step

    def counting(self, batch, batch_idx):
        seen.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(XMCModule, "training_step", counting)
    return seen


def args(data_dir: Path, encoder: Path, tmp: Path, cache: Path, *extra: str) -> list[str]:
    return ["fit",
            "--data", "datamodules.RawTextXMCDataModule", "--data.data_dir", str(data_dir),
            "--data.tokenizer", str(encoder), "--data.max_length", "8", "--data.batch_size", "8",
            "--data.cache_dir", str(cache),
            "--model.encoder", "xmc_dst.encoders.TransformerEncoder",
            "--model.head", "xmc_dst.heads.FixedFanInHead", "--model.head.fan_in", "8",
            "--model.intermediate_dim", "16", "--model.warmup_steps", "0",
            "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
            *extra]


# ---------------------------------------------------------------------------------------------- (a) data directory


def test_missing_data_directory_names_the_path_the_files_and_the_fix(raw, tiny_encoder_dir, tmp_path, cache, steps):
    nowhere = tmp_path / "no-such-dataset"
    with pytest.raises(ValueError) as info:
        cli(args(nowhere, tiny_encoder_dir, tmp_path, cache))
    message = str(cause(info.value, FileNotFoundError))
    assert message in str(info.value)  # what the command line prints quotes it whole
    assert f"data directory {nowhere} does not exist" in message
    assert "train_texts.txt, test_texts.txt" in message and "train_labels.txt, test_labels.txt" in message
    assert "Point data_dir (--data.init_args.data_dir) at the folder that holds them" in message
    assert steps == []
    cli(args(raw, tiny_encoder_dir, tmp_path, cache))  # the control: the right folder trains
    assert steps == [0]


def test_data_directory_lacking_a_file_names_it_and_what_is_there(raw, tiny_encoder_dir, tmp_path, cache, steps):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train_texts.txt", "train_labels.txt", "test_texts.txt"):
        (partial / name).write_bytes((raw / name).read_bytes())
    with pytest.raises(ValueError) as info:
        cli(args(partial, tiny_encoder_dir, tmp_path, cache))
    message = str(cause(info.value, FileNotFoundError))
    assert f"data directory {partial} lacks test_labels.txt" in message
    assert "(it holds test_texts.txt, train_labels.txt, train_texts.txt)" in message
    assert steps == []
    a_file = partial / "train_texts.txt"
    with pytest.raises(ValueError) as info:
        cli(args(a_file, tiny_encoder_dir, tmp_path, cache))
    assert f"data directory {a_file} is a file, not a directory" in str(cause(info.value, FileNotFoundError))
    assert steps == []


def test_xmc_dst_prints_the_data_modules_own_message_not_the_union_wrapper(raw, tiny_encoder_dir, tmp_path, cache,
                                                                          steps, capsys):
    """What ``xmc-dst fit`` shows: jsonargparse wraps the DataModule's FileNotFoundError in "Does not validate
    against any of the Union subtypes"; main() prints the original message first (the path, the files, the fix),
    exits with status 2, and no step runs. The control: with the folder fixed, main() trains and returns 0."""
    nowhere = tmp_path / "no-such-dataset"
    assert main(args(nowhere, tiny_encoder_dir, tmp_path, cache)) == 2
    err = capsys.readouterr().err
    lines = err[err.index("xmc-dst: error:"):].splitlines()
    assert lines[0].startswith(f"xmc-dst: error: RawTextXMCDataModule: data directory {nowhere} does not exist")
    assert "train_texts.txt, test_texts.txt" in lines[0]
    assert "Point data_dir (--data.init_args.data_dir) at the folder that holds them" in lines[0]
    assert lines[1].startswith("  (FileNotFoundError raised at ") and "datamodules" in lines[1]
    assert lines[2] == "  (wrapped as ValueError: Does not validate against any of the Union subtypes)"
    assert "Traceback" not in err and steps == []
    assert main(args(raw, tiny_encoder_dir, tmp_path, cache)) == 0 and steps == [0]


def test_xmc_dst_prints_a_callbacks_own_message_and_keeps_tracebacks_of_bugs(raw, tiny_encoder_dir, tmp_path,
                                                                             cache, steps, capsys, monkeypatch):
    """A callback's ``__init__`` error (AuxiliaryObjective's missing cluster file) is unwrapped the same way; an
    error that is not a bad value or file (a KeyError), or not raised by the project's code (a ValueError from this
    test's training_step), still propagates with its traceback."""
    config = tmp_path / "aux.yaml"
    missing = tmp_path / "nowhere.npy"
    config.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.AuxiliaryObjective\n      init_args: "
                      f"{{cutoff_step: 1, cluster_file: '{missing}'}}\n")
    options = args(raw, tiny_encoder_dir, tmp_path, cache, "--model.aux_clusters", "2", "--config", str(config))
    assert main(options) == 2
    err = capsys.readouterr().err
    line = err[err.index("xmc-dst: error:"):].splitlines()[0]
    assert re.search(rf"cluster_file .*{re.escape(str(missing))} does not exist; rebuild the file", line)
    assert steps == []

    for bug in (KeyError("a bug, not a configuration error"), ValueError("a bug outside the project's code")):
        def broken(self, batch, batch_idx, bug=bug):
            raise bug

        monkeypatch.setattr(XMCModule, "training_step", broken)
        with pytest.raises(type(bug), match="a bug"):
            main(args(raw, tiny_encoder_dir, tmp_path, cache))
    assert "xmc-dst: error:" not in capsys.readouterr().err


@pytest.mark.parametrize(("cls", "expected"), [
    (BoWXMCDataModule, "train.txt (or train_X_Xf.txt + train_X_Y.txt) or trn.txt (or trn_X_Xf.txt + trn_X_Y.txt)"),
    (LFXMCDataModule, "trn.json.gz, tst.json.gz, lbl.json.gz"),
    (RawTextXMCDataModule, "train_texts.txt, test_texts.txt (or train_raw_texts.txt, test_raw_texts.txt)"),
])
def test_every_layout_names_the_folder_and_its_files(cls, expected, tmp_path):
    """No tokenizer is given: the folder is checked first, before anything is loaded."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("not data\n")
    with pytest.raises(FileNotFoundError) as info:
        cls(data_dir=empty)
    message = str(info.value)
    assert f"{cls.__name__}: data directory {empty} lacks" in message and "(it holds README)" in message
    assert expected in message and "Point data_dir" in message and "XMLRepository.html" in message


# ---------------------------------------------------------------------------------------------- (b) fan-in


@pytest.mark.parametrize(("options", "message", "fixed"), [
    (["--model.head.fan_in", "24"],
     r"model\.head fan_in=24 is larger than the 16 inputs of the head \(intermediate_dim=16\): set "
     r"model\.head\.init_args\.fan_in <= 16, or raise model\.intermediate_dim to at least 24",
     ["--model.head.fan_in", "24", "--model.intermediate_dim", "24"]),
    (["--model.head.fan_in", "40", "--model.intermediate_dim", "0"],  # the tiny encoder is 32 wide
     r"model\.head fan_in=40 is larger than the 32 inputs of the head \(the encoder's output width\): set "
     r"model\.head\.init_args\.fan_in <= 32, or add an intermediate layer with model\.intermediate_dim >= 40",
     ["--model.head.fan_in", "32", "--model.intermediate_dim", "0"]),
])
def test_fan_in_above_the_head_input_width_fails_with_both_fixes(raw, tiny_encoder_dir, tmp_path, cache, steps,
                                                                 options, message, fixed):
    with pytest.raises(ValueError, match=message):
        cli(args(raw, tiny_encoder_dir, tmp_path, cache, *options))
    assert steps == []
    run = cli(args(raw, tiny_encoder_dir, tmp_path, cache, *fixed))  # each suggested fix trains
    assert steps == [0] and run.model.head.fan_in == int(fixed[1]) == run.model.head.weight.shape[1]


def test_dense_head_ignores_fan_in(raw, tiny_encoder_dir, tmp_path, cache, steps):
    cli(args(raw, tiny_encoder_dir, tmp_path, cache, "--model.head.fan_in", "1000", "--model.head",
             "xmc_dst.heads.DenseHead"))
    assert steps == [0]


# ---------------------------------------------------------------------------------------------- (c) cluster files


def _named_groups(path: Path, groups: list[list[str]]) -> Path:
    array = np.empty(len(groups), dtype=object)
    array[:] = [np.array(g) for g in groups]
    np.save(path, array, allow_pickle=True)
    return path


def test_cluster_file_of_label_ids_with_the_wrong_length_fails_when_the_model_is_built(raw, tiny_encoder_dir,
                                                                                        tmp_path, cache, steps):
    short = tmp_path / "assignment.npy"
    np.save(short, np.array([0, 1, 1]))  # 3 ids for 4 labels
    with pytest.raises(ClusterFileError) as info:
        cli(args(raw, tiny_encoder_dir, tmp_path, cache, "--model.aux_cluster_file", str(short)))
    message = str(info.value)
    assert f"{short}: a 1-D assignment holds one cluster id per label, 3 ids for the data's 4 labels" in message
    assert "rebuild the file for this data's label set" in message and "build_clusters: true" in message
    assert steps == []
    np.save(short, np.array([0, 1, 1, 0]))
    run = cli(args(raw, tiny_encoder_dir, tmp_path, cache, "--model.aux_cluster_file", str(short)))
    assert steps == [0] and run.model.label_clusters.tolist() == [0, 1, 1, 0]


def test_cluster_file_missing_a_training_label_fails_in_setup_before_any_step(raw, tiny_encoder_dir, tmp_path,
                                                                              cache, steps):
    """Label *names* (the authors' raw-text files) are resolved in setup, inside fit: still before the first step.
    Names the data does not know (here a test-only label) are skipped; a training label in no cluster is an error."""
    stale = _named_groups(tmp_path / "label_group0.npy",
                          [["lang::python", "use::gameplaying"], ["protocol::ip", "not-a-training-label"]])
    with pytest.raises(ClusterFileError) as info:
        cli(args(raw, tiny_encoder_dir, tmp_path, cache, "--model.aux_cluster_file", str(stale)))
    message = str(info.value)
    assert (f"{stale} covers 3 of the data's 4 labels; labels in no cluster: 1, e.g. label 3 ('works-with::db')"
            in message)
    assert "made for another label set" in message and "build_clusters: true" in message
    assert steps == []
    whole = _named_groups(tmp_path / "whole.npy", [["lang::python", "use::gameplaying"],
                                                   ["protocol::ip", "works-with::db", "not-a-training-label"]])
    run = cli(args(raw, tiny_encoder_dir, tmp_path, cache, "--model.aux_cluster_file", str(whole)))
    assert steps == [0]
    assert run.model.label_clusters.tolist() == [0 if name in ("lang::python", "use::gameplaying") else 1
                                                 for name in run.datamodule.label_names]


def test_auxiliary_objective_checks_its_cluster_file(raw, tiny_encoder_dir, tmp_path, cache, steps):
    """The callback's own ``cluster_file``: absent fails when the config is read, a foreign one in setup."""
    config = tmp_path / "aux.yaml"

    def with_callback(cluster_file: Path) -> list[str]:
        config.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.AuxiliaryObjective\n      init_args: "
                          f"{{cutoff_step: 1, cluster_file: '{cluster_file}'}}\n")
        return args(raw, tiny_encoder_dir, tmp_path, cache, "--model.aux_clusters", "2", "--config", str(config))

    with pytest.raises(ValueError) as info:  # a callback's __init__ error, wrapped by jsonargparse (see cause)
        cli(with_callback(tmp_path / "nowhere.npy"))
    assert re.search(r"cluster_file .*nowhere\.npy does not exist; rebuild the file",
                     str(cause(info.value, FileNotFoundError)))
    out_of_range = tmp_path / "rows.npy"
    np.save(out_of_range, np.array([[0, 1], [2, 7]]))  # label 7 of 4
    with pytest.raises(ClusterFileError, match=r"cluster 1 names label ids outside \[0, 4\) \(the data has 4 "
                                               r"labels\): 7; rebuild"):
        cli(with_callback(out_of_range))
    assert steps == []
    np.save(out_of_range, np.array([[0, 1], [2, 3]]))
    cli(with_callback(out_of_range))
    assert steps == [0]


# ---------------------------------------------------------------------------------------------- (d) label count


def test_model_built_for_another_label_count_than_the_data_fails_in_setup(tmp_path, steps):
    """Outside the CLI (which links the count) a module of 5 labels on data of 7 fails before a step, with the fix."""
    import functools

    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.heads import FixedFanInHead

    class Data(L.LightningDataModule):
        label_names = [f"l{i}" for i in range(7)]

        def train_dataloader(self):
            batch = {"feature_ids": torch.tensor([0, 1]), "feature_values": torch.ones(2),
                     "feature_offsets": torch.tensor([0, 1, 2]), "label_ids": torch.tensor([0, 6]),
                     "label_offsets": torch.tensor([0, 1, 2]), "doc_index": torch.arange(2)}
            return [batch]

    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=4, hidden_dim=0), num_labels=5,
                      num_features=3, head=functools.partial(FixedFanInHead, fan_in=2))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"the data \(Data\) has 7 labels, the model was built for 5: build the "
                                         r"model with num_labels=7"):
        trainer.fit(model, datamodule=Data())
    assert steps == [] and trainer.global_step == 0
