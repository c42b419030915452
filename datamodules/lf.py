"""LF-format XMC DataModule (LF-AmazonTitles-131K and the other "label features" datasets).

Files in ``data_dir``: ``trn.json.gz``, ``tst.json.gz`` (JSON lines with ``uid``, ``title``, ``content``,
``target_ind``, ``target_rel``), ``lbl.json.gz`` (one JSON line per label: ``uid``, ``title``, ``content``) and
``filter_labels_test.txt`` (lines ``doc_index label_index``: reciprocal pairs, a test document that is itself a label,
to drop from predictions before scoring). Plain ``.json`` files work too.

Label ids are the ``target_ind`` values, i.e. line numbers of ``lbl.json.gz``; ``label_names`` are the label titles.
Text is the title, optionally followed by the content (``use_content=True``). With ``label_documents=True`` every
label's title is also a training document whose only label is itself (the SPARTEX authors' ``augment_label_data``,
after Renee/NGAME): it comes after the training file's documents (``doc_index`` = lines of ``trn`` + label id), so
every label, those that only test documents have included, is seen in training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import XC_REPOSITORY
from .formats import DataFormatError, count_lines, iter_json_lines, lf_targets, read_filter_pairs, resolve
from .resources import missing_data_error
from .text import TokenizedTextDataModule

log = logging.getLogger(__name__)


def record_text(path: str, number: int, record: dict, use_content: bool) -> str:
    """The text of an LF record: its title, then its content with ``use_content``."""
    title, content = record.get("title"), record.get("content") or ""
    if not isinstance(title, str) or not isinstance(content, str):
        raise DataFormatError(path, number, "string 'title' and 'content' fields", json.dumps(record)[:80])
    return f"{title} {content}".strip() if use_content and content else title


def lf_docs(json_path: str, num_labels: int, use_content: bool, stats_path: str,
            label_path: str | None = None) -> Iterator[dict[str, Any]]:
    """Documents of an LF split as ``{"doc_index", "text", "label_ids"}``, then (``label_path``) one document per
    label of the label file; writes the counts of both at the end (the published statistics count the first)."""
    docs = label_docs = 0
    for number, record in iter_json_lines(json_path, ("title", "target_ind")):
        targets = lf_targets(json_path, number, record, num_labels)
        docs += 1
        yield {
            "doc_index": number - 1,
            "text": record_text(json_path, number, record, use_content),
            "label_ids": list(dict.fromkeys(targets)),
        }
    if label_path is not None:
        for number, record in iter_json_lines(label_path, ("title",)):
            label_docs += 1
            yield {"doc_index": docs + number - 1, "text": record_text(label_path, number, record, use_content),
                   "label_ids": [number - 1]}
    Path(stats_path).write_text(json.dumps({"docs": docs, "label_documents": label_docs}), encoding="utf-8")


class LFXMCDataModule(TokenizedTextDataModule):
    """XMC DataModule over the LF layout; ``filter_pairs`` (LongTensor [n, 2]) feeds the metrics' filtering.

    Args:
        data_dir: folder with the LF files (see module docstring).
        max_length: tokens per title (or title and content).
        use_content: append the content to the title.
        filter_file: name of the reciprocal-pair file in ``data_dir``; when it is absent ``filter_pairs`` is empty.
        label_documents: add every label's title as a training document labelled with itself (see the module
            docstring).
        **kwargs: ``tokenizer``, ``cache_dir``, ... of :class:`~datamodules.text.TokenizedTextDataModule` and the
            shared settings of :class:`~datamodules.base.XMCDataModule`.
    """

    source_hint: str = f"LF datasets are published in {XC_REPOSITORY}."
    default_name: str | None = None

    def __init__(self, data_dir: str | Path, max_length: int = 32, use_content: bool = False,
                 filter_file: str = "filter_labels_test.txt", label_documents: bool = False, **kwargs: Any) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.use_content = use_content
        self.label_documents = label_documents
        self.files = self._resolve_files()
        self.filter_file = resolve(self.data_dir / filter_file)
        super().__init__(max_length=max_length, **kwargs)
        self._filter_pairs: torch.Tensor | None = None

    @property
    def dataset_name(self) -> str:
        return self.default_name or self.data_dir.resolve().name

    def _resolve_files(self) -> dict[str, Path]:
        files = {}
        for role in ("trn", "tst", "lbl"):
            files[role] = resolve(self.data_dir / f"{role}.json.gz") or resolve(self.data_dir / f"{role}.json")
        missing = [f"{role}.json.gz" for role, path in files.items() if path is None]
        if missing:
            raise missing_data_error(type(self).__name__, self.data_dir, missing,
                                     "the LF layout: trn.json.gz, tst.json.gz, lbl.json.gz (JSON lines) and "
                                     "filter_labels_test.txt", self.source_hint)
        return files  # type: ignore[return-value]

    def _source_files(self) -> dict[str, Path]:
        return self.files

    def _fingerprint_extra(self) -> dict[str, Any]:
        return {"use_content": self.use_content, "label_documents": self.label_documents}

    def _scan_labels(self) -> tuple[list[str], np.ndarray, int]:
        lbl = self.files["lbl"]
        names = [record_text(str(lbl), number, record, False) for number, record in iter_json_lines(lbl, ("title",))]
        counts = np.zeros(len(names), dtype=np.int64)
        docs = 0
        trn = self.files["trn"]
        for number, record in iter_json_lines(trn, ("title", "target_ind")):
            counts[list(set(lf_targets(trn, number, record, len(names))))] += 1
            docs += 1
        if self.label_documents:
            counts += 1
            docs += len(names)
        return names, counts, docs

    def _generator(self, split: str, vocab_path: Path, stats_path: Path) -> tuple[Callable, dict[str, Any]]:
        kwargs = {
            "json_path": str(self.files["trn" if split == "train" else "tst"]),
            "num_labels": self.num_labels,
            "use_content": self.use_content,
            "stats_path": str(stats_path),
            "label_path": str(self.files["lbl"]) if self.label_documents and split == "train" else None,
        }
        return lf_docs, kwargs

    @property
    def label_keys(self) -> list[str]:
        """Label ids as strings: how the authors' ``label_group*.npy`` files of LF data name labels."""
        return [str(i) for i in range(self.num_labels)]

    @property
    def filter_pairs(self) -> torch.Tensor:
        """Reciprocal (test doc_index, label_index) pairs to drop from predictions before scoring, LongTensor [n, 2]."""
        if self._filter_pairs is None:
            if self.filter_file is None:
                log.info("%s: no filter file; filter_pairs is empty", self.dataset_name)
                pairs = np.zeros((0, 2), dtype=np.int64)
            else:
                pairs = read_filter_pairs(self.filter_file, count_lines(self.files["tst"]), self.num_labels)
            self._filter_pairs = torch.from_numpy(pairs)
        return self._filter_pairs
