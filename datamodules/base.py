"""Behaviour shared by every XMC DataModule: loaders, the validation split, propensity constants and scores.

Validation policy. With ``val_fraction > 0`` a fixed-seed random subset of the training documents becomes the
validation split (disjoint from train, the same for the same seed and file). The paper benchmarks ship no
validation split (``val_fraction = 0``); then, by default (``val_on_test=True``), validation runs on the test split,
which is the published protocol of these benchmarks (AttentionXML/LightXML report test metrics during training). It
is logged once, because picking a checkpoint on it is selection on test. ``val_on_test=False`` gives no validation
loader at all.

Loaders are :class:`ResumableDataLoader`: the training order of an epoch is a function of a seed and the epoch, and
the loader's ``state_dict`` (which Lightning stores in every checkpoint) says how many batches of the epoch were
consumed, so a run resumed from a mid-epoch checkpoint sees exactly the remaining batches in the same order. No
loader draws from the global torch generator while training (the shuffle seed is the ``seed_everything`` seed),
so validation does not shift the random stream that dropout uses.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

log = logging.getLogger(__name__)

XC_REPOSITORY = "the Extreme Classification Repository, http://manikvarma.org/downloads/XC/XMLRepository.html"


@dataclass(frozen=True)
class PublishedStats:
    """Published statistics of a benchmark: document counts and label count (train + test)."""

    train_docs: int
    test_docs: int
    num_labels: int


def check_sizes(owner: str, **sizes: int | None) -> None:
    """Sizes (``batch_size``, ``max_length``, ...) must be positive integers where given: a batch of 0 documents
    fails deep inside the DataLoader, or trains nothing."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r} (--data.init_args.{name})")


def split_indices(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) document indices: a fixed-seed random ``val_fraction`` of ``range(num_docs)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    permutation = np.random.default_rng(seed).permutation(num_docs)
    num_val = int(round(num_docs * val_fraction))
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])


def _default_seed() -> int:
    """The ``seed_everything`` seed (``PL_GLOBAL_SEED``, as Lightning's ``DistributedSampler``), so that a resumed
    process shuffles as the killed one even where the checkpoint holds no loader state (saved at an epoch end);
    without it a draw from the global torch generator."""
    if os.environ.get("PL_GLOBAL_SEED", "").lstrip("-").isdigit():
        return int(os.environ["PL_GLOBAL_SEED"])
    return int(torch.randint(0, 2**62, (1,)).item())


class EpochRandomSampler(RandomSampler):
    """A random permutation per epoch that depends only on ``seed + epoch`` (as ``DistributedSampler``).

    ``set_epoch`` picks the epoch (Lightning calls it before every epoch); each pass then moves to the next epoch,
    so that a plain loop without ``set_epoch`` also gets a new order every pass. A ``RandomSampler``, so that
    Lightning still sees a shuffled loader (and swaps in its ``DistributedSampler`` under DDP).
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0
        self.drawn_epoch: int | None = None  # epoch of the permutation being served

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        self.drawn_epoch, self.epoch = self.epoch, self.epoch + 1
        generator = torch.Generator().manual_seed(self.seed + self.drawn_epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class _SkipFirst:
    """An index sampler whose next pass (only) leaves out its first ``skip`` items; its length stays the same."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[Any]:
        # Taken at the first item: DataLoader iterators call iter() and may drop the result unused, and persistent
        # workers iterate this same object again next epoch.
        skip, self.skip = self.skip, 0
        yield from itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


