"""Peer XMC systems on the same splits as our models, on this machine: the baselines of the quality table.

Why: a P@k of our sparse-head models means little without the established tree/linear XMC systems trained on the
same documents and scored by the same code. This script trains each peer with its default parameters on TF-IDF
features, predicts the full test split and scores it with the project's metrics.

    .venv/bin/python benchmarks/peers.py              # debtags debian-files bibtex delicious, 3 runs, 2 threads
    .venv/bin/python benchmarks/peers.py --datasets bibtex --runs 1 --threads 2 --out benchmarks/results

Peers (each skipped with a printed note when its package is not installed; ``bash scripts/setup-peers.sh`` installs
them all):

- ``omikuji-parabel``: omikuji (``Model.default_hyper_param()``: balanced 2-means trees, 3 trees, max depth 20,
  leaves of <= 100 labels), the Parabel-style setting;
- ``omikuji-bonsai``: omikuji with its documented Bonsai setting (``cluster.unbalanced``, ``cluster.k = 100``,
  ``max_depth = 3``);
- ``pecos-xrlinear``: PECOS XR-Linear, ``XLinearModel.train`` with default parameters on the default indexer (PIFA
  label embeddings, hierarchical spherical k-means, 16 splits, leaves of <= 100 labels), as ``pecos.xmc.xlinear.train``
  does. libpecos pins numpy<2, which the project's pyarrow cannot load, so PECOS runs in a child process with the
  interpreter of ``.venv-pecos`` (``$XMC_DST_PECOS_PYTHON`` or ``--pecos-python`` to change it); only CSR matrices
  cross (``.npz`` files), and its train/predict times are measured inside the child;
- ``napkinxc-plt``: napkinXC ``models.PLT`` with default parameters.

Randomness: omikuji offers no seed (its runs differ by its own RNG); napkinXC's ``seed`` and PECOS's indexer ``seed``
are the run index (0, 1, 2, ...; run 0 is PECOS's default seed).

Protocol (the one of ``configs/<dataset>.yaml`` and ``benchmarks/quality.py``):

- Data come from the project's DataModules and readers: ``datamodules.Debtags`` / ``DebianFiles`` + ``raw_text_docs``
  (label vocabulary = the labels of the training file, sorted; the test labels unseen in training are dropped from
  the targets, the documents kept), ``datamodules.Bibtex`` / ``datamodules.Delicious`` (XC sparse format; a test
  label without any training positive would be dropped the same way, none exists in the shipped files).
- Features: Debtags and DebianFiles (raw text) -> ``TfidfVectorizer(ngram_range=(1, 2))`` (word 1-2-grams, other
  parameters default) fitted on the training texts; Bibtex and Delicious -> the given binary bag-of-words re-weighted by
  ``TfidfTransformer()`` (defaults) fitted on the training matrix.
- Training split: peers train on the full training split (they have no model selection). Our models hold out 10% of
  it (``val_fraction: 0.1``, seed 42, in the configs) to select their checkpoint; ``--holdout`` trains the peers on
  the same 90% instead.
- Test: the full test split; P@1/3/5 and PSP@1/3/5 from :func:`xmc_dst.metrics.xmc_metrics` with the inverse
  propensities of :func:`xmc_dst.metrics.inverse_propensity` (A = 0.55, B = 1.5 for every dataset) over the label
  counts of the training documents our models use (the config's 90%), so that the PS weights are the same as in the
  models' rows of the quality table. ``--propensity full-train`` counts over the whole training file instead; every
  row also carries the PSP@k under the other choice (``alt_psp``). They differ: with 10% fewer documents every label
  count and N shrink, and PSP@1 moves by 0.3 (Bibtex) to 0.9 (Debtags) points, the same for every system, so compare
  PSP only between rows with the same weights.
- Times: ``train_s`` = fitting the peer on ready features (for omikuji this includes its parsing of the XC training
  file it requires; writing that file is not counted), ``predict_s`` = top-5 predictions for the whole test split
  (omikuji predicts one document per call from Python). Building the features is timed apart (``features_s``).
  Each number is the mean and sample standard deviation over ``--runs`` runs.

Outputs (in ``--out``): ``peers.jsonl``, one row per (dataset, system); rows of the datasets/systems not run this time
are kept, the others replaced; ``peers.md``, the table of all rows. Row schema (what ``run_peers`` returns)::

    {"dataset": str, "system": str, "runs": int,
     "metrics": {"P@1": [mean, std], "P@3": ..., "P@5": ..., "PSP@1": ..., "PSP@3": ..., "PSP@5": ...},
     "train_s": [mean, std], "predict_s": [mean, std], "features": str,
     # and, for the record:
     "features_s": float, "params": str, "threads": int, "train_docs": int, "test_docs": int, "num_labels": int,
     "propensity": str, "per_run": [{"P@1": ..., ..., "train_s": ..., "predict_s": ...}, ...],
     "load_avg": [1-min load average at the start, at the end], "machine": str, "commit": str, "command": str,
     "date": str}

The machine's load average is recorded because the project machine is shared: with other jobs running, the times
(not the metrics) grow.

``benchmarks/quality.py`` imports :func:`run_peers` (or reads ``peers.jsonl``) to put these rows in its table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

# Only the standard library, numpy and scipy at module level: the PECOS child process imports this file under the
# interpreter of .venv-pecos, which has neither torch nor the project's packages (benchmarks.common is stdlib only).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python benchmarks/peers.py` from a checkout: import benchmarks.*

from benchmarks.common import cell, mean_std  # noqa: E402 - after the path above

DATASETS = ("debtags", "debian-files", "bibtex", "delicious")
KS = (1, 3, 5)
METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")
PROPENSITY_A, PROPENSITY_B = 0.55, 1.5
TOP_K = max(KS)


# ------------------------------------------------------------------------------------------------------ the data


@dataclass
class PeerData:
    """One dataset ready for the peers: TF-IDF CSR features, training labels, test positives, PS weights."""

    name: str
    features: str  # how the features were built (goes into the table)
    x_train: sp.csr_matrix  # float32 [train docs, features], sorted indices
    y_train: sp.csr_matrix  # float32 {0, 1} [train docs, labels]
    x_test: sp.csr_matrix  # float32 [test docs, features]
    test_label_ids: np.ndarray  # int64 [nnz] CSR positives of the test documents (unseen labels dropped)
    test_label_offsets: np.ndarray  # int64 [test docs + 1]
    inv_propensity: np.ndarray  # float64 [labels], the PS weights of the table
    propensity: str  # how they were computed
    alt_inv_propensity: np.ndarray  # the other choice of label counts (see ``--propensity``), reported alongside
    alt_propensity: str
    features_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return self.y_train.shape[1]

    def label_lists(self) -> list[list[int]]:
        """The training labels as one list of label ids per document."""
        indptr, indices = self.y_train.indptr, self.y_train.indices
        return [indices[indptr[i]:indptr[i + 1]].tolist() for i in range(self.y_train.shape[0])]


def tfidf_text(train_texts: Sequence[str], test_texts: Sequence[str]) -> tuple[sp.csr_matrix, sp.csr_matrix, str]:
    """TF-IDF of word 1-2-grams (scikit-learn defaults otherwise) fitted on the training texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    x_train = vectorizer.fit_transform(train_texts)
    x_test = vectorizer.transform(test_texts)
    description = f"TF-IDF word 1-2-grams ({len(vectorizer.vocabulary_):,} terms, fitted on train)"
    return _f32(x_train), _f32(x_test), description


