"""Tokenised-text DataModule machinery shared by the raw-text and LF layouts.

A subclass says where the documents come from (a generator of ``{"doc_index", "text", "label_ids"}`` per split) and
how the label vocabulary is made; this class tokenises each split once with a Hugging Face fast tokenizer through
``datasets`` (``Dataset.from_generator`` so the corpus is never held in memory, then a batched ``map`` over
``num_proc`` processes), stores it as Arrow under the cache directory (see :mod:`datamodules.cache`) and opens it
memory-mapped on every rank.

Cache directory content: ``train/`` and ``test/`` (``datasets.save_to_disk``: ``doc_index``, ``label_ids``,
``input_ids`` as int32, truncated to ``max_length`` with special tokens), ``label_names.json`` (the vocabulary, index
= label id), ``label_counts.npy`` (label frequencies over the whole training file) and ``meta.json`` (the fingerprint
inputs and per-split statistics such as test labels dropped because training never saw them). With lexical features
on (``lexical_features > 0``) each split also holds ``lexical_ids``/``lexical_values`` (the document's TF-IDF vector
over word n-grams of its whole text, see :mod:`xmc_dst.lexical`) and the cache ``lexical.npz``/``lexical.json``
(the vocabulary, fitted on the training file).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from xmc_dst.lexical import LexicalVocabulary, label_term_support
from xmc_dst.paths import cache_root, default_tokenizer

from .base import XMCDataModule, check_sizes, split_indices
from .cache import atomic_directory, build_lock, file_signature, fingerprint, tokenizer_signature
from .collate import ArrowRows, TextCollate
from .formats import DataFormatError, iter_lines

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLITS = ("train", "test")


def _features(tokenised: bool, lexical: bool = False):
    from datasets import Features, List, Value

    columns = {"doc_index": Value("int64"), "label_ids": List(Value("int32"))}
    columns.update({"input_ids": List(Value("int32"))} if tokenised else {"text": Value("string")})
    if tokenised and lexical:
        columns.update({"lexical_ids": List(Value("int32")), "lexical_values": List(Value("float32"))})
    return Features(columns)


def load_tokenizer(name: str):
    """Load a Hugging Face fast tokenizer from a directory or hub name (offline-friendly)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; one is needed for batched tokenisation")
    return tokenizer