class _CountingIterator:
    """Counts the batches a loader hands out in the current pass (no prefetching in Lightning: the loader has a
    length, so the count is the number of batches the training loop took)."""

    def __init__(self, iterator: Any, loader: ResumableDataLoader) -> None:
        self.iterator, self.loader = iterator, loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader.batches_served += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch (it has ``state_dict``/``load_state_dict``).

    ``shuffle=True`` uses an :class:`EpochRandomSampler` seeded with ``seed`` (default: the ``seed_everything``
    seed, else a draw from the global torch generator), the workers' base seed comes from a private generator. The
    state is the shuffle seed, the epoch of the current pass and the batches served in it; loading a mid-pass state
    makes the next pass serve the rest of that epoch's order (the skipped batches are never loaded), a state at a
    pass boundary starts the next epoch.
    Any other sampler (e.g. Lightning's ``DistributedSampler``) is resumed the same way through its ``epoch``.
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: Any = None, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        seed = _default_seed() if seed is None else int(seed)
        if shuffle and sampler is None and kwargs.get("batch_sampler") is None:
            sampler, shuffle = EpochRandomSampler(dataset, seed), None
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        super().__init__(dataset, batch_size, shuffle, sampler, *args, **kwargs)
        self.seed = seed
        self.batches_served = 0
        self._pass_started = False
        self._skip = 0

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def _epoch_sampler(self) -> Sampler | None:
        sampler = self.sampler if self.batch_sampler is None else getattr(self.batch_sampler, "sampler", None)
        return sampler if callable(getattr(sampler, "set_epoch", None)) else None

    def __iter__(self) -> _CountingIterator:
        iterator = super().__iter__()  # takes _index_sampler, i.e. the skip of a loaded state
        self.batches_served, self._skip, self._pass_started = self._skip, 0, True
        return _CountingIterator(iterator, self)

    def state_dict(self) -> dict[str, Any]:
        sampler = self._epoch_sampler()
        epoch = getattr(sampler, "drawn_epoch", None)  # the epoch being served; else the sampler's own
        if epoch is None:
            epoch = getattr(sampler, "epoch", None)
        return {"seed": self.seed, "epoch": epoch, "batches": self.batches_served if self._pass_started else 0,
                "length": len(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = self._epoch_sampler()
        if isinstance(sampler, EpochRandomSampler):
            sampler.seed = int(state_dict["seed"])
        self.seed = int(state_dict["seed"])
        batches, epoch = int(state_dict["batches"]), state_dict.get("epoch")
        if int(state_dict["length"]) != len(self):
            raise ValueError(f"the checkpoint's training loader had {state_dict['length']} batches, this one has "
                             f"{len(self)}: resume with the data and batch size the checkpoint was trained with")
        if 0 < batches < len(self):  # mid-pass: the rest of that epoch
            self._skip = batches
        elif epoch is not None and batches:  # the pass had ended: the next epoch
            epoch += 1
        if sampler is not None and epoch is not None:
            sampler.set_epoch(int(epoch))


class XMCDataModule(L.LightningDataModule):
    """Base class: subclasses fill ``self._datasets`` (split -> torch Dataset) and provide the label attributes.

    The settings every DataModule shares are declared here only; subclasses take them as keyword arguments
    (``**kwargs``) and pass them on, so a yaml sets them the same way for every class.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_fraction: share of training documents carved out (fixed ``seed``) as validation; 0 = none.
        seed: seed of the validation split.
        val_on_test: with ``val_fraction=0``, validate on the test split (True) or not at all (False).
        propensity_a, propensity_b: constants (A, B) of the propensity model of the PS metrics.
    """

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
        check_sizes(type(self).__name__, batch_size=batch_size, eval_batch_size=eval_batch_size)
        if num_workers < 0:
            raise ValueError(f"{type(self).__name__}: num_workers must be >= 0, got {num_workers}")
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

    @property
    def validates(self) -> bool:
        """Whether a validation loop runs: on a held-out split (``val_fraction > 0``) or on the test split."""
        return self.val_fraction > 0 or self.val_on_test

    @property
    def label_keys(self) -> list[str]:
        """The strings a label-cluster file names the labels by, one per label id (default: ``label_names``)."""
        return self.label_names

    def _collate(self, split: str):
        raise NotImplementedError

    def _ensure_split(self, split: str) -> None:
        """Make ``self._datasets[split]`` available (subclasses open or build what is needed)."""
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> ResumableDataLoader:
        self._ensure_split(split)
        return ResumableDataLoader(
            self._datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collate(split),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            seed=None if shuffle else self.seed,  # shuffled: the seed_everything seed
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_fraction > 0:
            return self._loader("val", shuffle=False)
        if not self.validates:
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