def tfidf_bow(x_train: sp.spmatrix, x_test: sp.spmatrix) -> tuple[sp.csr_matrix, sp.csr_matrix, str]:
    """The given bag-of-words re-weighted by ``TfidfTransformer()`` (defaults) fitted on the training matrix."""
    from sklearn.feature_extraction.text import TfidfTransformer

    transformer = TfidfTransformer().fit(x_train)
    description = f"given BoW ({x_train.shape[1]:,} features) + TfidfTransformer (fitted on train)"
    return _f32(transformer.transform(x_train)), _f32(transformer.transform(x_test)), description


def _f32(matrix: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.sort_indices()
    return out


def label_matrix(rows: Sequence[Sequence[int]], num_labels: int) -> sp.csr_matrix:
    """A float32 {0, 1} CSR matrix [len(rows), num_labels] from per-document label id lists."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.fromiter((label for r in rows for label in r), dtype=np.int64, count=int(indptr[-1]))
    out = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(len(rows), num_labels))
    out.sort_indices()
    return out


def drop_unseen(indptr: np.ndarray, indices: np.ndarray,
                train_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop the positives of labels without any training positive; documents are kept. Returns (ids, offsets, n)."""
    keep = train_counts[indices] > 0
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))[keep]
    offsets = np.zeros(len(indptr), dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(rows, minlength=len(indptr) - 1))
    return indices[keep].astype(np.int64), offsets, int((~keep).sum())


