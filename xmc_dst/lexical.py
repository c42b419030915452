"""Lexical features: TF-IDF over word 1..n-grams, fitted on the training split, beside the transformer's tokens.

Why: a frozen sentence embedding keeps the gist of a short text and loses the exact tokens that identify rare labels
(names, versions, technical terms). Peers such as omikuji or PECOS win on those with TF-IDF features; XR-Transformer
and NGAME-style systems feed the same features to the model beside the dense encoder. Here every document also gets
a sparse TF-IDF vector, which the encoder projects with an ``EmbeddingBag`` (see
:class:`xmc_dst.encoders.TransformerEncoder`'s ``lexical_dim``).

Terms are the lower-cased words of two or more word characters (scikit-learn's default token pattern) and their
n-grams up to ``ngrams``; each term is keyed by its CRC-32 (stable across runs and processes). Memory stays bounded
whatever the corpus, as no table of all terms is ever built: a first pass counts document frequencies per
``2**24``-bucket of the key (one 64 MiB counter); a second pass counts exact per-key frequencies only for the keys
whose bucket reached ``min_df``; the vocabulary is the ``max_features`` keys with the largest document frequency (at
least ``min_df``). Two terms share a feature only when their 32-bit keys collide (about one pair per 10^5 kept
terms).

Values are scikit-learn's ``TfidfVectorizer`` defaults: raw term counts times the smoothed inverse document
frequency ``ln((1 + N) / (1 + df)) + 1``, each document L2-normalised.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

BUCKET_BITS = 24
WORD = re.compile(r"(?u)\b\w\w+\b")
CHUNK_DOCS = 10_000


def terms(text: str, ngrams: int) -> list[str]:
    """The word 1..``ngrams``-grams of ``text`` (lower-cased words joined by a space)."""
    words = WORD.findall(text.lower())
    out = list(words)
    for n in range(2, ngrams + 1):
        out.extend(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return out


def term_keys(text: str, ngrams: int) -> np.ndarray:
    """The CRC-32 key of every term occurrence of ``text`` (int64, one per occurrence)."""
    return np.fromiter((zlib.crc32(term.encode("utf-8")) for term in terms(text, ngrams)), dtype=np.int64)


def _bucket_frequencies(texts: Iterable[str], ngrams: int) -> tuple[np.ndarray, int]:
    """Document frequency of every key bucket, and the number of documents."""
    df = np.zeros(1 << BUCKET_BITS, dtype=np.int32)
    mask, num_docs, pending = (1 << BUCKET_BITS) - 1, 0, []
    for text in texts:
        pending.append(np.unique(term_keys(text, ngrams) & mask))
        num_docs += 1
        if len(pending) == CHUNK_DOCS:
            df += np.bincount(np.concatenate(pending), minlength=len(df)).astype(np.int32)
            pending = []
    if pending:
        df += np.bincount(np.concatenate(pending), minlength=len(df)).astype(np.int32)
    return df, num_docs


def _key_frequencies(texts: Iterable[str], ngrams: int, wanted_bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact document frequencies of the keys whose bucket is ``wanted_bucket``: (sorted keys, counts)."""
    mask = (1 << BUCKET_BITS) - 1
    keys, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pending: list[np.ndarray] = []

    def merge() -> None:
        nonlocal keys, counts
        fresh, fresh_counts = np.unique(np.concatenate(pending), return_counts=True)
        keys, inverse = np.unique(np.concatenate([keys, fresh]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, fresh_counts]), minlength=len(keys))
        counts = counts.astype(np.int64)
        pending.clear()

    for text in texts:
        doc = np.unique(term_keys(text, ngrams))
        pending.append(doc[wanted_bucket[doc & mask]])
        if len(pending) == CHUNK_DOCS:
            merge()
    if pending:
        merge()
    return keys, counts


