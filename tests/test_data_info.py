"""``xmc-dst data-info``: its counts against a plain re-reading of the files the layout writers put down, its
lengths against the tokenizer run on every text, its sample against uniformity, and its errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from layouts import write_debtags, write_lf, write_raw_text, write_xc_sparse
from transformers import AutoTokenizer

from xmc_dst.cli import configuration_error, main
from xmc_dst.data_info import _sample, data_info

ROOT = Path(__file__).resolve().parents[1]
TAIL_MAX, HEAD_MIN = 8, 12  # small thresholds, so the tiny folders have head, torso and tail labels


def plain_labels(directory: Path, layout: str, split: str) -> list[list[str]]:
    """Each document's labels, read with nothing but the standard library."""
    if layout == "raw":
        return [line.split() for line in (directory / f"{split}_labels.txt").read_text("utf-8").split("\n")[:-1]]
    if layout == "lf":
        with gzip.open(directory / f"{'trn' if split == 'train' else 'tst'}.json.gz", "rt", encoding="utf-8") as f:
            return [[str(t) for t in json.loads(line)["target_ind"]] for line in f]
    lines = (directory / f"{split}.txt").read_text("utf-8").split("\n")[1:-1]
    return [[label for label in line.split(" ")[0].split(",") if label] for line in lines]


