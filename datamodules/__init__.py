"""LightningDataModules for extreme multi-label datasets (raw text, sparse BoW, LF) and the shipped real sets.

Names are imported lazily so that ``import datamodules.formats`` does not pull in Lightning or ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataFormatError": "formats",
    "SparseXC": "formats",
    "read_xc_single": "formats",
    "read_xc_split": "formats",
    "read_filter_pairs": "formats",
    "XMCDataModule": "base",
    "PublishedStats": "base",
    "TokenizedTextDataModule": "text",
    "RawTextXMCDataModule": "raw_text",
    "BoWXMCDataModule": "bow",
    "LFXMCDataModule": "lf",
    "Wiki10_31K": "named",
    "Amazon670K": "named",
    "Wiki500K": "named",
    "LFAmazonTitles131K": "named",
    "Debtags": "named",
    "Bibtex": "named",
    "Delicious": "named",
    "default_tokenizer": "resources",
    "minilm_dir": "resources",
    "shipped_dir": "resources",
    "default_cache_root": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