class LexicalVocabulary:
    """The fitted vocabulary: the kept term keys (sorted) and their inverse document frequencies.

    Args:
        kept: the sorted key of each feature (feature id = position).
        idf: the inverse document frequency of each feature.
        ngrams: the longest n-gram.
    """

    def __init__(self, kept: np.ndarray, idf: np.ndarray, ngrams: int) -> None:
        self.kept = np.asarray(kept, dtype=np.int64)
        self.idf = np.asarray(idf, dtype=np.float32)
        self.ngrams = int(ngrams)

    def __len__(self) -> int:
        return len(self.kept)

    @classmethod
    def fit(cls, texts: Callable[[], Iterable[str]], max_features: int, ngrams: int = 2,
            min_df: int = 2) -> LexicalVocabulary:
        """Two passes over the training texts (``texts()`` returns a fresh iterable each time), then keep the
        ``max_features`` most frequent keys (ties broken by key: deterministic)."""
        if max_features < 1 or ngrams < 1 or min_df < 1:
            raise ValueError(f"max_features, ngrams and min_df must be >= 1, got {max_features}, {ngrams}, {min_df}")
        bucket_df, num_docs = _bucket_frequencies(texts(), ngrams)
        keys, df = _key_frequencies(texts(), ngrams, bucket_df >= min_df)
        keep = df >= min_df
        keys, df = keys[keep], df[keep]
        if len(keys) > max_features:
            order = np.lexsort((keys, -df))[:max_features]
            keys, df = keys[order], df[order]
        order = np.argsort(keys)
        idf = np.log((1.0 + num_docs) / (1.0 + df[order])) + 1.0
        return cls(keys[order], idf, ngrams)

    def transform(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(feature ids, values)`` of one document: sorted ids (int32), L2-normalised TF-IDF values (float32)."""
        occurrences = term_keys(text, self.ngrams)
        position = np.searchsorted(self.kept, occurrences)
        position = np.minimum(position, max(0, len(self.kept) - 1))
        found = occurrences[self.kept[position] == occurrences] if len(self.kept) else occurrences[:0]
        ids, counts = np.unique(np.searchsorted(self.kept, found), return_counts=True)
        values = counts.astype(np.float32) * self.idf[ids]
        norm = math.sqrt(float(np.dot(values, values)))
        return ids.astype(np.int32), values / norm if norm > 0 else values

    def save(self, folder: Path) -> None:
        """``lexical.npz`` (keys, idf) and ``lexical.json`` (settings) in ``folder``."""
        np.savez(folder / "lexical.npz", kept=self.kept, idf=self.idf)
        (folder / "lexical.json").write_text(json.dumps({"ngrams": self.ngrams, "features": len(self)}),
                                             encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> LexicalVocabulary:
        arrays = np.load(folder / "lexical.npz")
        settings = json.loads((folder / "lexical.json").read_text(encoding="utf-8"))
        return cls(arrays["kept"], arrays["idf"], settings["ngrams"])



def _expand(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions ``offsets[r] .. offsets[r + 1]`` of every row ``r`` in ``rows``, concatenated."""
    lengths = offsets[rows + 1] - offsets[rows]
    starts = np.repeat(offsets[rows] - np.cumsum(lengths) + lengths, lengths)
    return starts + np.arange(int(lengths.sum()), dtype=np.int64)


def _label_term_sums(label_offsets: np.ndarray, label_ids: np.ndarray, term_offsets: np.ndarray,
                     term_ids: np.ndarray, term_values: np.ndarray, num_terms: int,
                     max_pairs: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per block of whole labels (about ``max_pairs`` (label, document term) pairs each): every co-occurring
    (label, term) with its TF-IDF sum over the label's documents, ordered by label then strongest first (ties by
    term), with its rank within the label: ``(labels, terms, sums, rank)``."""
    label_offsets, term_offsets = label_offsets.astype(np.int64), term_offsets.astype(np.int64)
    docs = np.repeat(np.arange(label_offsets.size - 1), np.diff(label_offsets))
    order = np.argsort(label_ids, kind="stable")
    occ_labels, occ_docs = label_ids[order].astype(np.int64), docs[order]
    pair_counts = np.cumsum(np.diff(term_offsets)[occ_docs])
    start = 0
    while start < occ_labels.size:
        stop = int(np.searchsorted(pair_counts, (pair_counts[start - 1] if start else 0) + max_pairs, "right"))
        stop = max(stop, start + 1)
        stop = int(np.searchsorted(occ_labels, occ_labels[stop - 1], "right"))  # end on a label boundary
        positions = _expand(term_offsets, occ_docs[start:stop])
        labels = np.repeat(occ_labels[start:stop], np.diff(term_offsets)[occ_docs[start:stop]])
        keys, inverse = np.unique(labels * num_terms + term_ids[positions].astype(np.int64), return_inverse=True)
        sums = np.bincount(inverse, weights=term_values[positions].astype(np.float64))
        keep = sums > 0
        keys, sums = keys[keep], sums[keep]
        key_labels, key_terms = keys // num_terms, keys % num_terms
        best = np.lexsort((key_terms, -sums, key_labels))
        key_labels, key_terms, sums = key_labels[best], key_terms[best], sums[best]
        yield key_labels, key_terms, sums, np.arange(key_labels.size) - np.searchsorted(key_labels, key_labels)
        start = stop


def terms_per_label_within(counts: np.ndarray, max_connections: int) -> int:
    """The largest ``k`` with ``sum(min(counts, k)) <= max_connections`` (at least 1): the per-label cap that fits a
    budget while cutting only the labels with the most terms."""
    ordered = np.sort(counts)
    low, high = 1, max(1, int(ordered[-1]) if ordered.size else 1)
    while low < high:
        mid = (low + high + 1) // 2
        if int(np.minimum(ordered, mid).sum()) <= max_connections:
            low = mid
        else:
            high = mid - 1
    return low


def label_term_support(label_offsets: np.ndarray, label_ids: np.ndarray, term_offsets: np.ndarray,
                       term_ids: np.ndarray, term_values: np.ndarray, num_labels: int, num_terms: int,
                       max_terms: int, max_connections: int | None = None,
                       max_pairs: int = 1 << 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every label's co-occurring terms (at most ``max_terms``, the strongest) and their centroid weights.

    A label's weight on a term is the sum of the term's TF-IDF values over the label's training documents (the
    label's centroid, the classic start of a linear text classifier), L2-normalised per label; only terms that occur
    in at least one of its documents are kept, at most ``max_terms`` of them (largest sums first, ties by term id).
    So a frequent label reads as many terms as its documents use and a rare one a handful: the support of a linear
    model trained on sparse features, whose weights away from its positives' terms stay near zero. With
    ``max_connections``, the per-label cap is lowered until the whole support fits it
    (:func:`terms_per_label_within`: only the labels with the most terms are cut), so memory is bounded on any data.

    Documents are CSR rows of labels and of (term, value). Returns the support term-major: ``term_ptr``
    [num_terms + 1] (int64; term ``t``'s connections are ``term_ptr[t]:term_ptr[t + 1]``), ``labels`` (int32,
    ascending within a term) and ``values`` (float32). The work is done a block of labels at a time, each block
    holding at most ``max_pairs`` (label, document term) pairs (a second pass counts first when a budget is given).
    """
    if max_terms < 1 or (max_connections is not None and max_connections < 1):
        raise ValueError(f"max_terms and max_connections must be at least 1, got {max_terms}, {max_connections}")
    arrays = (label_offsets, label_ids, term_offsets, term_ids, term_values, num_terms, max_pairs)
    if max_connections is not None:
        counts = np.zeros(num_labels, dtype=np.int64)
        for labels, _, _, rank in _label_term_sums(*arrays):
            np.add.at(counts, labels[rank < max_terms], 1)
        max_terms = min(max_terms, terms_per_label_within(counts, max_connections))
    kept = [(labels[rank < max_terms], terms[rank < max_terms], sums[rank < max_terms])
            for labels, terms, sums, rank in _label_term_sums(*arrays)]
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
    labels, terms_, values = (np.concatenate(column) for column in zip(*kept, strict=True)) if kept else empty
    norms = np.sqrt(np.bincount(labels, weights=values * values, minlength=num_labels))
    values = values / norms[labels]
    order = np.lexsort((labels, terms_))  # term-major, labels ascending within a term
    term_ptr = np.concatenate([[0], np.cumsum(np.bincount(terms_, minlength=num_terms))]).astype(np.int64)
    return term_ptr, labels[order].astype(np.int32), values[order].astype(np.float32)