def inverse_propensities(label_counts: np.ndarray, num_docs: int) -> np.ndarray:
    """The project's inverse propensity (``xmc_dst.metrics.inverse_propensity``), A = 0.55, B = 1.5."""
    import torch

    from xmc_dst.metrics import inverse_propensity

    counts = torch.as_tensor(np.asarray(label_counts, dtype=np.int64))
    return inverse_propensity(counts, int(num_docs), PROPENSITY_A, PROPENSITY_B).numpy().astype(np.float64)


def _config_protocol(dataset: str) -> tuple[float, int]:
    """(val_fraction, seed) of the data in the config the quality grid runs the dataset with (``configs/raw-text.yaml``
    for the raw-text sets, ``configs/<dataset>.yaml`` otherwise): our models' held-out split, over whose complement the
    propensities are counted."""
    import yaml

    from benchmarks.quality import DATASETS as GRID  # the grid's dataset -> config table (not at module level: the
    # PECOS child imports this file with numpy and scipy only)

    path = REPO / (GRID[dataset]["config"] if dataset in GRID else f"configs/{dataset}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the config of dataset {dataset!r}, whose split the peers' PSP must share")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    init = ((config.get("data") or {}).get("init_args")) or {}
    return float(init.get("val_fraction", 0.0) or 0.0), int(init.get("seed", 42))


def _train_rows(num_docs: int, val_fraction: float, seed: int, holdout: bool) -> np.ndarray:
    from datamodules.base import split_indices

    return split_indices(num_docs, val_fraction, seed)[0] if holdout else np.arange(num_docs)


def _propensity(counts_model: np.ndarray, docs_model: int, counts_full: np.ndarray, docs_full: int,
                mode: str) -> tuple[np.ndarray, str, np.ndarray, str]:
    """(weights, description) of the chosen PS weights, then of the other choice (reported alongside)."""
    model = inverse_propensities(counts_model, docs_model), (
        f"A={PROPENSITY_A}, B={PROPENSITY_B}, label counts over the {docs_model:,} training docs our models use")
    full = inverse_propensities(counts_full, docs_full), (
        f"A={PROPENSITY_A}, B={PROPENSITY_B}, label counts over all {docs_full:,} training docs")
    if mode == "model-train":
        return (*model, *full)
    if mode == "full-train":
        return (*full, *model)
    raise ValueError(f"propensity must be 'model-train' or 'full-train', got {mode!r}")


