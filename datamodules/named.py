"""Named DataModules: the paper's benchmarks and the datasets shipped with the package, with their defaults.

Each is data on top of a layout's DataModule (:class:`NamedDataset`): its published statistics (train / test
documents, labels over train+test; a warning is issued when the files found differ), its propensity constants
(A, B) of Jain et al. (2016) and where its files live. The paper's datasets are not shipped: point ``data_dir`` at
the AttentionXML/LightXML download. A missing folder or file fails in ``__init__``, before any model is built, with
a message naming the folder, the files and where they are published.

Raw-text benchmarks read ``*_raw_texts.txt`` where both splits have it (as LightXML does for Wiki10-31K), else
``*_texts.txt``; ``max_length`` is 128 for all three, as in the authors' configurations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmc_dst.paths import shipped_dir

from .base import XC_REPOSITORY, PublishedStats
from .bow import BoWXMCDataModule
from .lf import LFXMCDataModule
from .raw_text import RawTextXMCDataModule


class NamedDataset:
    """A DataModule of one known dataset: its folder and propensity constants are class data, the defaults of
    ``data_dir`` and ``propensity_a``/``propensity_b`` (null in a yaml: these). Mixed in before the layout's class.

    Class attributes: ``default_dir`` (the folder), ``propensity`` ((A, B)), ``published`` (:class:`PublishedStats`),
    ``source_hint`` (where the files are published, for the missing-file error), ``default_name`` (cache folder and
    the run name of its config). A ``data_dir`` that is not the dataset's folder (:meth:`holds_own_data`) is a
    user's own data read with the dataset's settings: its cache is named after the folder, and the published
    statistics are not compared with it.

    Args:
        data_dir: the dataset's folder (null: ``default_dir``, the shipped copy or ``data/<name>``).
        propensity_a, propensity_b: constants (A, B) of the propensity model (null: the dataset's published ones).
        **kwargs: the arguments of the layout's DataModule.
    """

    default_dir: str | Path
    propensity: tuple[float, float] = (0.55, 1.5)

    default_name: str | None = None

    def __init__(self, data_dir: str | Path | None = None, propensity_a: float | None = None,
                 propensity_b: float | None = None, **kwargs: Any) -> None:
        if data_dir is not None and not self.holds_own_data(data_dir):
            # a user's own folder under this dataset's settings: not this dataset, so neither its cache name nor
            # its published statistics apply
            self.published, self.default_name = None, None
        a, b = self.propensity
        super().__init__(data_dir if data_dir is not None else self.default_dir,
                         propensity_a=a if propensity_a is None else propensity_a,
                         propensity_b=b if propensity_b is None else propensity_b, **kwargs)


    @classmethod
    def holds_own_data(cls, data_dir: str | Path) -> bool:
        """Whether ``data_dir`` is this dataset's folder: its default folder, or a folder of the same name (a
        download kept elsewhere)."""
        folder, default = Path(data_dir).expanduser().resolve(), Path(cls.default_dir).expanduser().resolve()
        return folder == default or folder.name.lower() == default.name.lower()


def _published_in(name: str) -> str:
    return f"{name} is published in {XC_REPOSITORY} (raw texts as prepared for AttentionXML/LightXML)."


class Wiki10_31K(NamedDataset, RawTextXMCDataModule):
    """Wiki10-31K: 14,146 train / 6,616 test documents, 30,938 labels; (A, B) = (0.55, 1.5)."""

    published, propensity = PublishedStats(14_146, 6_616, 30_938), (0.55, 1.5)
    default_dir, default_name, source_hint = "data/Wiki10-31K", "wiki10-31k", _published_in("Wiki10-31K")


class Amazon670K(NamedDataset, RawTextXMCDataModule):
    """Amazon-670K: 490,449 train / 153,025 test documents, 670,091 labels; (A, B) = (0.6, 2.6)."""

    published, propensity = PublishedStats(490_449, 153_025, 670_091), (0.6, 2.6)
    default_dir, default_name, source_hint = "data/Amazon-670K", "amazon-670k", _published_in("Amazon-670K")


class Wiki500K(NamedDataset, RawTextXMCDataModule):
    """Wiki-500K: 1,779,881 train / 769,421 test documents, 501,008 labels; (A, B) = (0.5, 0.4)."""

    published, propensity = PublishedStats(1_779_881, 769_421, 501_008), (0.5, 0.4)
    default_dir, default_name, source_hint = "data/Wiki-500K", "wiki-500k", _published_in("Wiki-500K")


class LFAmazonTitles131K(NamedDataset, LFXMCDataModule):
    """LF-AmazonTitles-131K: 294,805 train / 134,835 test titles, 131,073 labels; (A, B) = (0.6, 2.6)."""

    published, propensity = PublishedStats(294_805, 134_835, 131_073), (0.6, 2.6)
    default_dir, default_name = "data/LF-AmazonTitles-131K", "lf-amazontitles-131k"
    source_hint = f"LF-AmazonTitles-131K is published in {XC_REPOSITORY}."


class Debtags(NamedDataset, RawTextXMCDataModule):
    """Debtags, shipped (Debian package descriptions -> debtags): 24,227 / 6,069 documents, 598 labels.

    595 labels occur in training (the vocabulary); 6 test occurrences of the other 3 are dropped. See SOURCE.md.
    """

    published, default_dir, default_name = PublishedStats(24_227, 6_069, 598), shipped_dir("debtags"), "debtags"
    source_hint = "Debtags ships inside the package under datamodules/shipped/debtags (see its SOURCE.md)."


class DebianFiles(NamedDataset, RawTextXMCDataModule):
    """DebianFiles, shipped (Debian package descriptions -> names of the files each package installs): 34,806 /
    8,652 documents, 55,977 labels, 53,024 of them in training. Built by ``benchmarks/debian_files.py``; see
    its SOURCE.md."""

    published = PublishedStats(34_806, 8_652, 55_977)
    default_dir, default_name = shipped_dir("debian-files"), "debian-files"
    source_hint = "DebianFiles ships inside the package under datamodules/shipped/debian-files (see its SOURCE.md)."


class Bibtex(NamedDataset, BoWXMCDataModule):
    """Bibtex, shipped (XC sparse format): 4,880 / 2,515 documents, 1,836 features, 159 labels."""

    published, default_dir, default_name = PublishedStats(4_880, 2_515, 159), shipped_dir("bibtex"), "bibtex"
    source_hint = "Bibtex ships inside the package under datamodules/shipped/bibtex (see its SOURCE.md)."


class Delicious(NamedDataset, BoWXMCDataModule):
    """Delicious, shipped (XC sparse format): 12,920 / 3,185 documents, 500 features, 983 labels."""

    published, default_dir, default_name = PublishedStats(12_920, 3_185, 983), shipped_dir("delicious"), "delicious"
    source_hint = "Delicious ships inside the package under datamodules/shipped/delicious (see its SOURCE.md)."
