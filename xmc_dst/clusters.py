"""Label clusters for the auxiliary meta-classifier: read from a file or built from the training data.

Built clusters follow AttentionXML/LightXML: every label is embedded as the normalised sum of the TF-IDF vectors of
its training documents, and the labels are split by balanced 2-means, recursively, into ``num_clusters`` groups of
near-equal size. Two choices keep this practical at 670K labels on a CPU:

* documents are projected to ``dim`` dimensions by a seeded Gaussian random projection before summing (cosine
  similarities are preserved up to ``O(1/sqrt(dim))``, Johnson-Lindenstrauss), so a label is a dense ``dim``-vector
  rather than a sparse row over the vocabulary, and a centroid costs ``dim`` floats instead of ``vocab``;
* every tree level splits all its nodes at once: nodes are contiguous ranges of one permutation of the labels,
  padded to a ``[nodes, size, dim]`` batch, so a 2-means iteration is two batched matrix products and a row-wise
  sort whatever the number of nodes. A level costs ``O(iterations * labels * dim)`` plus the sorts.

A node with ``n`` labels and ``k`` leaves to produce sends the ``n * floor(k/2) / k`` labels closest to the first
centroid left (a balanced split by score rank, as AttentionXML's), so any ``num_clusters`` is reachable and sizes
differ by at most one label per level.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["ClusterFileError", "ClusterNamesNeeded", "balanced_kmeans_tree", "count_clusters", "label_embeddings",
           "load_cluster_file", "save_assignment"]

# Label rows gathered before one scatter into the label embeddings (1 << 16 rows x 128 dims: 32 MB).
FLUSH_ROWS = 1 << 16


class ClusterFileError(ValueError):
    """A label-cluster file that does not fit the data's labels (raised before training starts)."""


class ClusterNamesNeeded(ClusterFileError, LookupError):
    """The file lists label names, and the data's label names were not given (resolve it once they are known)."""


CLUSTER_FIX = ("rebuild the file for this data's label set, or drop the file (model.aux_cluster_file: null, "
               "AuxiliaryObjective cluster_file: null) and let AuxiliaryObjective build clusters from the training "
               "data (build_clusters: true)")


def _first(ids: np.ndarray, names: Sequence[str] | None, limit: int = 5) -> str:
    """The first few of ``ids`` (with their names), for an error message."""
    shown = [f"{i} ({names[i]!r})" if names is not None else str(i) for i in ids[:limit].tolist()]
    return ", ".join(shown) + (", ..." if ids.size > limit else "")


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"cluster file {path} does not exist: give the path of a label_group*.npy or "
                                f"assignment .npy file, or {CLUSTER_FIX}")
    return np.load(path, allow_pickle=True)


def count_clusters(path: str | Path) -> int:
    """Number of clusters in a cluster file (see :func:`load_cluster_file`), without the label names."""
    array = _load(Path(path).expanduser())
    if array.dtype != object and array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        return int(array.max()) + 1 if array.size else 0
    return len(array)