def plain_texts(directory: Path, layout: str, split: str) -> list[str]:
    if layout == "raw":
        name = f"{split}_raw_texts.txt" if (directory / f"{split}_raw_texts.txt").exists() else f"{split}_texts.txt"
        return (directory / name).read_bytes().decode("utf-8").split("\n")[:-1]
    with gzip.open(directory / f"{'trn' if split == 'train' else 'tst'}.json.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["title"] for line in f]


LAYOUTS = {
    "Amazon-670K": ("raw", lambda d: write_raw_text(d, clusters=True)),
    "debtags-copy": ("raw", write_debtags),
    "LF-AmazonTitles-131K": ("lf", write_lf),
    "sparse": ("sparse", write_xc_sparse),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_counts_match_the_files(name, tiny_encoder_dir, tmp_path):
    layout, write = LAYOUTS[name]
    directory = tmp_path / name
    write(directory)
    info = data_info(directory, tokenizer=str(tiny_encoder_dir), tail_max=TAIL_MAX, head_min=HEAD_MIN, sample=0)
    assert info.layout == layout
    train, test = plain_labels(directory, layout, "train"), plain_labels(directory, layout, "test")
    for split, docs in (("train", train), ("test", test)):
        counts = np.array([len(set(d)) for d in docs])
        got = info.splits[split]
        assert got.docs == len(docs) and got.docs_without_labels == int((counts == 0).sum())
        assert got.labels_per_doc == {"mean": pytest.approx(counts.mean()), "median": np.median(counts),
                                      "max": counts.max()}
    frequency = Counter(label for d in train for label in set(d))
    unseen = Counter(label for d in test for label in set(d) if label not in frequency)
    assert info.train_labels == len(frequency)
    assert (info.unseen_test_labels, info.unseen_test_occurrences) == (len(unseen), sum(unseen.values()))
    expected_all = {"raw": len(frequency) + len(unseen), "lf": 12, "sparse": 10}[layout]
    assert info.all_labels == expected_all
    assert info.labels_without_train_docs == expected_all - len(frequency)
    values = np.array(list(frequency.values()))
    assert info.head_torso_tail == {"head": int((values >= HEAD_MIN).sum()), "tail": int((values <= TAIL_MAX).sum()),
                                    "torso": int(((values > TAIL_MAX) & (values < HEAD_MIN)).sum())}
    assert info.docs_per_label["mean"] == pytest.approx(values.mean()) and info.docs_per_label["max"] == values.max()
    assert info.label_frequencies == sorted(values.tolist(), reverse=True)
    named = {"Amazon-670K": (490_449, 153_025, 670_091), "LF-AmazonTitles-131K": (294_805, 134_835, 131_073)}
    if name in named:
        assert tuple(info.published.values()) == named[name]
        assert info.found() == {"train_docs": len(train), "test_docs": len(test), "num_labels": expected_all}
    else:
        assert info.published is None


@pytest.mark.parametrize("name", ["Amazon-670K", "LF-AmazonTitles-131K"])
def test_token_lengths_are_the_tokenizers(name, tiny_encoder_dir, tmp_path):
    layout, write = LAYOUTS[name]
    write(tmp_path / name)
    info = data_info(tmp_path / name, tokenizer=str(tiny_encoder_dir), max_length=20)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    for split in ("train", "test"):
        lengths = np.array([len(ids) for ids in tokenizer(plain_texts(tmp_path / name, layout, split))["input_ids"]])
        got = info.splits[split].lengths
        for q in (50, 90, 95, 99, 100):
            assert got[f"p{q}"] == pytest.approx(np.percentile(lengths, q))
        assert got["truncated"] == pytest.approx((lengths > 20).mean())


def test_a_config_sets_the_datamodule_and_max_length(tiny_encoder_dir, tmp_path):
    write_lf(tmp_path / "titles")  # a folder name of no named dataset: the config's class decides
    info = data_info(tmp_path / "titles", config=ROOT / "configs" / "lf-amazontitles-131k.yaml",
                     tokenizer=str(tiny_encoder_dir))
    assert info.datamodule == "LFAmazonTitles131K" and info.max_length == 32 and info.published is not None
    assert any("label_documents" in note for note in info.notes)
    assert data_info(tmp_path / "titles", sample=0).datamodule == "LFXMCDataModule"


def test_sparse_folders_report_features_per_document(tmp_path):
    write_xc_sparse(tmp_path / "bow")
    info = data_info(tmp_path / "bow")
    lines = (tmp_path / "bow" / "train.txt").read_text("utf-8").split("\n")[1:-1]
    features = np.array([len(line.split()) - (0 if line.startswith(" ") else 1) for line in lines])
    assert info.splits["train"].length_unit == "features" and info.tokenizer is None
    assert info.splits["train"].lengths["p50"] == np.percentile(features, 50)
    assert info.splits["train"].lengths["p100"] == features.max()


def test_the_length_sample_is_uniform():
    assert _sample(iter("abc"), 10, seed=0) == ["a", "b", "c"]
    assert _sample(range(100), 5, seed=3) == _sample(range(100), 5, seed=3)
    assert len(set(_sample(range(100), 7, seed=0))) == 7 and set(_sample(range(100), 7, seed=0)) <= set(range(100))
    counts = Counter(x for seed in range(4000) for x in _sample(iter(range(20)), 5, seed))
    assert len(counts) == 20 and all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())  # 5 of 20: 1/4 each


def test_the_command_prints_json_and_a_table(tiny_encoder_dir, tmp_path, capsys):
    write_raw_text(tmp_path / "Wiki-500K", clusters=False)
    assert main(["data-info", str(tmp_path / "Wiki-500K"), "--tokenizer", str(tiny_encoder_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["datamodule"] == "Wiki500K" and report["splits"]["train"]["docs"] == 40
    assert main(["data-info", str(tmp_path / "Wiki-500K"), "--tokenizer", str(tiny_encoder_dir)]) == 0
    out = capsys.readouterr().out
    assert "published 1,779,881, differs" in out and "test labels unseen in training: 2" in out


def test_errors_name_what_is_wrong(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"holds no dataset in a known layout \(it holds notes.txt\)") as err:
        data_info(tmp_path / "odd")
    assert configuration_error(err.value) is err.value  # the CLI's one-line error
    with pytest.raises(FileNotFoundError, match="Amazon670K: data directory .* does not exist"):
        data_info(tmp_path / "Amazon-670K")
    write_raw_text(tmp_path / "raw", clusters=False)
    with pytest.raises(ValueError, match="tokenizer '.*no-such-tokenizer' cannot be loaded here.*--tokenizer DIR"):
        data_info(tmp_path / "raw", tokenizer=str(tmp_path / "no-such-tokenizer"))


def test_label_frequency_plot(tmp_path, capsys):
    write_xc_sparse(tmp_path / "bow")
    png = tmp_path / "plots" / "labels.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert main(["data-info", str(tmp_path / "bow"), "--plot", str(png)]) == 2  # one line, as fit's errors
        assert "xmc-dst: error: data-info: --plot needs matplotlib" in capsys.readouterr().err
        assert not png.exists()
        return
    assert main(["data-info", str(tmp_path / "bow"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written" in capsys.readouterr().out