def load_raw_text(dm: Any, name: str, holdout: bool = False, propensity: str = "model-train") -> PeerData:
    """A raw-text DataModule's splits (read by ``raw_text_docs``) as TF-IDF features.

    ``dm`` is a :class:`datamodules.RawTextXMCDataModule` (e.g. ``Debtags(val_fraction=0.1, seed=42)``): its label
    vocabulary, its files and, for the PS weights, its training label counts (validation documents excluded).
    """
    from datamodules.raw_text import raw_text_docs

    names = list(dm.label_names)
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        vocab = Path(tmp) / "label_names.json"
        vocab.write_text(json.dumps(names, ensure_ascii=False), encoding="utf-8")
        splits, stats = {}, {}
        for split in ("train", "test"):
            stats_path = Path(tmp) / f"{split}-stats.json"
            docs = list(raw_text_docs(str(dm.files[f"{split}_texts"]), str(dm.files[f"{split}_labels"]), str(vocab),
                                      str(stats_path)))
            splits[split] = ([d["text"] for d in docs], [d["label_ids"] for d in docs])
            stats[split] = json.loads(stats_path.read_text(encoding="utf-8"))
    start = time.perf_counter()
    (train_texts, train_labels), (test_texts, test_labels) = splits["train"], splits["test"]
    rows = _train_rows(len(train_texts), dm.val_fraction, dm.seed, holdout)
    train_texts = [train_texts[i] for i in rows]
    train_labels = [train_labels[i] for i in rows]
    x_train, x_test, description = tfidf_text(train_texts, test_texts)
    features_s = time.perf_counter() - start
    y_train = label_matrix(train_labels, len(names))
    y_test = label_matrix(test_labels, len(names))
    counts_full = np.bincount(np.concatenate([np.asarray(ls, dtype=np.int64) for ls in splits["train"][1]]),
                              minlength=len(names))
    weights = _propensity(dm.train_label_counts.numpy(), dm.num_train_docs, counts_full, len(splits["train"][0]),
                          propensity)
    # Labels the (held-out-reduced) training rows never show are dropped too (none with the full split).
    train_counts = np.asarray(y_train.sum(axis=0)).ravel()
    ids, offsets, extra = drop_unseen(y_test.indptr, y_test.indices, train_counts)
    test = stats["test"]
    notes = [f"{test['unseen_label_occurrences']} test label occurrences of {test['unseen_labels']} labels unseen in "
             f"training dropped from the targets ({test['docs_with_unseen_labels']} docs kept)"]
    if extra:
        notes.append(f"{extra} more test positives dropped: labels absent from the peer's training rows")
    return PeerData(name, description, x_train, y_train, x_test, ids, offsets, *weights, features_s, notes)


def load_bow(dm: Any, name: str, holdout: bool = False, propensity: str = "model-train") -> PeerData:
    """A BoW DataModule's splits (XC sparse format, ``datamodules.formats``) with TF-IDF weighting."""
    dm.setup()
    train, test = dm.split_data("train"), dm.split_data("test")

    def features(data: Any) -> sp.csr_matrix:
        return sp.csr_matrix((data.feature_values, data.feature_indices, data.feature_indptr),
                             shape=(data.num_docs, data.num_features))

    def labels(data: Any) -> sp.csr_matrix:
        values = np.ones(len(data.label_indices), dtype=np.float32)
        return sp.csr_matrix((values, data.label_indices, data.label_indptr), shape=(data.num_docs, data.num_labels))

    start = time.perf_counter()
    rows = _train_rows(train.num_docs, dm.val_fraction, dm.seed, holdout)
    x_train, x_test, description = tfidf_bow(features(train)[rows], features(test))
    features_s = time.perf_counter() - start
    y_all = labels(train)
    y_train = _f32(y_all[rows])
    counts_full = np.bincount(train.label_indices, minlength=train.num_labels)
    weights = _propensity(dm.train_label_counts.numpy(), dm.num_train_docs, counts_full, train.num_docs, propensity)
    train_counts = np.asarray(y_train.sum(axis=0)).ravel()
    ids, offsets, dropped = drop_unseen(test.label_indptr, test.label_indices, train_counts)
    notes = [f"{dropped} test positives of labels unseen in training dropped (docs kept)"]
    return PeerData(name, description, x_train, y_train, x_test, ids, offsets, *weights, features_s, notes)


