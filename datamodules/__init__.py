"""LightningDataModules for extreme multi-label datasets (raw text, sparse BoW, LF) and the shipped real sets.

- :class:`RawTextXMCDataModule` (AttentionXML/LightXML layout), :class:`LFXMCDataModule` (LF JSON lines) and
  :class:`BoWXMCDataModule` (XC sparse format); named: :class:`Wiki10_31K`, :class:`Amazon670K`, :class:`Wiki500K`,
  :class:`LFAmazonTitles131K` (point ``data_dir`` at the download), :class:`Debtags`,
  :class:`DebianFiles`, :class:`Bibtex`, :class:`Delicious` (shipped in ``datamodules/shipped``).
- Text batches: ``input_ids``/``attention_mask`` [batch, seq] (padded to the longest, at most ``max_length``);
  BoW batches: ``feature_ids``/``feature_values``/``feature_offsets`` (CSR). Both: ``label_ids`` [nnz] and
  ``label_offsets`` [batch + 1] (CSR positives) and ``doc_index`` [batch], the 0-based line of the document in its
  split's file (validation documents keep their index in the training file).
- Every module: ``num_labels``, ``label_names``, ``train_label_counts``, ``num_train_docs``, ``propensity_a``,
  ``propensity_b`` (the scores: :func:`xmc_dst.metrics.inverse_propensity`); text modules: ``tokenizer_name``; BoW:
  ``num_features``; LF: ``filter_pairs``.
- Bad files raise :class:`DataFormatError` (a ValueError) naming the file and the 1-based line.

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
    "DebianFiles": "named",
    "Bibtex": "named",
    "Delicious": "named",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
