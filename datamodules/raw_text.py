"""Raw-text XMC DataModule for the AttentionXML / LightXML layout (Wiki10-31K, Amazon-670K, Wiki-500K, Debtags).

Files in ``data_dir`` (each may be gzip-compressed, ``.gz``): ``train_texts.txt``/``test_texts.txt`` (one document
per line) or their ``*_raw_texts.txt`` versions, and ``train_labels.txt``/``test_labels.txt`` (the document's label
strings separated by spaces, same line number; an empty line is a document without labels, which is kept).

Label vocabulary: the labels seen in the training file, sorted as strings (the order of scikit-learn's
``MultiLabelBinarizer`` used by AttentionXML and LightXML, so label ids agree with theirs); it does not depend on
line order. Test labels never seen in training are dropped from the targets, counted and logged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from .base import XC_REPOSITORY
from .formats import DataFormatError, count_lines, iter_label_lines, iter_lines, require_nonempty, resolve
from .resources import missing_data_error
from .text import TokenizedTextDataModule

TEXT_VARIANTS = ("auto", "raw", "plain")


def raw_text_docs(text_path: str, label_path: str, vocab_path: str, stats_path: str) -> Iterator[dict[str, Any]]:
    """Documents of one split as ``{"doc_index", "text", "label_ids"}``; writes drop statistics at the end."""
    vocab = {name: index for index, name in enumerate(json.loads(Path(vocab_path).read_text(encoding="utf-8")))}
    unseen: Counter[str] = Counter()
    docs = docs_with_unseen = 0
    for text_line, label_line in zip_longest(iter_lines(text_path), iter_label_lines(label_path)):
        if text_line is None or label_line is None:
            short, other, number = (
                (text_path, label_path, label_line[0]) if text_line is None else (label_path, text_path, text_line[0])
            )
            raise DataFormatError(short, number, f"a line for line {number} of {other}", "end of file")
        number, text = text_line
        ids, missing = [], 0
        for label in dict.fromkeys(label_line[1]):
            index = vocab.get(label)
            if index is None:
                unseen[label] += 1
                missing += 1
            else:
                ids.append(index)
        docs += 1
        docs_with_unseen += missing > 0
        yield {"doc_index": number - 1, "text": text, "label_ids": ids}
    stats = {
        "docs": docs,
        "unseen_label_occurrences": sum(unseen.values()),
        "unseen_labels": len(unseen),
        "docs_with_unseen_labels": docs_with_unseen,
    }
    Path(stats_path).write_text(json.dumps(stats), encoding="utf-8")


class RawTextXMCDataModule(TokenizedTextDataModule):
    """XMC DataModule over the raw-text layout, tokenised once into a memory-mapped Arrow cache.

    Args:
        data_dir: folder with the four files (see module docstring).
        text_variant: "raw" reads ``*_raw_texts.txt``, "plain" ``*_texts.txt``, "auto" raw where both exist.
        **kwargs: ``tokenizer``, ``max_length``, ``cache_dir``, ... of
            :class:`~datamodules.text.TokenizedTextDataModule` and the shared settings of
            :class:`~datamodules.base.XMCDataModule`.
    """

    source_hint: str = f"Datasets in this layout are published in {XC_REPOSITORY} (raw texts as in AttentionXML)."
    default_name: str | None = None

    def __init__(self, data_dir: str | Path, text_variant: str = "auto", **kwargs: Any) -> None:
        if text_variant not in TEXT_VARIANTS:
            raise ValueError(f"text_variant must be one of {TEXT_VARIANTS}, got {text_variant!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.text_variant = text_variant
        self.files = self._resolve_files()  # fail fast, before anything is loaded
        super().__init__(**kwargs)

    @property
    def dataset_name(self) -> str:
        return self.default_name or self.data_dir.resolve().name

    def _resolve_files(self) -> dict[str, Path]:
        """Find the split files (``.gz`` allowed); raise FileNotFoundError naming what is missing and where."""
        labels = {f"{split}_labels": resolve(self.data_dir / f"{split}_labels.txt") for split in ("train", "test")}
        raw = {f"{split}_texts": resolve(self.data_dir / f"{split}_raw_texts.txt") for split in ("train", "test")}
        plain = {f"{split}_texts": resolve(self.data_dir / f"{split}_texts.txt") for split in ("train", "test")}
        if self.text_variant == "raw" or (self.text_variant == "auto" and all(raw.values())):
            texts, text_names = raw, "train_raw_texts.txt, test_raw_texts.txt"
        else:
            texts = plain
            text_names = "train_texts.txt, test_texts.txt"
            if self.text_variant == "auto":
                text_names = "train_texts.txt, test_texts.txt (or train_raw_texts.txt, test_raw_texts.txt)"
        files = {**texts, **labels}
        missing = [f"{role.replace('_texts', '_raw_texts' if texts is raw else '_texts')}.txt"
                   for role, path in files.items() if path is None]
        if missing:
            raise missing_data_error(type(self).__name__, self.data_dir, missing,
                                     f"the raw-text XMC layout: {text_names}, train_labels.txt, test_labels.txt",
                                     self.source_hint)
        return files  # type: ignore[return-value]

    def _source_files(self) -> dict[str, Path]:
        return self.files

    def _validate_sources(self) -> None:
        for split in ("train", "test"):
            texts, labels = self.files[f"{split}_texts"], self.files[f"{split}_labels"]
            require_nonempty(texts, "one document per line")
            num_texts, num_labels = count_lines(texts), count_lines(labels)
            if num_texts != num_labels:
                short, other, number = (
                    (labels, texts, num_labels + 1) if num_labels < num_texts else (texts, labels, num_texts + 1)
                )
                raise DataFormatError(
                    short,
                    number,
                    f"as many lines as {other} ({max(num_texts, num_labels)}), one per document",
                    f"end of file after {number - 1} lines",
                )

    def _scan_labels(self) -> tuple[list[str], np.ndarray, int]:
        counter: Counter[str] = Counter()
        docs = 0
        for docs, labels in iter_label_lines(self.files["train_labels"]):  # noqa: B007 (docs = last line number)
            counter.update(set(labels))
        if not counter:
            raise DataFormatError(self.files["train_labels"], None, "space-separated label names on the lines of "
                                  "the training documents", f"{docs} lines without a label")
        names = sorted(counter)
        return names, np.array([counter[name] for name in names], dtype=np.int64), docs

    def _generator(self, split: str, vocab_path: Path, stats_path: Path) -> tuple[Callable, dict[str, Any]]:
        kwargs = {
            "text_path": str(self.files[f"{split}_texts"]),
            "label_path": str(self.files[f"{split}_labels"]),
            "vocab_path": str(vocab_path),
            "stats_path": str(stats_path),
        }
        return raw_text_docs, kwargs