def _tokenize(batch: dict[str, list], tokenizer: Any, max_length: int,
              lexical: LexicalVocabulary | None = None) -> dict[str, list]:
    encoded = tokenizer(
        batch["text"],
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    out = {"input_ids": encoded["input_ids"]}
    if lexical is not None:  # over the whole text, not only the tokens the transformer keeps
        rows = [lexical.transform(text) for text in batch["text"]]
        out["lexical_ids"] = [ids for ids, _ in rows]
        out["lexical_values"] = [values for _, values in rows]
    return out


def text_only_docs(text_path: str) -> Iterator[dict[str, Any]]:
    """Documents of a prediction file: one per line, no labels."""
    for number, text in iter_lines(text_path):
        yield {"doc_index": number - 1, "text": text, "label_ids": []}


def build_split(
    generator: Callable[..., Iterator[dict[str, Any]]],
    gen_kwargs: dict[str, Any],
    tokenizer: Any,
    max_length: int,
    num_proc: int,
    workdir: Path,
    out: Path,
    tag: str,
    lexical: LexicalVocabulary | None = None,
) -> None:
    """Tokenise the documents of ``generator`` into an Arrow dataset saved at ``out`` (streaming, bounded memory),
    with their lexical features when ``lexical`` is given."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    scratch = workdir / f".hf-{tag}"
    try:
        raw = Dataset.from_generator(
            generator, features=_features(False), cache_dir=str(scratch), gen_kwargs=gen_kwargs, fingerprint=tag
        )
    except DatasetGenerationError as err:  # datasets wraps the generator's errors: surface ours as they are
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DataFormatError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    tokenised = raw.map(
        _tokenize,
        batched=True,
        batch_size=1000,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "lexical": lexical},
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        features=_features(True, lexical is not None),
        cache_file_name=str(scratch / "tokens.arrow"),
        new_fingerprint=f"{tag}-tokens",
        desc=f"Tokenising {tag}",
    )
    tokenised.save_to_disk(str(out))
    del raw, tokenised
    shutil.rmtree(scratch, ignore_errors=True)


class TokenizedTextDataModule(XMCDataModule):
    """Base for text DataModules: tokenise once into a fingerprinted Arrow cache, open it memory-mapped.

    Attributes available right after ``__init__`` (computed lazily from the cache or a pass over the training
    labels): ``num_labels``, ``label_names``, ``num_train_docs``. ``train_label_counts`` is the label frequency over
    the training documents actually used (validation documents excluded) and may trigger the cache build.

    Args:
        tokenizer: directory or hub name of a Hugging Face fast tokenizer (default: the shipped MiniLM).
        max_length: tokens per document, special tokens included (longer documents are truncated).
        cache_dir: cache root (default: :func:`xmc_dst.paths.cache_root`); the cache is
            ``<root>/<dataset>/<fingerprint>``.
        num_proc: processes for tokenisation.
        predict_file: a text file (one document per line) for ``predict``; default: the test split.
        lexical_features: size of the TF-IDF vocabulary of word n-grams fitted on the training file (0: no lexical
            features); batches then carry ``lexical_ids``/``lexical_values``/``lexical_offsets`` (CSR) and
            ``num_lexical_features`` is the vocabulary's size (fewer when fewer terms reach ``lexical_min_df``).
        lexical_ngrams: the longest word n-gram of the lexical features.
        lexical_min_df: the fewest training documents a term must occur in.
        **kwargs: the shared settings of :class:`~datamodules.base.XMCDataModule`.
    """

    def __init__(self, tokenizer: str | None = None, max_length: int = 128, cache_dir: str | Path | None = None,
                 num_proc: int = 1, predict_file: str | Path | None = None, lexical_features: int = 0,
                 lexical_ngrams: int = 2, lexical_min_df: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_sizes(type(self).__name__, max_length=max_length, num_proc=num_proc)
        if lexical_features < 0 or lexical_ngrams < 1 or lexical_min_df < 1:
            raise ValueError(f"lexical_features must be >= 0 and lexical_ngrams, lexical_min_df >= 1; got "
                             f"{lexical_features}, {lexical_ngrams}, {lexical_min_df}")
        self.lexical_settings = ((int(lexical_features), int(lexical_ngrams), int(lexical_min_df))
                                 if lexical_features else None)
        self._lexical: LexicalVocabulary | None = None
        self.tokenizer_name = str(tokenizer) if tokenizer is not None else default_tokenizer()
        self.max_length = int(max_length)
        self.cache_root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
        self.num_proc = max(1, int(num_proc))
        self.predict_file = Path(predict_file) if predict_file is not None else None
        self._tokenizer: Any = None
        self._cache_path: Path | None = None
        self._labels: tuple[list[str], np.ndarray, int] | None = None  # names, counts over the train file, docs
        self._meta: dict[str, Any] | None = None
        self._train_full: Any = None
        self._train_rows: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------------------------------ subclass hooks

    @property
    def dataset_name(self) -> str:
        """Folder name under the cache root."""
        raise NotImplementedError

    def _source_files(self) -> dict[str, Path]:
        """The files the cache depends on, by role."""
        raise NotImplementedError

    def _validate_sources(self) -> None:
        """Cheap checks before tokenising (line counts agree, files not empty); raise DataFormatError."""

    def _scan_labels(self) -> tuple[list[str], np.ndarray, int]:
        """(label names, label frequencies over the training file, number of training documents)."""
        raise NotImplementedError

    def _generator(self, split: str, vocab_path: Path, stats_path: Path) -> tuple[Callable, dict[str, Any]]:
        """A module-level generator function and its kwargs yielding the documents of ``split``."""
        raise NotImplementedError

    def _fingerprint_extra(self) -> dict[str, Any]:
        """Subclass settings that change the cached content (e.g. which fields form the text)."""
        return {}

    # ------------------------------------------------------------------------------------------ tokenizer, cache

    @property
    def tokenizer(self) -> Any:
        """The fast tokenizer loaded from ``tokenizer_name``."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def cache_path(self) -> Path:
        """``<cache_root>/<dataset_name>/<fingerprint>``."""
        if self._cache_path is None:
            parts = {
                "version": CACHE_VERSION,
                "sources": {role: file_signature(path) for role, path in sorted(self._source_files().items())},
                "tokenizer": tokenizer_signature(self.tokenizer, self.tokenizer_name),
                "max_length": self.max_length,
                "extra": self._fingerprint_extra(),
            }
            if self.lexical_settings is not None:  # absent when off: caches built before the option stay valid
                parts["lexical"] = list(self.lexical_settings)
            self._fingerprint_inputs = parts
            self._cache_path = self.cache_root / self.dataset_name / fingerprint(parts)
        return self._cache_path

    def prepare_data(self) -> None:
        """Tokenise and cache every split unless the cache for this fingerprint exists (runs on one process)."""
        self._ensure_cache()

    def _ensure_cache(self) -> Path:
        path = self.cache_path
        if not path.is_dir():
            with build_lock(path):
                if not path.is_dir():
                    self._build(path)
        return path

    def _build(self, final: Path) -> None:
        self._validate_sources()
        names, counts, num_docs = self._label_state()
        with atomic_directory(final) as tmp:
            (tmp / "label_names.json").write_text(json.dumps(names, ensure_ascii=False), encoding="utf-8")
            np.save(tmp / "label_counts.npy", counts)
            lexical = self._fit_lexical(tmp)
            splits = {}
            for split in SPLITS:
                stats_path = tmp / f"{split}-stats.json"
                generator, kwargs = self._generator(split, tmp / "label_names.json", stats_path)
                build_split(generator, kwargs, self.tokenizer, self.max_length, self.num_proc, tmp, tmp / split,
                            f"{self.dataset_name}-{final.name}-{split}", lexical=lexical)
                splits[split] = json.loads(stats_path.read_text(encoding="utf-8"))
                stats_path.unlink()
            meta = {
                "dataset": self.dataset_name,
                "fingerprint_inputs": self._fingerprint_inputs,
                "num_labels": len(names),
                "num_train_docs": num_docs,
                "splits": splits,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        log.info("%s: cached tokenised splits in %s", self.dataset_name, final)

    def _fit_lexical(self, folder: Path) -> LexicalVocabulary | None:
        """Fit the lexical vocabulary on the training file's texts and save it in the cache being built."""
        if self.lexical_settings is None:
            return None
        generator, kwargs = self._generator("train", folder / "label_names.json", folder / "lexical-stats.json")
        max_features, ngrams, min_df = self.lexical_settings
        vocabulary = LexicalVocabulary.fit(lambda: (doc["text"] for doc in generator(**kwargs)), max_features,
                                           ngrams, min_df)
        (folder / "lexical-stats.json").unlink(missing_ok=True)
        vocabulary.save(folder)
        log.info("%s: %d lexical features (word 1-%d-grams in >= %d training documents)", self.dataset_name,
                 len(vocabulary), ngrams, min_df)
        return vocabulary

    @property
    def lexical_vocabulary(self) -> LexicalVocabulary | None:
        """The fitted TF-IDF vocabulary (None without lexical features); builds the cache if needed."""
        if self.lexical_settings is not None and self._lexical is None:
            self._lexical = LexicalVocabulary.load(self._ensure_cache())
        return self._lexical

    @property
    def num_lexical_features(self) -> int | None:
        """Width of the lexical features (None without them)."""
        vocabulary = self.lexical_vocabulary
        return len(vocabulary) if vocabulary is not None else None

    def label_term_support(self, max_terms: int, max_connections: int | None = None,
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each label's lexical features over the training documents (validation held out), at most ``max_terms``
        (and ``max_connections`` in all): see :func:`xmc_dst.lexical.label_term_support`."""
        if self.lexical_settings is None:
            raise ValueError("label term profiles need lexical features: set lexical_features")
        self._open_train()
        table = self._train_full.data.table.take(pa.array(self._train_rows[0]))

        def csr(name: str) -> tuple[np.ndarray, np.ndarray]:
            column = pa.chunked_array(table.column(name).chunks).combine_chunks()
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), flat

        label_offsets, label_ids = csr("label_ids")
        term_offsets, term_ids = csr("lexical_ids")
        _, term_values = csr("lexical_values")
        return label_term_support(label_offsets, label_ids, term_offsets, term_ids, term_values, self.num_labels,
                                  len(self.lexical_vocabulary), max_terms, max_connections)

    def _label_state(self) -> tuple[list[str], np.ndarray, int]:
        if self._labels is None:
            path = self.cache_path
            if path.is_dir():
                names = json.loads((path / "label_names.json").read_text(encoding="utf-8"))
                meta = self._load_meta()
                self._labels = (names, np.load(path / "label_counts.npy"), meta["num_train_docs"])
            else:
                self._labels = self._scan_labels()
        return self._labels

    def _load_meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = json.loads((self._ensure_cache() / "meta.json").read_text(encoding="utf-8"))
            test = self._meta["splits"]["test"]
            if test.get("unseen_label_occurrences"):
                log.warning(
                    "%s: dropped %d test label occurrences (%d distinct labels unseen in training) from %d test "
                    "documents",
                    self.dataset_name,
                    test["unseen_label_occurrences"],
                    test["unseen_labels"],
                    test["docs_with_unseen_labels"],
                )
            self._check_published(
                self._meta["splits"]["train"]["docs"],
                test["docs"],
                self._meta["num_labels"] + test.get("unseen_labels", 0),
            )
        return self._meta

    # ------------------------------------------------------------------------------------------ label attributes

    @property
    def label_names(self) -> list[str]:
        return self._label_state()[0]

    @property
    def num_labels(self) -> int:
        return len(self._label_state()[0])

    @property
    def num_train_docs(self) -> int:
        total = self._label_state()[2]
        return total - int(round(total * self.val_fraction))

    @property
    def train_label_counts(self) -> torch.Tensor:
        counts = torch.from_numpy(self._label_state()[1].astype(np.int64))
        if self.val_fraction > 0:
            self._open_train()
            _, val_rows = self._train_rows
            column = self._train_full.data.column("label_ids").take(pa.array(val_rows))
            val_labels = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
            counts = counts - torch.from_numpy(np.bincount(val_labels, minlength=len(counts)))
        return counts

    @property
    def dropped_test_labels(self) -> dict[str, int]:
        """Test label occurrences dropped because training never saw the label (from the cache metadata)."""
        test = self._load_meta()["splits"]["test"]
        keys = ("unseen_label_occurrences", "unseen_labels", "docs_with_unseen_labels")
        return {key: int(test.get(key, 0)) for key in keys}

    # ------------------------------------------------------------------------------------------ splits

    def setup(self, stage: str | None = None) -> None:
        """Open (building if needed) the splits ``stage`` uses; every rank calls this."""
        self._load_meta()
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["predict"],
        }.get(stage or "", ["train", "val", "test"])
        for split in wanted:
            if split == "val" and self.val_fraction == 0:
                if self.val_on_test:
                    self._ensure_split("test")
                continue
            self._ensure_split(split)

    def _open_train(self) -> None:
        if self._train_full is None:
            from datasets import load_from_disk

            self._train_full = load_from_disk(str(self._ensure_cache() / "train"))
            self._train_rows = split_indices(len(self._train_full), self.val_fraction, self.seed)

    def _ensure_split(self, split: str) -> None:
        if split in self._datasets:
            return
        from datasets import load_from_disk

        if split in ("train", "val"):
            self._open_train()
            train_rows, val_rows = self._train_rows
            if split == "val" and self.val_fraction == 0:
                raise ValueError("no validation split: val_fraction is 0")
            rows = train_rows if split == "train" else val_rows
            full = self._train_full
            self._datasets[split] = ArrowRows(full if len(rows) == len(full) else full.select(rows))
        elif split == "test":
            self._datasets["test"] = ArrowRows(load_from_disk(str(self._ensure_cache() / "test")))
        elif split == "predict":
            if self.predict_file is None:
                self._ensure_split("test")
                self._datasets["predict"] = self._datasets["test"]
            else:
                self._datasets["predict"] = ArrowRows(load_from_disk(str(self._ensure_predict_cache())))
        else:
            raise ValueError(f"unknown split {split!r}")

    def _ensure_predict_cache(self) -> Path:
        source = self.predict_file
        if source is None or not source.is_file():
            raise FileNotFoundError(f"predict_file {source} does not exist (expected one document per line)")
        path = self._ensure_cache() / f"predict-{fingerprint(file_signature(source))}"
        if not path.is_dir():
            with build_lock(path):
                if not path.is_dir():
                    with atomic_directory(path) as tmp:
                        build_split(text_only_docs, {"text_path": str(source)}, self.tokenizer, self.max_length,
                                    self.num_proc, tmp, tmp / "data", f"{self.dataset_name}-predict",
                                    lexical=self.lexical_vocabulary)
        return path / "data"

    def _collate(self, split: str) -> TextCollate:
        return TextCollate(self.tokenizer.pad_token_id or 0, self.max_length, self.lexical_settings is not None)