def load_dataset(name: str, holdout: bool = False, propensity: str = "model-train") -> PeerData:
    """One of the shipped datasets (``debtags``, ``debian-files``, ``bibtex``, ``delicious``) through the project's
    DataModules."""
    import datamodules

    val_fraction, seed = _config_protocol(name)
    kwargs = {"val_fraction": val_fraction, "seed": seed, "propensity_a": PROPENSITY_A, "propensity_b": PROPENSITY_B}
    if name in ("debtags", "debian-files"):
        module = datamodules.Debtags if name == "debtags" else datamodules.DebianFiles
        return load_raw_text(module(**kwargs), name, holdout, propensity)
    if name == "bibtex":
        return load_bow(datamodules.Bibtex(**kwargs), name, holdout, propensity)
    if name == "delicious":
        return load_bow(datamodules.Delicious(**kwargs), name, holdout, propensity)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


# ------------------------------------------------------------------------------------------------------ the peers


class PeerUnavailable(RuntimeError):
    """The peer's package (or interpreter) is not installed."""


def topk_rows(rows: Sequence[Sequence[int]], k: int = TOP_K) -> np.ndarray:
    """Ranked label id lists -> int64 [len(rows), k], padded with -1 (never a hit in ``xmc_dst.metrics``)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        row = list(row)[:k]
        out[i, :len(row)] = row
    return out


def write_xc(path: Path, x: sp.csr_matrix, y: sp.csr_matrix) -> None:
    """The XC single-file format (header ``N F L``, then ``l1,l2 f:v ...``; no labels: a leading space)."""
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{x.shape[0]} {x.shape[1]} {y.shape[1]}\n")
        for i in range(x.shape[0]):
            labels = ",".join(map(str, y.indices[y.indptr[i]:y.indptr[i + 1]]))
            lo, hi = x.indptr[i], x.indptr[i + 1]
            feats = " ".join(f"{f}:{v:.7g}" for f, v in zip(x.indices[lo:hi], x.data[lo:hi], strict=True))
            handle.write(f"{labels} {feats}\n")


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Send the process's stdout and stderr (file descriptors 1 and 2) to /dev/null for the duration.

    omikuji's Rust logger is set to trace level when the module is imported and draws progress bars on the raw file
    descriptors; Python's ``contextlib.redirect_stdout`` cannot reach them.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _omikuji(data: PeerData, threads: int, seed: int, bonsai: bool) -> tuple[np.ndarray, float, float]:
    if importlib.util.find_spec("omikuji") is None:
        raise PeerUnavailable("omikuji is not installed (pip install omikuji, or the `peers` extra)")
    with quiet_fds():  # the import sets up its logger
        import omikuji

    params = omikuji.Model.default_hyper_param()
    if bonsai:  # omikuji's README, "Bonsai": regular (unbalanced) k-means, cluster.k = 100, max_depth = 3
        params.cluster_balanced = False
        params.cluster_k = 100
        params.max_depth = 3
    with tempfile.TemporaryDirectory(prefix="peers-omikuji-") as tmp:
        path = Path(tmp) / "train.txt"
        write_xc(path, data.x_train, data.y_train)
        with quiet_fds():
            start = time.perf_counter()
            model = omikuji.Model.train_on_data(str(path), params, n_threads=threads)
            train_s = time.perf_counter() - start
    model.init_prediction_thread_pool(threads)
    x = data.x_test
    start = time.perf_counter()
    ranked = []
    for i in range(x.shape[0]):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        pairs = list(zip(x.indices[lo:hi].tolist(), x.data[lo:hi].tolist(), strict=True))
        ranked.append([label for label, _ in model.predict(pairs, top_k=TOP_K)])
    predict_s = time.perf_counter() - start
    return topk_rows(ranked), train_s, predict_s


def _napkinxc(data: PeerData, threads: int, seed: int) -> tuple[np.ndarray, float, float]:
    if importlib.util.find_spec("napkinxc") is None:
        raise PeerUnavailable("napkinxc is not installed (pip install napkinxc, or the `peers` extra)")
    from napkinxc.models import PLT

    labels = data.label_lists()
    with tempfile.TemporaryDirectory(prefix="peers-napkinxc-") as tmp:
        model = PLT(tmp, seed=seed, threads=threads)
        start = time.perf_counter()
        model.fit(data.x_train, labels)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        ranked = model.predict(data.x_test, top_k=TOP_K)
        predict_s = time.perf_counter() - start
    return topk_rows(ranked), train_s, predict_s


def pecos_python() -> Path:
    """The interpreter PECOS runs under: ``$XMC_DST_PECOS_PYTHON``, else ``.venv-pecos/bin/python``."""
    return Path(os.environ.get("XMC_DST_PECOS_PYTHON") or REPO / ".venv-pecos" / "bin" / "python")


_PROBED: dict[str, str | None] = {}


def _probe_pecos(python: Path) -> str | None:
    """None if ``python`` imports XLinearModel, else why not (cached)."""
    key = str(python)
    if key not in _PROBED:
        if not python.exists():
            _PROBED[key] = f"no PECOS interpreter at {python} (bash scripts/setup-peers.sh, or $XMC_DST_PECOS_PYTHON)"
        else:
            probe = subprocess.run([str(python), "-c", "from pecos.xmc.xlinear.model import XLinearModel"],
                                   capture_output=True, text=True, timeout=300)
            _PROBED[key] = None if probe.returncode == 0 else (
                f"{python} cannot import PECOS: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    return _PROBED[key]


def _pecos(data: PeerData, threads: int, seed: int) -> tuple[np.ndarray, float, float]:
    python = pecos_python()
    problem = _probe_pecos(python)
    if problem:
        raise PeerUnavailable(problem)
    with tempfile.TemporaryDirectory(prefix="peers-pecos-") as tmp:
        folder = Path(tmp)
        sp.save_npz(folder / "x_train.npz", data.x_train)
        sp.save_npz(folder / "y_train.npz", data.y_train)
        sp.save_npz(folder / "x_test.npz", data.x_test)
        command = [str(python), str(Path(__file__).resolve()), "--pecos-worker", str(folder),
                   "--threads", str(threads), "--seed", str(seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"PECOS child failed ({done.returncode}):\n{done.stderr[-3000:]}")
        times = json.loads((folder / "times.json").read_text(encoding="utf-8"))
        topk = np.load(folder / "topk.npy")
    return topk, float(times["train_s"]), float(times["predict_s"])


def pecos_worker(folder: Path, threads: int, seed: int) -> None:
    """Child process: train XR-Linear on ``folder``'s matrices, write ``topk.npy`` and ``times.json``."""
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    x_train = sp.load_npz(folder / "x_train.npz").tocsr().astype(np.float32)
    y_train = sp.load_npz(folder / "y_train.npz").tocsr().astype(np.float32)
    x_test = sp.load_npz(folder / "x_test.npz").tocsr().astype(np.float32)
    start = time.perf_counter()
    label_features = LabelEmbeddingFactory.create(y_train, x_train, method="pifa", threads=threads)
    chain = Indexer.gen(label_features, seed=seed, threads=threads)
    model = XLinearModel.train(x_train, y_train, C=chain, threads=threads)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = sp.csr_matrix(model.predict(x_test, only_topk=TOP_K, threads=threads))
    ranked = []
    for i in range(scores.shape[0]):
        lo, hi = scores.indptr[i], scores.indptr[i + 1]
        order = np.argsort(-scores.data[lo:hi], kind="stable")
        ranked.append(scores.indices[lo:hi][order].tolist())
    predict_s = time.perf_counter() - start
    np.save(folder / "topk.npy", topk_rows(ranked))
    (folder / "times.json").write_text(json.dumps({"train_s": train_s, "predict_s": predict_s}), encoding="utf-8")