def load_cluster_file(path: str | Path, num_labels: int, label_names: Sequence[str] | None = None) -> Tensor:
    """Label -> cluster assignment [num_labels] (int64) from a ``.npy`` file; strict, so a stale file fails early.

    Accepted forms: the LightXML/AttentionXML ``label_group*.npy`` (an object array holding one array of labels
    per cluster), a 2-D array with one cluster per row (entries < 0 are padding), or a 1-D integer assignment of
    length ``num_labels``. Members that are strings are label names, looked up in ``label_names`` (the authors'
    raw-text files list names over train and test; names absent from the training labels are skipped).

    Every label must be in exactly one cluster: a label in no cluster (the file was made for another label set or
    data version), a label listed twice, an id outside ``[0, num_labels)`` or a wrong length raises
    :class:`ClusterFileError` naming the file, what is wrong and the fix. Spreading uncovered labels over the
    clusters would silently train the meta-classifier on a different grouping than the file describes. Empty
    clusters are allowed (their meta-label is never positive) and logged.
    """
    path = Path(path).expanduser()
    array = _load(path)
    if array.dtype != object and not np.issubdtype(array.dtype, np.integer):
        raise ClusterFileError(f"{path}: expected integer cluster ids or label ids, got a {array.dtype} array of "
                               f"shape {array.shape}; {CLUSTER_FIX}")
    if array.dtype != object and array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(_check_assignment(path, array.astype(np.int64), num_labels, label_names))
    if array.size == 0:
        raise ClusterFileError(f"{path} holds no clusters; {CLUSTER_FIX}")
    groups = list(array) if array.dtype == object else [row[row >= 0] for row in np.asarray(array)]
    lookup = {str(name): i for i, name in enumerate(label_names)} if label_names is not None else None
    assignment = np.full(num_labels, -1, dtype=np.int64)
    for cluster, members in enumerate(groups):
        ids = np.asarray(members).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            if lookup is None:
                raise ClusterNamesNeeded(f"{path} lists label names: the data's label names are needed to read it")
            ids = np.array([lookup[str(m)] for m in ids if str(m) in lookup], dtype=np.int64)
        ids = np.unique(ids.astype(np.int64))  # a label repeated inside one cluster is harmless
        if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
            bad = ids[(ids < 0) | (ids >= num_labels)]
            raise ClusterFileError(f"{path}: cluster {cluster} names label ids outside [0, {num_labels}) (the data "
                                   f"has {num_labels} labels): {_first(bad, None)}; {CLUSTER_FIX}")
        if (assignment[ids] >= 0).any():
            raise ClusterFileError(f"{path}: a label of cluster {cluster} already belongs to another cluster "
                                   f"(each label must be in exactly one); {CLUSTER_FIX}")
        assignment[ids] = cluster
    missing = np.flatnonzero(assignment < 0)
    if missing.size:
        raise ClusterFileError(f"{path} covers {num_labels - missing.size} of the data's {num_labels} labels; "
                               f"labels in no cluster: {missing.size}, e.g. label {_first(missing, label_names)}. The "
                               f"file was made for another label set: {CLUSTER_FIX}")
    _log_empty(path, assignment, len(groups))
    return torch.from_numpy(assignment)


def _check_assignment(path: Path, assignment: np.ndarray, num_labels: int,
                      label_names: Sequence[str] | None) -> np.ndarray:
    """Validate a 1-D label -> cluster assignment: one non-negative cluster id per label."""
    if assignment.shape[0] != num_labels:
        raise ClusterFileError(f"{path}: a 1-D assignment holds one cluster id per label, {assignment.shape[0]} "
                               f"ids for the data's {num_labels} labels; {CLUSTER_FIX}")
    negative = np.flatnonzero(assignment < 0)
    if negative.size:
        raise ClusterFileError(f"{path}: labels with a negative cluster id: {negative.size}, e.g. label "
                               f"{_first(negative, label_names)}; every label needs a cluster id >= 0; "
                               f"{CLUSTER_FIX}")
    _log_empty(path, assignment, int(assignment.max()) + 1 if assignment.size else 0)
    return assignment


def _log_empty(path: Path, assignment: np.ndarray, num_clusters: int) -> None:
    empty = num_clusters - np.unique(assignment).size
    if empty > 0:
        log.warning("%s: %d of %d clusters have no label (their meta-label is never positive)", path, empty,
                    num_clusters)


