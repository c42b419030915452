"""Tiny datasets written in the published layouts of the benchmarks the shipped configs name.

Each writer puts a small folder (tens of documents, a dozen labels) where a user would put the download
(``data/<Name>`` for the paper's benchmarks), with the real file names and conventions, and returns what it wrote
(:class:`Written`), so that tests compare what the DataModules read against the writer's own bookkeeping.

Layouts and the conventions kept:

* raw text (AttentionXML / LightXML downloads of Wiki10-31K, Amazon-670K, Wiki-500K): ``train_raw_texts.txt``,
  ``test_raw_texts.txt`` beside the NLTK-tokenised ``train_texts.txt``, ``test_texts.txt`` (lower case, tokens
  split by spaces), ``train_labels.txt``, ``test_labels.txt`` with space-separated labels that are integers written
  as strings (so sorting them as strings, what the vocabulary does, differs from sorting them as numbers); test labels
  that never occur in training (the published label counts are over train and test, which is why LightXML builds its
  label map from both files), a test document whose every label is such a one, an empty text (LightXML encodes
  empty texts as "filling empty") and characters that ``str.splitlines`` would split on (U+2028, U+0085) inside a
  document. Where the authors ship clusters for the auxiliary head, ``label_group0.npy`` as theirs: an object array
  with one array of label-name strings per cluster, over train and test labels.
* Debtags (shipped): ``train_texts.txt``/``test_texts.txt`` ("package: description") and facet labels
  (``facet::tag``), three of them in test only.
* Extreme Classification Repository sparse format (Bibtex, Delicious): ``train.txt``/``test.txt`` with the header
  ``N F L`` and lines ``l1,l2 f:v f:v`` with a trailing space; a point without labels starts with a space.
* LF (LF-AmazonTitles-131K): ``trn.json.gz``, ``tst.json.gz`` (JSON lines: ``uid``, ``title``, ``content``,
  ``target_ind``, ``target_rel``), ``lbl.json.gz`` (``uid``, ``title``, ``content``), ``filter_labels_train.txt``
  and ``filter_labels_test.txt`` (``doc label`` pairs: a document that is itself a label), a label that only test
  documents have, titles with non-ASCII characters and HTML entities, and the authors' ``label_group0.npy`` (label
  ids written as strings).
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = ["python", "game", "network", "data", "file", "library", "tool", "audio", "video", "kernel", "font", "mail",
         "shell", "editor", "science", "driver"]


@dataclass
class Written:
    """What a writer put in ``directory``: split sizes, the labels the model must get (the training labels, or
    every label of an LF label file), the test labels that training never saw, and the cluster of each label
    when a cluster file was written."""

    directory: Path
    train_docs: int
    test_docs: int
    label_names: list[str]  # in the order the DataModule must number them
    unseen_test_labels: int = 0
    clusters: dict[str, int] | None = None  # label name -> cluster, for the labels in label_names


def _doc_labels(rng: random.Random, names: list[str], count: int) -> list[list[str]]:
    """Two or three labels per document; every label occurs at least once."""
    docs = [rng.sample(names, rng.randint(2, 3)) for _ in range(count)]
    for i, name in enumerate(names):
        if all(name not in d for d in docs):
            docs[i % count].append(name)
    return docs


def _text_of(labels: list[str], vocabulary: dict[str, str], rng: random.Random) -> str:
    words = [vocabulary[label] for label in labels if label in vocabulary] + rng.sample(WORDS, 3)
    return " ".join(words)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))


def _save_groups(path: Path, groups: list[list[str]]) -> None:
    array = np.empty(len(groups), dtype=object)
    for i, group in enumerate(groups):
        array[i] = np.array(group)
    np.save(path, array, allow_pickle=True)


def write_raw_text(directory: Path, *, clusters: bool, train: int = 40, test: int = 12, seed: int = 0) -> Written:
    """The AttentionXML / LightXML raw-text download (see the module docstring); ``clusters``: the authors'
    ``label_group0.npy`` too."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in (3, 7, 12, 25, 40, 105, 230, 999, 1024, 4711, 8356, 20001)]
    unseen = ["77", "100000"]
    vocabulary = {name: WORDS[i] for i, name in enumerate(names)}
    splits = {"train": _doc_labels(rng, names, train), "test": _doc_labels(rng, names, test)}
    splits["test"][1].append(unseen[0])
    splits["test"][2] = [unseen[1]]  # every label of this document is unseen in training
    raw: dict[str, list[str]] = {}
    for split, docs in splits.items():
        raw[split] = [_text_of(labels, vocabulary, rng).title() + "." for labels in docs]
    raw["train"][3] = ""  # an empty document
    raw["train"][5] = raw["train"][5].replace(" ", "\u2028", 1)  # a line separator inside a document
    raw["test"][4] = raw["test"][4].replace(" ", " \u0085 ", 1)
    for split, docs in splits.items():
        _write_lines(directory / f"{split}_raw_texts.txt", raw[split])
        _write_lines(directory / f"{split}_texts.txt", [" ".join(t.lower().replace(".", " .").split())
                                                          for t in raw[split]])
        _write_lines(directory / f"{split}_labels.txt", [" ".join(labels) for labels in docs])
    written = Written(directory, train, test, sorted(names), unseen_test_labels=len(unseen))
    if clusters:
        everything = sorted(names + unseen)
        groups = [everything[0::3], everything[1::3], everything[2::3]]
        _save_groups(directory / "label_group0.npy", groups)
        written.clusters = {name: i for i, group in enumerate(groups) for name in group if name in names}
    return written


