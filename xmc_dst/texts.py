"""The one check of every public entry point that takes a batch of raw texts.

A ``str`` is itself a sequence (of characters), so ``predict("a document")`` would otherwise score each character as
a document; a single string is taken as a batch of one document, and anything that is not a sequence of strings
fails with a ``TypeError`` that names the entry point and the first offending item.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["text_batch"]


def text_batch(texts: str | Iterable[str], where: str) -> list[str]:
    """``texts`` as a list of documents: a ``str`` is one document, any other iterable (list, tuple, array,
    generator) a batch; bytes, a mapping, or items that are not ``str`` raise ``TypeError`` (``where`` names the
    entry point)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray, memoryview, Mapping)) or not isinstance(texts, Iterable):
        raise TypeError(f"{where} takes a text or a list of texts (str), got {type(texts).__name__}")
    batch = list(texts)
    for index, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"{where} takes texts (str); item {index} is {type(text).__name__}: {_short(text)}")
    return batch


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
