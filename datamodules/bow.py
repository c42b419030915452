"""Bag-of-words XMC DataModule over the Extreme Classification Repository sparse format.

A split named S in ``data_dir`` is either the single file ``S.txt`` (header ``N F L``) or the pair ``S_X_Xf.txt``
(features, header ``N F``) + ``S_X_Y.txt`` (labels, header ``N L``); any of them may be ``.gz``. Split names default
to ``train``/``test``, then ``trn``/``tst``. The matrices are parsed once in ``setup`` and kept in memory as CSR
arrays (BoW datasets are small next to their text versions); label ids are the file's, so ``num_labels`` is the
header's L, and ``label_names.txt`` / ``feature_names.txt`` (one name per line) are used when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import XC_REPOSITORY, XMCDataModule, split_indices
from .collate import BowCollate, SparseRows, gather_csr
from .formats import DataFormatError, SparseXC, iter_lines, read_xc_single, read_xc_split, resolve
from .resources import missing_data_error


def find_split(data_dir: Path, name: str) -> tuple[Path, ...] | None:
    """``(S.txt,)`` or ``(S_X_Xf.txt, S_X_Y.txt)`` for split ``name``, whichever exists (``.gz`` allowed)."""
    single = resolve(data_dir / f"{name}.txt")
    if single is not None:
        return (single,)
    features, labels = resolve(data_dir / f"{name}_X_Xf.txt"), resolve(data_dir / f"{name}_X_Y.txt")
    return (features, labels) if features is not None and labels is not None else None


def read_split(files: tuple[Path, ...]) -> SparseXC:
    """Read a split found by :func:`find_split`."""
    return read_xc_single(files[0]) if len(files) == 1 else read_xc_split(*files)


def read_names(path: Path, expected: int, what: str) -> list[str]:
    """One name per line, stripped of surrounding whitespace; the count must match the header's."""
    names = [line.strip() for _, line in iter_lines(path)]
    if len(names) != expected:
        raise DataFormatError(path, len(names), f"{expected} {what} names, one per line", f"{len(names)} lines")
    return names


class BoWXMCDataModule(XMCDataModule):
    """XMC DataModule of sparse bag-of-words features, batches as CSR (``feature_ids/values/offsets``).

    Args:
        data_dir: folder with the split files (see module docstring).
        train_split / test_split: split names (default: "train"/"test" if present, else "trn"/"tst").
        batch_size: training batch size (larger than text data's: a BoW step is cheap).
        **kwargs: the shared settings of :class:`~datamodules.base.XMCDataModule`.
    """

    source_hint: str = f"Sparse-format datasets are published in {XC_REPOSITORY}."

    def __init__(self, data_dir: str | Path, train_split: str | None = None, test_split: str | None = None,
                 batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.files = {
            "train": self._find(train_split, ("train", "trn")),
            "test": self._find(test_split, ("test", "tst")),
        }
        self._data: dict[str, SparseXC] = {}
        self._label_names: list[str] | None = None
        self.feature_names: list[str] | None = None

    def _find(self, name: str | None, defaults: tuple[str, ...]) -> tuple[Path, ...]:
        for candidate in (name,) if name else defaults:
            files = find_split(self.data_dir, candidate)
            if files is not None:
                return files
        names = (name,) if name else defaults
        expected = " or ".join(f"{n}.txt (or {n}_X_Xf.txt + {n}_X_Y.txt)" for n in names)
        raise missing_data_error(type(self).__name__, self.data_dir, [f"the {' / '.join(names)} split files"],
                                 f"{expected}, in the Extreme Classification Repository sparse format",
                                 self.source_hint)

    def _load(self) -> None:
        """Parse both splits (once) and check that they agree on the feature and label spaces."""
        if self._data:
            return
        train, test = read_split(self.files["train"]), read_split(self.files["test"])
        for attribute, which in (("num_features", 0), ("num_labels", -1)):
            expected, found = getattr(train, attribute), getattr(test, attribute)
            if expected != found:
                train_file, test_file = self.files["train"][which], self.files["test"][which]
                raise DataFormatError(test_file, 1, f"{attribute} = {expected} in the header, as in {train_file}",
                                      str(found))
        names = resolve(self.data_dir / "label_names.txt")
        self._label_names = read_names(names, train.num_labels, "label") if names else [
            str(i) for i in range(train.num_labels)
        ]
        features = resolve(self.data_dir / "feature_names.txt")
        self.feature_names = read_names(features, train.num_features, "feature") if features else None
        self._data = {"train": train, "test": test}
        self._rows = split_indices(train.num_docs, self.val_fraction, self.seed)
        self._check_published(train.num_docs, test.num_docs, train.num_labels)

    def prepare_data(self) -> None:
        """Nothing to download or cache: the files are parsed in ``setup``."""

    def setup(self, stage: str | None = None) -> None:
        self._load()

    @property
    def num_labels(self) -> int:
        self._load()
        return self._data["train"].num_labels

    @property
    def num_features(self) -> int:
        self._load()
        return self._data["train"].num_features

    @property
    def label_names(self) -> list[str]:
        self._load()
        return self._label_names

    @property
    def num_train_docs(self) -> int:
        self._load()
        return len(self._rows[0])

    @property
    def train_label_counts(self) -> torch.Tensor:
        """Label frequencies over the training rows actually used (validation rows excluded)."""
        self._load()
        data = self._data["train"]
        labels, _, _ = gather_csr(data.label_indptr, data.label_indices, data.label_values, self._rows[0])
        return torch.from_numpy(np.bincount(labels, minlength=data.num_labels).astype(np.int64))

    def split_data(self, split: str) -> SparseXC:
        """The parsed CSR arrays of the file behind ``split`` (train and val share the training file)."""
        self._load()
        return self._data["test" if split in ("test", "predict") else "train"]

    def _ensure_split(self, split: str) -> None:
        self._load()
        if split in self._datasets:
            return
        if split == "train":
            rows = self._rows[0]
        elif split == "val":
            if self.val_fraction == 0:
                raise ValueError("no validation split: val_fraction is 0")
            rows = self._rows[1]
        elif split in ("test", "predict"):
            rows = np.arange(self._data["test"].num_docs)
        else:
            raise ValueError(f"unknown split {split!r}")
        self._datasets[split] = SparseRows(rows)

    def _collate(self, split: str) -> BowCollate:
        return BowCollate(self.split_data(split))
