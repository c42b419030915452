"""DataModules: batches against naive per-document references, the tokenisation cache (reuse, rebuild, crash
safety), label vocabulary, validation split, fail-fast named modules, and the shipped Debtags/Bibtex data."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_encoder
from transformers import AutoTokenizer

import datamodules.text as text_module
from datamodules import (
    Amazon670K,
    Bibtex,
    BoWXMCDataModule,
    DataFormatError,
    Debtags,
    Delicious,
    LFAmazonTitles131K,
    LFXMCDataModule,
    RawTextXMCDataModule,
    Wiki10_31K,
    Wiki500K,
)
from datamodules.formats import read_xc_single
from xmc_dst.paths import shipped_dir

TRAIN = [("a python library", "b a"), ("game data file", "c"), ("no labels here", ""), ("network tool", "a d")]
TEST = [("the python tool", "a z"), ("unknown", "q"), ("empty labels", ""), ("data for a game", "c c")]


def write_raw(directory: Path, train=TRAIN, test=TEST) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        (directory / f"{split}_texts.txt").write_text("".join(t + "\n" for t, _ in rows), encoding="utf-8")
        (directory / f"{split}_labels.txt").write_text("".join(lab + "\n" for _, lab in rows), encoding="utf-8")
    return directory


def read_gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as handle:
        return handle.read().split("\n")[:-1]


def all_batches(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def check_against_reference(batches, texts, labels, vocab, tokenizer, max_length) -> int:
    """Compare every document of ``batches`` with tokenising its text alone; return the documents seen."""
    index = {name: i for i, name in enumerate(vocab)}
    seen = 0
    for batch in batches:
        ids, mask, offsets = batch["input_ids"], batch["attention_mask"], batch["label_offsets"]
        assert ids.dtype == mask.dtype == batch["label_ids"].dtype == offsets.dtype == torch.long
        assert ids.shape == mask.shape and ids.shape[1] <= max_length and offsets.shape == (len(ids) + 1,)
        assert int(mask.sum(1).max()) == ids.shape[1]  # padded to the longest document of the batch
        for row, doc in enumerate(batch["doc_index"].tolist()):
            expected = tokenizer(texts[doc], truncation=True, max_length=max_length)["input_ids"]
            length = int(mask[row].sum())
            assert ids[row, :length].tolist() == expected
            assert mask[row, :length].all() and not mask[row, length:].any()
            assert (ids[row, length:] == tokenizer.pad_token_id).all()
            got = batch["label_ids"][offsets[row] : offsets[row + 1]].tolist()
            assert len(got) == len(set(got))
            assert set(got) == {index[x] for x in labels[doc].split() if x in index}
            seen += 1
    return seen


@pytest.fixture(scope="module")
def debtags(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Debtags:
    module = Debtags(tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path_factory.mktemp("cache"), max_length=24,
                     batch_size=1024, eval_batch_size=1024)
    module.prepare_data()
    module.setup()
    return module


def test_debtags_statistics_match_source_md(debtags: Debtags) -> None:
    text = (shipped_dir("debtags") / "SOURCE.md").read_text(encoding="utf-8")
    found = re.search(r"train ([\d,]+) documents, test ([\d,]+); ([\d,]+) distinct labels over train\+test, "
                      r"([\d,]+) of them seen in training", text)
    train_docs, test_docs, all_labels, seen = (int(g.replace(",", "")) for g in found.groups())
    occurrences = re.search(r"([\d,]+) train \(([\d.]+) labels/point\), ([\d,]+) test \(([\d.]+)\)", text)
    train_occ, test_occ = int(occurrences.group(1).replace(",", "")), int(occurrences.group(3).replace(",", ""))
    dropped = int(re.search(r"([\d,]+) occurrences in", text).group(1))

    assert debtags.num_labels == len(debtags.label_names) == seen
    assert debtags.num_labels + debtags.dropped_test_labels["unseen_labels"] == all_labels
    assert debtags.num_train_docs == train_docs
    assert debtags.tokenizer_name and (debtags.propensity_a, debtags.propensity_b) == (0.55, 1.5)
    counts = debtags.train_label_counts
    assert counts.shape == (seen,) and int(counts.sum()) == train_occ and int(counts.min()) >= 1
    assert round(train_occ / train_docs, 2) == float(occurrences.group(2))
    test_batches = all_batches(debtags.test_dataloader())
    assert sum(len(b["doc_index"]) for b in test_batches) == test_docs
    assert sum(len(b["label_ids"]) for b in test_batches) == test_occ - dropped
    assert debtags.dropped_test_labels["unseen_label_occurrences"] == dropped


def test_debtags_batches_match_per_document_tokenisation(debtags: Debtags, tiny_encoder_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    texts = read_gz_lines(shipped_dir("debtags") / "test_texts.txt.gz")
    labels = read_gz_lines(shipped_dir("debtags") / "test_labels.txt.gz")
    train_labels = read_gz_lines(shipped_dir("debtags") / "train_labels.txt.gz")
    vocab = sorted({x for line in train_labels for x in line.split()})
    assert debtags.label_names == vocab  # sorted training labels
    seen = check_against_reference(debtags.test_dataloader(), texts, labels, vocab, tokenizer, 24)
    assert seen == len(texts)


def test_debtags_no_published_mismatch_warning(debtags: Debtags, recwarn: pytest.WarningsRecorder) -> None:
    Debtags(tokenizer=debtags.tokenizer_name, cache_dir=debtags.cache_root, max_length=24).setup("test")
    assert not [w for w in recwarn if "published statistics" in str(w.message)]


def test_toy_vocabulary_order_and_unseen_labels(tiny_encoder_dir, tmp_path, caplog) -> None:
    data = write_raw(tmp_path / "toy")
    module = RawTextXMCDataModule(data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c", batch_size=2)
    assert module.label_names == ["a", "b", "c", "d"] and module.num_labels == 4  # before any tokenisation
    with caplog.at_level(logging.WARNING):
        module.setup()
    assert re.search(r"dropped 2 test label occurrences \(2 distinct labels unseen in training\) from 2", caplog.text)
    assert module.dropped_test_labels == {
        "unseen_label_occurrences": 2, "unseen_labels": 2, "docs_with_unseen_labels": 2,
    }
    assert module.train_label_counts.tolist() == [2, 1, 1, 1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    batches = all_batches(module.train_dataloader())
    seen = check_against_reference(batches, [t for t, _ in TRAIN], [lab for _, lab in TRAIN], module.label_names,
                                   tokenizer, 128)
    assert seen == 4 and sorted(torch.cat([b["doc_index"] for b in batches]).tolist()) == [0, 1, 2, 3]
    test = all_batches(module.test_dataloader())
    assert check_against_reference(test, [t for t, _ in TEST], [lab for _, lab in TEST], module.label_names,
                                   tokenizer, 128) == 4

    shuffled = write_raw(tmp_path / "shuffled", train=TRAIN[::-1])
    other = RawTextXMCDataModule(shuffled, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    assert other.label_names == module.label_names  # order does not depend on line order


def test_raw_variant_selection(tiny_encoder_dir, tmp_path) -> None:
    data = write_raw(tmp_path / "d")
    for split in ("train", "test"):
        (data / f"{split}_raw_texts.txt").write_text("RAW\n" * 4, encoding="utf-8")
    kwargs = {"tokenizer": str(tiny_encoder_dir), "cache_dir": tmp_path / "c"}
    assert RawTextXMCDataModule(data, **kwargs).files["train_texts"].name == "train_raw_texts.txt"
    assert RawTextXMCDataModule(data, text_variant="plain", **kwargs).files["train_texts"].name == "train_texts.txt"
    (data / "test_raw_texts.txt").unlink()
    assert RawTextXMCDataModule(data, **kwargs).files["train_texts"].name == "train_texts.txt"
    with pytest.raises(FileNotFoundError, match="train_raw_texts.txt, test_raw_texts.txt"):
        RawTextXMCDataModule(data, text_variant="raw", **kwargs)


def test_cache_reused_then_rebuilt_on_changes(tiny_encoder_dir, tmp_path, monkeypatch) -> None:
    data = write_raw(tmp_path / "toy")
    kwargs = {"tokenizer": str(tiny_encoder_dir), "cache_dir": tmp_path / "c", "max_length": 16}
    builds: list[str] = []
    real_build = text_module.build_split

    def counting_build(*args, **kw):
        builds.append(args[-1])
        return real_build(*args, **kw)

    monkeypatch.setattr(text_module, "build_split", counting_build)
    first = RawTextXMCDataModule(data, **kwargs)
    first.prepare_data()
    first.setup()
    assert len(builds) == 2 and first.cache_path.is_dir()
    assert sorted(p.name for p in first.cache_path.iterdir()) == [
        "label_counts.npy", "label_names.json", "meta.json", "test", "train",
    ]
    assert json.loads((first.cache_path / "label_names.json").read_text()) == ["a", "b", "c", "d"]
    stamp = first.cache_path.stat().st_mtime_ns

    second = RawTextXMCDataModule(data, **kwargs)
    second.prepare_data()
    second.setup()
    assert len(builds) == 2 and second.cache_path == first.cache_path  # reused, nothing re-tokenised
    assert first.cache_path.stat().st_mtime_ns == stamp
    assert next(iter(second.train_dataloader()))["input_ids"].shape[1] <= 16

    longer = RawTextXMCDataModule(data, **{**kwargs, "max_length": 8})
    longer.prepare_data()
    assert len(builds) == 4 and longer.cache_path != first.cache_path
    assert next(iter(longer.train_dataloader()))["input_ids"].shape[1] == 8

    other_tokenizer = build_tiny_encoder(tmp_path / "tok2", words=["python", "library", "zebra"])
    retok = RawTextXMCDataModule(data, **{**kwargs, "tokenizer": str(other_tokenizer)})
    retok.prepare_data()
    assert len(builds) == 6 and retok.cache_path not in (first.cache_path, longer.cache_path)

    (data / "train_texts.txt").write_text("changed text\n" * 4, encoding="utf-8")
    changed = RawTextXMCDataModule(data, **kwargs)
    changed.prepare_data()
    assert len(builds) == 8 and changed.cache_path != first.cache_path


def test_crash_during_build_leaves_no_half_cache(tiny_encoder_dir, tmp_path, monkeypatch) -> None:
    data = write_raw(tmp_path / "toy")
    kwargs = {"tokenizer": str(tiny_encoder_dir), "cache_dir": tmp_path / "c"}
    real_build = text_module.build_split

    def crash_on_test(*args, **kw):
        if args[-1].endswith("-test"):
            raise RuntimeError("simulated crash")
        return real_build(*args, **kw)

    monkeypatch.setattr(text_module, "build_split", crash_on_test)
    module = RawTextXMCDataModule(data, **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        module.prepare_data()
    assert not module.cache_path.exists()
    assert [p.name for p in module.cache_path.parent.iterdir() if p.is_dir()] == []  # no temporary folder left

    # A folder left by a killed process (dead pid) is cleaned by the next build.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    leftover = module.cache_path.parent / f".tmp-{module.cache_path.name}-{host}-{dead.stdout.strip()}-deadbeef"
    (leftover / "train").mkdir(parents=True)
    monkeypatch.setattr(text_module, "build_split", real_build)
    retry = RawTextXMCDataModule(data, **kwargs)
    retry.setup()
    assert retry.cache_path.is_dir() and not leftover.exists()
    assert len(next(iter(retry.test_dataloader()))["doc_index"]) == 4


def test_bad_raw_inputs_name_file_and_line(tiny_encoder_dir, tmp_path) -> None:
    kwargs = {"tokenizer": str(tiny_encoder_dir), "cache_dir": tmp_path / "c"}
    short = write_raw(tmp_path / "short")
    (short / "test_labels.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"test_labels\.txt:3: expected as many lines as .*test_texts\.txt \(4\)"):
        RawTextXMCDataModule(short, **kwargs).prepare_data()

    bad_utf8 = write_raw(tmp_path / "utf8")
    (bad_utf8 / "train_texts.txt").write_bytes(b"ok\nok\nbroken \xff here\nok\n")
    with pytest.raises(DataFormatError, match=r"train_texts\.txt:3: expected UTF-8 text") as info:
        RawTextXMCDataModule(bad_utf8, **kwargs).prepare_data()
    assert isinstance(info.value, ValueError) and info.value.line == 3

    empty = write_raw(tmp_path / "empty")
    (empty / "train_texts.txt").write_bytes(b"")
    (empty / "train_labels.txt").write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"train_texts\.txt:1: expected one document per line, got 'an empty"):
        RawTextXMCDataModule(empty, **kwargs).prepare_data()


@pytest.mark.parametrize(
    ("cls", "name"),
    [(Wiki10_31K, "Wiki10-31K"), (Amazon670K, "Amazon-670K"), (Wiki500K, "Wiki-500K"),
     (LFAmazonTitles131K, "LF-AmazonTitles-131K")],
)
def test_named_modules_fail_fast_on_missing_files(cls, name, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        cls(data_dir=missing)  # no tokenizer given: fails before one would be needed
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert name in message and "http://manikvarma.org/downloads/XC/XMLRepository.html" in message
    expected_file = "trn.json.gz" if cls is LFAmazonTitles131K else "train_labels.txt"
    assert expected_file in message

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train_texts.txt").write_text("x\n")
    with pytest.raises(FileNotFoundError, match="lacks"):
        cls(data_dir=partial)


def test_named_module_defaults_and_published_warning(tiny_encoder_dir, tmp_path) -> None:
    data = write_raw(tmp_path / "Wiki10-31K")
    module = Wiki10_31K(data_dir=data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    assert (module.max_length, module.propensity_a, module.propensity_b) == (128, 0.55, 1.5)
    assert (Amazon670K.published.train_docs, Amazon670K.published.num_labels) == (490_449, 670_091)
    assert Wiki500K.published == type(Wiki500K.published)(1_779_881, 769_421, 501_008)
    with pytest.warns(UserWarning, match="published statistics are 14,146/6,616/30,938"):
        module.setup()
    amazon = Amazon670K(data_dir=data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    wiki = Wiki500K(data_dir=data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    assert (amazon.propensity_a, amazon.propensity_b, wiki.propensity_a, wiki.propensity_b) == (0.6, 2.6, 0.5, 0.4)


def test_validation_split_deterministic_and_disjoint(debtags: Debtags) -> None:
    def split_docs(seed: int) -> tuple[set[int], set[int], Debtags]:
        module = Debtags(tokenizer=debtags.tokenizer_name, cache_dir=debtags.cache_root, max_length=24,
                         val_fraction=0.1, seed=seed, batch_size=4096, eval_batch_size=4096)
        module.setup("fit")
        train = {d for b in module.train_dataloader() for d in b["doc_index"].tolist()}
        val = {d for b in module.val_dataloader() for d in b["doc_index"].tolist()}
        return train, val, module

    train, val, module = split_docs(7)
    assert not train & val and len(train | val) == 24_227 and len(val) == round(24_227 * 0.1)
    assert module.num_train_docs == len(train)
    again_train, again_val, _ = split_docs(7)
    assert (again_train, again_val) == (train, val)
    assert split_docs(8)[1] != val

    # train_label_counts count the training documents only.
    labels = read_gz_lines(shipped_dir("debtags") / "train_labels.txt.gz")
    index = {name: i for i, name in enumerate(module.label_names)}
    expected = np.zeros(module.num_labels, dtype=np.int64)
    for doc in train:
        for name in set(labels[doc].split()):
            expected[index[name]] += 1
    assert module.train_label_counts.tolist() == expected.tolist()


def test_validation_policy_without_val_fraction(debtags: Debtags) -> None:
    assert len(debtags.val_dataloader().dataset) == 6_069  # validates on the test split
    no_val = Debtags(tokenizer=debtags.tokenizer_name, cache_dir=debtags.cache_root, max_length=24,
                     val_on_test=False)
    no_val.setup("fit")
    assert no_val.val_dataloader() == []


def test_predict_file(debtags: Debtags, tiny_encoder_dir, tmp_path) -> None:
    docs = ["python library for data", "a game", ""]
    path = tmp_path / "predict.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    module = Debtags(tokenizer=debtags.tokenizer_name, cache_dir=debtags.cache_root, max_length=24,
                     predict_file=path)
    module.setup("predict")
    (batch,) = list(module.predict_dataloader())
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    assert check_against_reference([batch], docs, ["", "", ""], module.label_names, tokenizer, 24) == 3
    assert batch["label_offsets"].tolist() == [0, 0, 0, 0]


def test_dataloader_workers(debtags: Debtags) -> None:
    module = Debtags(tokenizer=debtags.tokenizer_name, cache_dir=debtags.cache_root, max_length=24,
                     num_workers=1, eval_batch_size=2048)
    module.setup("test")
    docs = torch.cat([b["doc_index"] for b in module.test_dataloader()])
    assert docs.tolist() == list(range(6_069))


def write_lf(directory: Path) -> Path:
    directory.mkdir(parents=True)
    labels = [{"uid": f"L{i}", "title": title, "content": ""} for i, title in enumerate(["python", "game", "tool"])]
    train = [
        {"uid": "d0", "title": "python tool", "content": "a library", "target_ind": [0, 2], "target_rel": [1, 1]},
        {"uid": "d1", "title": "game", "content": "", "target_ind": [1], "target_rel": [1]},
    ]
    test = [
        {"uid": "t0", "title": "data tool", "content": "network", "target_ind": [2], "target_rel": [1]},
        {"uid": "t1", "title": "python", "content": "", "target_ind": [], "target_rel": []},
    ]
    for name, rows in (("lbl", labels), ("trn", train), ("tst", test)):
        with gzip.open(directory / f"{name}.json.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    (directory / "filter_labels_test.txt").write_text("1 0\n", encoding="utf-8")
    return directory


def test_lf_module(tiny_encoder_dir, tmp_path) -> None:
    data = write_lf(tmp_path / "LF-AmazonTitles-131K")  # the named dataset's folder: its statistics apply
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    module = LFXMCDataModule(data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    assert module.label_names == ["python", "game", "tool"] and module.num_labels == 3
    assert module.filter_pairs.tolist() == [[1, 0]] and module.filter_pairs.dtype == torch.long
    module.setup()
    assert module.train_label_counts.tolist() == [1, 1, 1]
    texts, labels = ["data tool", "python"], ["tool", ""]
    assert check_against_reference(module.test_dataloader(), texts, labels, module.label_names, tokenizer, 32) == 2

    with_content = LFXMCDataModule(data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c", use_content=True)
    with_content.setup("test")
    assert with_content.cache_path != module.cache_path
    texts = ["data tool network", "python"]
    assert check_against_reference(with_content.test_dataloader(), texts, labels, module.label_names, tokenizer,
                                   32) == 2

    named = LFAmazonTitles131K(data_dir=data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    assert (named.max_length, named.propensity_a, named.propensity_b) == (32, 0.6, 2.6)
    assert named.label_keys == ["0", "1", "2"]  # how the authors' cluster files name LF labels
    with pytest.warns(UserWarning, match="294,805/134,835/131,073"):
        named.setup("test")


def test_lf_label_documents_follow_the_training_file(tiny_encoder_dir, tmp_path) -> None:
    """label_documents: each label's title is one more training document labelled with itself (after the file's
    documents); the counts, the propensity's N and the published-statistics check see it as the data does."""
    data = write_lf(tmp_path / "LF-AmazonTitles-131K")  # the named dataset's folder
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    module = LFXMCDataModule(data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c", label_documents=True,
                             batch_size=16)
    assert module.num_train_docs == 2 + 3
    assert module.train_label_counts.tolist() == [2, 2, 2]  # d0: python+tool, d1: game, one title each
    module.setup("fit")
    texts = ["python tool", "game", "python", "game", "tool"]
    labels = ["python tool", "game", "python", "game", "tool"]
    assert check_against_reference(module.train_dataloader(), texts, labels, module.label_names, tokenizer, 32) == 5
    plain = LFXMCDataModule(data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    assert plain.cache_path != module.cache_path and plain.num_train_docs == 2
    with pytest.warns(UserWarning, match="found have train/test/labels = 2/2/3"):  # the file's documents only
        LFAmazonTitles131K(data_dir=data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c",
                           label_documents=True).setup("test")


def test_lf_bad_target(tiny_encoder_dir, tmp_path) -> None:
    data = write_lf(tmp_path / "lf")
    with gzip.open(data / "tst.json.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"title": "x", "target_ind": [0]}) + "\n")
        handle.write(json.dumps({"title": "y", "target_ind": [9]}) + "\n")
    module = LFXMCDataModule(data, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "c")
    with pytest.raises(DataFormatError, match=r"tst\.json\.gz:2: expected 'target_ind' as a list of label ids"):
        module.prepare_data()


def test_bibtex_batches_match_file(tmp_path) -> None:
    module = Bibtex(batch_size=500, eval_batch_size=500, val_fraction=0.2, seed=3)
    module.setup()
    assert (module.num_labels, module.num_features, len(module.label_names)) == (159, 1836, 159)
    assert module.label_names[0] == "TAG_2005" and module.feature_names is not None
    reference = read_xc_single(shipped_dir("bibtex") / "train.txt.gz")
    seen: list[int] = []
    for loader in (module.train_dataloader(), module.val_dataloader()):
        for batch in loader:
            f_off, l_off = batch["feature_offsets"], batch["label_offsets"]
            assert batch["feature_values"].dtype == torch.float32 and f_off.shape == l_off.shape
            for row, doc in enumerate(batch["doc_index"].tolist()):
                lo, hi = reference.feature_indptr[doc], reference.feature_indptr[doc + 1]
                assert batch["feature_ids"][f_off[row] : f_off[row + 1]].tolist() == reference.feature_indices[
                    lo:hi].tolist()
                lo, hi = reference.label_indptr[doc], reference.label_indptr[doc + 1]
                assert batch["label_ids"][l_off[row] : l_off[row + 1]].tolist() == reference.label_indices[
                    lo:hi].tolist()
                seen.append(doc)
    assert sorted(seen) == list(range(4880))
    assert module.num_train_docs == 4880 - round(4880 * 0.2)
    assert int(module.train_label_counts.sum()) < 11_616
    test = Bibtex()
    assert sum(len(b["doc_index"]) for b in test.test_dataloader()) == 2515


def test_delicious_and_split_form(tmp_path) -> None:
    module = Delicious()
    assert (module.num_labels, module.num_features, module.num_train_docs) == (983, 500, 12_920)
    lengths = torch.cat([b["label_offsets"].diff() for b in module.test_dataloader()])
    assert int((lengths == 0).sum()) == 4  # points without labels are kept
    split = tmp_path / "split"
    split.mkdir()
    for prefix, n in (("trn", 3), ("tst", 2)):
        (split / f"{prefix}_X_Xf.txt").write_text(f"{n} 4\n" + "0:1 3:0.5\n" * n)
        (split / f"{prefix}_X_Y.txt").write_text(f"{n} 2\n" + "1:1\n" * n)
    bow = BoWXMCDataModule(split, batch_size=8)
    batch = next(iter(bow.train_dataloader()))
    assert batch["feature_offsets"].tolist() == [0, 2, 4, 6] and batch["label_ids"].tolist() == [1, 1, 1]
    with pytest.raises(FileNotFoundError, match=r"train\.txt \(or train_X_Xf\.txt"):
        BoWXMCDataModule(tmp_path / "missing")


def test_lightning_trainer_drives_the_hooks(debtags: Debtags) -> None:
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self, num_labels: int) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, num_labels)
            self.seen: dict[str, set[str]] = {}

        def training_step(self, batch, batch_idx):
            self.seen["train"] = set(batch)
            return self.layer(batch["attention_mask"].sum(1, keepdim=True).float()).mean()

        def validation_step(self, batch, batch_idx):
            self.seen["val"] = set(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Debtags(tokenizer=debtags.tokenizer_name, cache_dir=debtags.cache_root, max_length=24, batch_size=8)
    probe = Probe(module.num_labels)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(probe, datamodule=module)
    keys = {"input_ids", "attention_mask", "label_ids", "label_offsets", "doc_index"}
    assert probe.seen == {"train": keys, "val": keys}


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "data.py"
    result = subprocess.run([sys.executable, str(script), "--lines", "3000", "--no-debtags", "--json"],
                            capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["phase"] for r in rows] == ["first", "cached", "loader"]
    assert rows[0]["docs"] == 3000 + 1000 and rows[2]["docs"] == 3000
    assert all(r["docs_per_s"] > 0 and r["peak_rss_mb"] >= r["peak_anon_mb"] > 0 for r in rows)
