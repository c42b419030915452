"""Behaviour shared by every XMC DataModule: loaders, the validation split, propensity constants and scores.

Validation policy. With ``val_fraction > 0`` a fixed-seed random subset of the training documents becomes the
validation split (disjoint from train, the same for the same seed and file). The paper benchmarks ship no
validation split (``val_fraction = 0``); then, by default (``val_on_test=True``), validation runs on the test split,
which is the published protocol of these benchmarks (AttentionXML/LightXML report test metrics during training). It
is logged once, because picking a checkpoint on it is selection on test. ``val_on_test=False`` gives no validation
loader at all.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

XC_REPOSITORY = "the Extreme Classification Repository, http://manikvarma.org/downloads/XC/XMLRepository.html"


@dataclass(frozen=True)
class PublishedStats:
    """Published statistics of a benchmark: document counts and label count (train + test)."""

    train_docs: int
    test_docs: int
    num_labels: int


def split_indices(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) document indices: a fixed-seed random ``val_fraction`` of ``range(num_docs)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    permutation = np.random.default_rng(seed).permutation(num_docs)
    num_val = int(round(num_docs * val_fraction))
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])


def jain_propensity(label_counts: torch.Tensor, num_docs: int, a: float, b: float) -> torch.Tensor:
    """Propensity scores of Jain et al. (2016): ``1 / (1 + C (N_l + B)^-A)``, ``C = (log N - 1) (B + 1)^A``."""
    c = (math.log(num_docs) - 1.0) * (b + 1.0) ** a
    return 1.0 / (1.0 + c * torch.exp(-a * torch.log(label_counts.double() + b))).float()


class XMCDataModule(L.LightningDataModule):
    """Base class: subclasses fill ``self._datasets`` (split -> torch Dataset) and provide the label attributes."""

    published: PublishedStats | None = None

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        seed: int = 42,
        val_on_test: bool = True,
        propensity_a: float = 0.55,
        propensity_b: float = 1.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.val_on_test = val_on_test
        self.propensity_a = float(propensity_a)
        self.propensity_b = float(propensity_b)
        self._datasets: dict[str, Dataset] = {}
        self._val_on_test_logged = False

    # Subclasses provide these.
    num_labels: int
    label_names: list[str]
    train_label_counts: torch.Tensor
    num_train_docs: int

    def propensity(self) -> torch.Tensor:
        """Per-label propensity scores from the training label counts and (``propensity_a``, ``propensity_b``)."""
        return jain_propensity(self.train_label_counts, self.num_train_docs, self.propensity_a, self.propensity_b)

    def _collate(self, split: str):
        raise NotImplementedError

    def _ensure_split(self, split: str) -> None:
        """Make ``self._datasets[split]`` available (subclasses open or build what is needed)."""
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self._ensure_split(split)
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collate(split),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_fraction > 0:
            return self._loader("val", shuffle=False)
        if not self.val_on_test:
            return []
        if not self._val_on_test_logged:
            log.info("%s: no validation split (val_fraction=0); validating on the test split", type(self).__name__)
            self._val_on_test_logged = True
        return self._loader("test", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    def _check_published(self, train_docs: int, test_docs: int, num_labels: int) -> None:
        """Warn when the files found differ from the published statistics of a named benchmark."""
        if self.published is None:
            return
        found = PublishedStats(train_docs, test_docs, num_labels)
        if found != self.published:
            warnings.warn(
                f"{type(self).__name__}: the files found have train/test/labels = "
                f"{found.train_docs:,}/{found.test_docs:,}/{found.num_labels:,}, the published statistics are "
                f"{self.published.train_docs:,}/{self.published.test_docs:,}/{self.published.num_labels:,}",
                UserWarning,
                stacklevel=3,
            )