def write_debtags(directory: Path, train: int = 40, test: int = 12, seed: int = 0) -> Written:
    """Debtags' layout: ``*_texts.txt`` ("package: description") and ``facet::tag`` labels."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(f"{facet}::{tag}" for facet, tag in [
        ("role", "program"), ("role", "shared-lib"), ("use", "gameplaying"), ("implemented-in", "python"),
        ("devel", "lang:python"), ("works-with", "file"), ("protocol", "ip"), ("interface", "x11"),
        ("uitoolkit", "sdl"), ("game", "strategy")])
    vocabulary = {name: WORDS[i] for i, name in enumerate(names)}
    unseen = ["hardware::storage:cd", "x11::font", "made-of::html"]
    splits = {"train": _doc_labels(rng, names, train), "test": _doc_labels(rng, names, test)}
    for i, label in enumerate(unseen):
        splits["test"][i].append(label)
    for split, docs in splits.items():
        texts = [f"pkg{i}-{split}: {_text_of(labels, vocabulary, rng)}" for i, labels in enumerate(docs)]
        _write_lines(directory / f"{split}_texts.txt", texts)
        _write_lines(directory / f"{split}_labels.txt", [" ".join(sorted(labels)) for labels in docs])
    return Written(directory, train, test, names, unseen_test_labels=len(unseen))


def write_xc_sparse(directory: Path, num_features: int = 30, num_labels: int = 10, train: int = 40, test: int = 12,
                    seed: int = 0) -> Written:
    """The Extreme Classification Repository single-file sparse format, ``train.txt`` and ``test.txt``."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = [str(i) for i in range(num_labels)]
    for split, count in (("train", train), ("test", test)):
        docs = _doc_labels(rng, names, count)
        lines = [f"{count} {num_features} {num_labels}"]
        for i, labels in enumerate(docs):
            ids = sorted({int(label) for label in labels})
            features = sorted({2 * j + rng.randint(0, 1) for j in ids} | set(rng.sample(range(num_features), 3)))
            pairs = " ".join(f"{f}:{rng.choice([1, 2, 0.5])}" for f in features)
            label_part = "" if split == "test" and i == 0 else ",".join(map(str, ids))  # a point without labels
            lines.append(f"{label_part} {pairs} ")
        _write_lines(directory / f"{split}.txt", lines)
    return Written(directory, train, test, names)


def write_lf(directory: Path, train: int = 40, test: int = 12, seed: int = 0) -> Written:
    """The LF layout of LF-AmazonTitles-131K (see the module docstring)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    titles = ["Python Cookbook", "Game of Thrones &amp; Dragons", "Network Cable 5m", "Data Science Handbook",
              "File Organizer", "Library Card Holder", "Tool Set (42 pieces)", "Audio Cable \u00e9l\u00e9gant",
              "Video Tape", "Kernel Hacking", "Font Book", "Mail Box \u2013 Black"]
    labels = [{"uid": f"B00{i:07d}", "title": title, "content": ""} for i, title in enumerate(titles)]
    test_only = len(titles) - 1  # a label that no training document has
    ids = [str(i) for i in range(test_only)]
    vocabulary = {str(i): WORDS[i] for i in range(len(titles))}

    def records(count: int, split: str) -> list[dict]:
        docs = _doc_labels(rng, ids, count)
        if split == "tst":
            docs[0].append(str(test_only))
        out = []
        for i, doc in enumerate(docs):
            targets = sorted({int(t) for t in doc})
            out.append({"uid": f"{split}{i:05d}", "title": _text_of(doc, vocabulary, rng).capitalize(),
                        "content": "", "target_ind": targets, "target_rel": [1.0] * len(targets)})
        return out

    trn, tst = records(train, "trn"), records(test, "tst")
    for name, rows in (("trn", trn), ("tst", tst), ("lbl", labels)):
        with gzip.open(directory / f"{name}.json.gz", "wt", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    _write_lines(directory / "filter_labels_train.txt", ["0 4", "7 2"])
    _write_lines(directory / "filter_labels_test.txt", ["1 3", "5 0", "5 9"])
    groups = [[str(i) for i in range(len(titles)) if i % 3 == g] for g in range(3)]
    _save_groups(directory / "label_group0.npy", groups)
    return Written(directory, train, test, titles, clusters={titles[i]: i % 3 for i in range(len(titles))})


LayoutWriter = Callable[[Path], Written]