PeerFn = Callable[[PeerData, int, int], tuple[np.ndarray, float, float]]
PEERS: dict[str, tuple[PeerFn, str]] = {
    "omikuji-parabel": (lambda d, t, s: _omikuji(d, t, s, bonsai=False),
                        "omikuji defaults (balanced 2-means, 3 trees, max_depth 20, min_branch_size 100)"),
    "omikuji-bonsai": (lambda d, t, s: _omikuji(d, t, s, bonsai=True),
                       "omikuji defaults + cluster.unbalanced, cluster.k 100, max_depth 3"),
    "pecos-xrlinear": (_pecos, "XLinearModel.train defaults, PIFA + HierarchicalKMeans defaults, seed = run"),
    "napkinxc-plt": (_napkinxc, "napkinxc.models.PLT defaults, seed = run"),
}


# ------------------------------------------------------------------------------------------------------ scoring


def evaluate(topk: np.ndarray, data: PeerData, alt: bool = False) -> dict[str, float]:
    """P@1/3/5 and PSP@1/3/5 (percent) of ranked predictions [test docs, >= 5] with ``xmc_dst.metrics``.

    ``alt``: with the other choice of PS weights (``data.alt_inv_propensity``).
    """
    import torch

    from xmc_dst.metrics import xmc_metrics

    weights = data.alt_inv_propensity if alt else data.inv_propensity
    values = xmc_metrics(torch.as_tensor(np.asarray(topk, dtype=np.int64)), torch.as_tensor(data.test_label_ids),
                         torch.as_tensor(data.test_label_offsets), KS, torch.as_tensor(weights))
    return {name: float(values[name]) for name in METRICS}