def save_assignment(assignment: Tensor, path: Path) -> None:
    """Write the int64 assignment atomically (a reader sees the whole file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, assignment.cpu().numpy().astype(np.int64))
    os.replace(tmp, path)


def _doc_features(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(feature ids, term weights, document row, number of documents)`` of a BoW or a tokenised text batch."""
    if "feature_ids" in batch:
        offsets = batch["feature_offsets"].long()
        docs = offsets.numel() - 1
        rows = torch.repeat_interleave(torch.arange(docs), offsets[1:] - offsets[:-1])
        return batch["feature_ids"].long(), batch["feature_values"].float(), rows, docs
    if "input_ids" in batch:
        ids = batch["input_ids"].long()
        mask = batch.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        docs = ids.shape[0]
        rows = torch.arange(docs)[:, None].expand_as(ids)[keep]
        keys, counts = torch.unique(rows * (1 << 32) + ids[keep], return_counts=True)  # token counts per document
        return keys % (1 << 32), 1.0 + torch.log(counts.float()), keys >> 32, docs  # sublinear tf
    raise ValueError("cluster building needs BoW batches (feature_ids/values/offsets) or text (input_ids)")


@torch.no_grad()
def label_embeddings(batches: Callable[[], Iterable[Mapping[str, Tensor]]], num_labels: int, dim: int = 128,
                     seed: int = 0) -> Tensor:
    """``[num_labels, dim]`` unit rows: the normalised sum of each label's projected, normalised TF-IDF documents.

    ``batches()`` must return a fresh iterable of training batches (it is read twice: document frequencies, then
    the vectors). Batches hold ``label_ids``/``label_offsets`` and BoW or token features. Term weights are the
    sublinear token counts (or the given feature values) times ``idf = log((1 + N) / (1 + df))``, which removes
    tokens present in every document (``[CLS]``, ``[SEP]``). Memory: ``vocab * dim`` floats for the projection.
    """
    df = torch.zeros(0, dtype=torch.long)
    num_docs = 0
    for batch in batches():
        ids, _, rows, docs = _doc_features(batch)
        pairs = torch.unique(rows * (1 << 32) + ids)
        counts = torch.bincount(pairs % (1 << 32))
        if counts.numel() > df.numel():
            df = torch.cat([df, df.new_zeros(counts.numel() - df.numel())])
        df[: counts.numel()] += counts
        num_docs += docs
    idf = torch.log((1.0 + num_docs) / (1.0 + df.float()))
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(max(1, df.numel()), dim, generator=generator) / math.sqrt(dim)
    embeddings = torch.zeros(num_labels, dim)
    pending_ids: list[Tensor] = []
    pending_vectors: list[Tensor] = []

    def flush() -> None:  # one index_add_ per FLUSH_ROWS label rows: small scatters are slow on busy machines
        if pending_ids:
            embeddings.index_add_(0, torch.cat(pending_ids), torch.cat(pending_vectors))
            pending_ids.clear()
            pending_vectors.clear()

    for batch in batches():
        ids, weights, rows, docs = _doc_features(batch)
        weights = weights * idf[ids]
        norms = torch.zeros(docs).index_add_(0, rows, weights * weights).sqrt_().clamp_(min=1e-12)
        offsets = torch.zeros(docs + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(rows, minlength=docs).cumsum(0)
        order = torch.argsort(rows, stable=True)
        vectors = torch.nn.functional.embedding_bag(ids[order], projection, offsets[:-1],
                                                    per_sample_weights=(weights / norms[rows])[order], mode="sum")
        label_offsets = batch["label_offsets"].long()
        label_rows = torch.repeat_interleave(torch.arange(docs), label_offsets[1:] - label_offsets[:-1])
        pending_ids.append(batch["label_ids"].long())
        pending_vectors.append(vectors[label_rows])
        if sum(t.numel() for t in pending_ids) >= FLUSH_ROWS:
            flush()
    flush()
    return torch.nn.functional.normalize(embeddings, dim=1)


@torch.no_grad()
def balanced_kmeans_tree(embeddings: Tensor, num_clusters: int, max_iterations: int = 10, seed: int = 0) -> Tensor:
    """Label -> cluster [N] (int64) by recursive balanced 2-means on unit rows, all nodes of a level at once.

    Cluster ids follow the leaves left to right; sizes are ``floor`` or ``ceil`` of ``N / num_clusters`` up to one
    label per level. Spherical 2-means (cosine similarity, normalised centroids), initialised from two random
    members of each node, stops at ``max_iterations`` or when no label changes side.
    """
    x = torch.nn.functional.normalize(embeddings.float().cpu(), dim=1).contiguous()
    n = x.shape[0]
    num_clusters = max(1, min(num_clusters, n))
    generator = torch.Generator().manual_seed(seed)
    order = torch.arange(n)  # position -> label; every node is a contiguous range of positions
    starts, sizes = torch.zeros(1, dtype=torch.long), torch.tensor([n])
    leaves = torch.tensor([num_clusters])
    while bool((leaves > 1).any()):
        split = leaves > 1
        s_start, s_size, s_leaves = starts[split], sizes[split], leaves[split]
        left_leaves = s_leaves // 2
        left_size = s_size * left_leaves // s_leaves
        order[_node_positions(s_start, s_size)] = _split_level(x, order, s_start, s_size, left_size,
                                                               max_iterations, generator)
        starts = torch.cat([starts[~split], torch.stack([s_start, s_start + left_size], 1).reshape(-1)])
        sizes = torch.cat([sizes[~split], torch.stack([left_size, s_size - left_size], 1).reshape(-1)])
        leaves = torch.cat([leaves[~split], torch.stack([left_leaves, s_leaves - left_leaves], 1).reshape(-1)])
    by_position = torch.argsort(starts)
    cluster_of_position = torch.repeat_interleave(torch.arange(starts.numel()), sizes[by_position])
    assignment = torch.empty(n, dtype=torch.long)
    assignment[order] = cluster_of_position
    return assignment


def _node_positions(starts: Tensor, sizes: Tensor) -> Tensor:
    """The positions of every node, node after node."""
    offsets = torch.cumsum(sizes, 0) - sizes
    node = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    return starts[node] + torch.arange(node.numel()) - offsets[node]


def _split_level(x: Tensor, order: Tensor, starts: Tensor, sizes: Tensor, left_size: Tensor, max_iterations: int,
                 generator: torch.Generator) -> Tensor:
    """Balanced 2-means of every node of a level; returns each node's labels reordered as [left part, right part].

    Nodes are padded to the largest size (sizes of one level differ by a few labels at most), so every 2-means
    iteration is two batched matrix products and one row-wise sort: ``[nodes, size, dim]`` labels against
    ``[nodes, dim]`` centroid differences.
    """
    num_nodes, width = sizes.numel(), int(sizes.max())
    slot = torch.arange(width)
    valid = slot[None, :] < sizes[:, None]  # [nodes, width]
    labels = order[(starts[:, None] + slot[None, :]).clamp(max=order.numel() - 1)]
    xs = x[labels] * valid[:, :, None]  # padding rows are zero vectors
    first = (torch.rand(num_nodes, generator=generator) * sizes).long().clamp_(max=sizes - 1)
    other = (first + 1 + (torch.rand(num_nodes, generator=generator) * (sizes - 1)).long()) % sizes
    rows = torch.arange(num_nodes)
    c_left, c_right = xs[rows, first], xs[rows, other]
    previous: Tensor | None = None
    for _ in range(max(1, max_iterations)):
        score = torch.bmm(xs, (c_left - c_right)[:, :, None]).squeeze(2).masked_fill_(~valid, float("-inf"))
        ranked = torch.argsort(score, dim=1, descending=True, stable=True)  # padding last
        go_left = torch.zeros_like(valid).scatter_(1, ranked, slot[None, :] < left_size[:, None])
        if previous is not None and torch.equal(go_left, previous):
            break
        previous = go_left
        c_left = torch.nn.functional.normalize(torch.bmm(go_left[:, None, :].float(), xs).squeeze(1), dim=1)
        go_right = (valid & ~go_left)[:, None, :].float()
        c_right = torch.nn.functional.normalize(torch.bmm(go_right, xs).squeeze(1), dim=1)
    reordered = labels.gather(1, ranked)  # left part first (highest scores), then the right part, then padding
    return reordered[slot[None, :] < sizes[:, None]]
