"""Named DataModules: the paper's benchmarks and the datasets shipped with the package, with their defaults.

Each knows its published statistics (train / test documents, labels over train+test; a warning is issued when the
files found differ), its propensity constants (A, B) of Jain et al. (2016), and where its files live. The paper's
datasets are not shipped: point ``data_dir`` at the AttentionXML/LightXML download. A missing folder or file fails in
``__init__``, before any model is built, with a message naming the folder, the files and where they are published.

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


def _published_in(name: str) -> str:
    return f"{name} is published in {XC_REPOSITORY} (raw texts as prepared for AttentionXML/LightXML)."


class Wiki10_31K(RawTextXMCDataModule):
    """Wiki10-31K: 14,146 train / 6,616 test documents, 30,938 labels; (A, B) = (0.55, 1.5)."""

    published = PublishedStats(14_146, 6_616, 30_938)
    default_name = "wiki10-31k"
    source_hint = _published_in("Wiki10-31K")

    def __init__(
        self,
        data_dir: str | Path = "data/Wiki10-31K",
        max_length: int = 128,
        text_variant: str = "auto",
        propensity_a: float = 0.55,
        propensity_b: float = 1.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, max_length=max_length, text_variant=text_variant, propensity_a=propensity_a,
                         propensity_b=propensity_b, **kwargs)


class Amazon670K(RawTextXMCDataModule):
    """Amazon-670K: 490,449 train / 153,025 test documents, 670,091 labels; (A, B) = (0.6, 2.6)."""

    published = PublishedStats(490_449, 153_025, 670_091)
    default_name = "amazon-670k"
    source_hint = _published_in("Amazon-670K")

    def __init__(
        self,
        data_dir: str | Path = "data/Amazon-670K",
        max_length: int = 128,
        text_variant: str = "auto",
        propensity_a: float = 0.6,
        propensity_b: float = 2.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, max_length=max_length, text_variant=text_variant, propensity_a=propensity_a,
                         propensity_b=propensity_b, **kwargs)


class Wiki500K(RawTextXMCDataModule):
    """Wiki-500K: 1,779,881 train / 769,421 test documents, 501,008 labels; (A, B) = (0.5, 0.4)."""

    published = PublishedStats(1_779_881, 769_421, 501_008)
    default_name = "wiki-500k"
    source_hint = _published_in("Wiki-500K")

    def __init__(
        self,
        data_dir: str | Path = "data/Wiki-500K",
        max_length: int = 128,
        text_variant: str = "auto",
        propensity_a: float = 0.5,
        propensity_b: float = 0.4,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, max_length=max_length, text_variant=text_variant, propensity_a=propensity_a,
                         propensity_b=propensity_b, **kwargs)


class LFAmazonTitles131K(LFXMCDataModule):
    """LF-AmazonTitles-131K: 294,805 train / 134,835 test titles, 131,073 labels; (A, B) = (0.6, 2.6)."""

    published = PublishedStats(294_805, 134_835, 131_073)
    default_name = "lf-amazontitles-131k"
    source_hint = f"LF-AmazonTitles-131K is published in {XC_REPOSITORY}."

    def __init__(
        self,
        data_dir: str | Path = "data/LF-AmazonTitles-131K",
        max_length: int = 32,
        propensity_a: float = 0.6,
        propensity_b: float = 2.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, max_length=max_length, propensity_a=propensity_a, propensity_b=propensity_b,
                         **kwargs)


class Debtags(RawTextXMCDataModule):
    """Debtags, shipped (Debian package descriptions -> debtags): 24,227 / 6,069 documents, 598 labels.

    595 labels occur in training (the vocabulary); 6 test occurrences of the other 3 are dropped. See SOURCE.md.
    """

    published = PublishedStats(24_227, 6_069, 598)
    default_name = "debtags"
    source_hint = "Debtags ships inside the package under datamodules/shipped/debtags (see its SOURCE.md)."

    def __init__(self, data_dir: str | Path | None = None, max_length: int = 128, **kwargs: Any) -> None:
        super().__init__(data_dir if data_dir is not None else shipped_dir("debtags"), max_length=max_length,
                         **kwargs)


class Bibtex(BoWXMCDataModule):
    """Bibtex, shipped (XC sparse format): 4,880 / 2,515 documents, 1,836 features, 159 labels."""

    published = PublishedStats(4_880, 2_515, 159)
    source_hint = "Bibtex ships inside the package under datamodules/shipped/bibtex (see its SOURCE.md)."

    def __init__(self, data_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(data_dir if data_dir is not None else shipped_dir("bibtex"), **kwargs)


class Delicious(BoWXMCDataModule):
    """Delicious, shipped (XC sparse format): 12,920 / 3,185 documents, 500 features, 983 labels."""

    published = PublishedStats(12_920, 3_185, 983)
    source_hint = "Delicious ships inside the package under datamodules/shipped/delicious (see its SOURCE.md)."

    def __init__(self, data_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(data_dir if data_dir is not None else shipped_dir("delicious"), **kwargs)