def run_peers(datasets: Sequence[str] = DATASETS, runs: int = 3, threads: int = 2,
              systems: Sequence[str] | None = None, holdout: bool = False, propensity: str = "model-train",
              command: str | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and score every available peer on every dataset; one row per (dataset, system), schema above.

    A peer whose package is missing is skipped with a note through ``log``; a peer that fails raises.
    """
    import torch

    from xmc_dst.provenance import git_commit, machine

    torch.set_num_threads(threads)
    systems = list(systems or PEERS)
    unknown = [s for s in systems if s not in PEERS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(PEERS)}")
    common = {"machine": machine(), "commit": git_commit(short=False), "threads": threads,
              "command": command or " ".join(shlex.quote(a) for a in sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    skipped: set[str] = set()
    rows = []
    for name in datasets:
        data = load_dataset(name, holdout, propensity)
        log(f"{name}: {data.x_train.shape[0]:,} train / {data.x_test.shape[0]:,} test docs, {data.num_labels:,} "
            f"labels; {data.features} in {data.features_s:.1f}s; {'; '.join(data.notes)}")
        for system in systems:
            if system in skipped:
                continue
            fit_predict, params = PEERS[system]
            per_run = []
            load_start = os.getloadavg()[0]
            try:
                for run in range(runs):
                    topk, train_s, predict_s = fit_predict(data, threads, run)
                    alt = {f"alt_{m}": v for m, v in evaluate(topk, data, alt=True).items() if m.startswith("PSP")}
                    per_run.append({**evaluate(topk, data), **alt, "train_s": train_s, "predict_s": predict_s})
                    log(f"  {system:16s} run {run}: P@1 {per_run[-1]['P@1']:.2f} P@5 {per_run[-1]['P@5']:.2f} "
                        f"PSP@1 {per_run[-1]['PSP@1']:.2f} train {train_s:.2f}s predict {predict_s:.2f}s")
            except PeerUnavailable as why:
                log(f"  {system}: skipped, {why}")
                skipped.add(system)
                continue
            rows.append({
                "dataset": name, "system": system, "runs": runs,
                "metrics": {m: mean_std([r[m] for r in per_run]) for m in METRICS},
                "train_s": mean_std([r["train_s"] for r in per_run]),
                "predict_s": mean_std([r["predict_s"] for r in per_run]),
                "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                "features": data.features, "features_s": data.features_s, "params": params,
                "train_docs": data.x_train.shape[0], "test_docs": data.x_test.shape[0], "num_labels": data.num_labels,
                "train_split": "90% (our models' training rows)" if holdout else "full training split",
                "propensity": data.propensity, "notes": data.notes, "per_run": per_run,
                "alt_psp": {"propensity": data.alt_propensity,
                            **{m: mean_std([r[f"alt_{m}"] for r in per_run]) for m in METRICS if m.startswith("PSP")}},
                **common,
            })
    return rows


# ------------------------------------------------------------------------------------------------------ output


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of ``rows`` (mean ± std over runs), with the features and provenance under it."""
    lines = [
        "| dataset | system | runs | P@1 | P@3 | P@5 | PSP@1 | PSP@3 | PSP@5 | train s | predict s | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        metrics = " | ".join(cell(row["metrics"][m]) for m in METRICS)
        load = "/".join(f"{x:.1f}" for x in row.get("load_avg", [])) or "-"
        lines.append(f"| {row['dataset']} | {row['system']} | {row['runs']} | {metrics} | {cell(row['train_s'])} | "
                     f"{cell(row['predict_s'])} | {load} |")
    lines.append("")
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(row["dataset"], row)
    for name, row in seen.items():
        lines.append(f"- {name}: {row['features']}; {row['train_docs']:,} train / {row['test_docs']:,} test docs, "
                     f"{row['num_labels']:,} labels, {row['train_split']}; PSP {row['propensity']}; "
                     f"{'; '.join(row.get('notes', []))}.")
    systems: dict[str, str] = {row["system"]: row["params"] for row in rows}
    lines += [f"- {system}: {params}." for system, params in systems.items()]
    provenance = sorted({(row["machine"], row["commit"], row["command"], row["threads"]) for row in rows})
    for host, commit, command, threads in provenance:
        lines.append(f"- Measured on {host}, {threads} threads, commit {commit[:12]}: `{command}`. Mean ± sample std "
                     f"over runs; load = the machine's 1-min load average at the start/end of the row (times grow "
                     f"with it; the metrics do not).")
    return "\n".join(lines) + "\n"


def save(rows: Sequence[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Merge ``rows`` into ``out/peers.jsonl`` (replacing the same (dataset, system)), rewrite ``out/peers.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "peers.jsonl"
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                old = json.loads(line)
                merged[(old["dataset"], old["system"])] = old
    for row in rows:
        merged[(row["dataset"], row["system"])] = row
    order = {name: i for i, name in enumerate(DATASETS)}
    systems = {name: i for i, name in enumerate(PEERS)}
    all_rows = sorted(merged.values(), key=lambda r: (order.get(r["dataset"], 99), r["dataset"],
                                                       systems.get(r["system"], 99), r["system"]))
    path.write_text("".join(json.dumps(row) + "\n" for row in all_rows), encoding="utf-8")
    (out / "peers.md").write_text("# Peer XMC systems (`benchmarks/peers.py`)\n\n" + markdown(all_rows),
                                  encoding="utf-8")
    return all_rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--systems", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--runs", type=int, default=3, help="runs per (dataset, system); mean and std reported")
    parser.add_argument("--threads", type=int, default=2, help="threads of every peer (and of torch, for scoring)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--holdout", action="store_true",
                        help="train on our models' training rows (the config's val_fraction held out), not all")
    parser.add_argument("--propensity", choices=("model-train", "full-train"), default="model-train",
                        help="label counts of the PS weights: our models' training rows, or the whole train file")
    parser.add_argument("--pecos-python", type=Path, default=None, help="interpreter with libpecos (.venv-pecos)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--pecos-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pecos_worker is not None:
        pecos_worker(args.pecos_worker, args.threads, args.seed)
        return 0
    if args.pecos_python is not None:
        os.environ["XMC_DST_PECOS_PYTHON"] = str(args.pecos_python)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + list(argv or sys.argv[1:]))
    rows = run_peers(args.datasets, args.runs, args.threads, args.systems, args.holdout, args.propensity, command)
    print()
    print(markdown(rows))
    if not args.no_save:
        save(rows, args.out)
        print(f"wrote {args.out / 'peers.jsonl'} and {args.out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
