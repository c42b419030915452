"""Label clusters (xmc_dst.clusters): cluster files in every accepted form and every way they can be wrong, the
balanced 2-means tree against planted groups, label embeddings against the unprojected TF-IDF sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import OUT, planted_batches

from xmc_dst.clusters import ClusterFileError, balanced_kmeans_tree, label_embeddings, load_cluster_file


@pytest.mark.parametrize("num_labels,num_clusters", [(103, 5), (64, 8), (10, 10)])
def test_balanced_tree_sizes_and_planted_groups(num_labels, num_clusters):
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(num_clusters, 32, generator=g), dim=1)
    truth = torch.randperm(num_labels, generator=g) % num_clusters
    emb = centers[truth] + 0.05 * torch.randn(num_labels, 32, generator=g)
    clusters = balanced_kmeans_tree(emb, num_clusters, seed=1)
    sizes = torch.bincount(clusters, minlength=num_clusters)
    assert sizes.sum() == num_labels and sizes.max() - sizes.min() <= math.ceil(math.log2(num_clusters))
    if num_labels % num_clusters == 0:  # equal planted groups are recovered exactly
        pairs_same = truth[:, None] == truth[None, :]
        assert torch.equal(clusters[:, None] == clusters[None, :], pairs_same)


def test_label_embeddings_approximate_the_tfidf_label_sums():
    batches = planted_batches(num_docs=64)
    emb = label_embeddings(lambda: iter(batches), OUT, dim=4096, seed=0)
    # Reference without projection: dense TF-IDF (binary tf, idf = log((1+N)/(1+df))), normalised documents.
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    idf = torch.log((1 + x.shape[0]) / (1 + (x > 0).sum(0).float()))
    docs = torch.nn.functional.normalize(x * idf, dim=1)
    reference = torch.nn.functional.normalize(y.t() @ docs, dim=1)
    assert (emb @ emb.t() - reference @ reference.t()).abs().max() < 0.1


def test_token_batches_count_terms_and_ignore_padding():
    batch = {"input_ids": torch.tensor([[2, 7, 7, 9, 0], [2, 8, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
             "label_ids": torch.tensor([0, 1]), "label_offsets": torch.tensor([0, 1, 2])}
    emb = label_embeddings(lambda: [batch], 2, dim=2048, seed=0)
    # Token 2 is in every document (idf 0); doc 0 = {7: 1 + log 2, 9: 1}, doc 1 = {8: 1, 3: 1}: disjoint terms.
    assert abs(float(emb[0] @ emb[1])) < 0.1


def test_cluster_files_in_every_accepted_form(tmp_path):
    groups = np.empty(3, dtype=object)
    groups[:] = [np.array([0, 4]), np.array([1, 2, 5]), np.array([3])]
    np.save(tmp_path / "label_group0.npy", groups, allow_pickle=True)
    expected = torch.tensor([0, 1, 1, 2, 0, 1])
    assert torch.equal(load_cluster_file(tmp_path / "label_group0.npy", 6), expected)
    np.save(tmp_path / "rows.npy", np.array([[0, 4, -1], [1, 2, 5], [3, -1, -1]]))
    assert torch.equal(load_cluster_file(tmp_path / "rows.npy", 6), expected)
    np.save(tmp_path / "assignment.npy", expected.numpy())
    assert torch.equal(load_cluster_file(tmp_path / "assignment.npy", 6), expected)
    named = np.empty(3, dtype=object)
    named[:] = [np.array(["a", "e"]), np.array(["b", "c", "f"]), np.array(["d"])]
    np.save(tmp_path / "named.npy", named, allow_pickle=True)
    assert torch.equal(load_cluster_file(tmp_path / "named.npy", 6, list("abcdef")), expected)
    named[:] = [np.array(["a", "e", "zz"]), np.array(["b", "c", "f"]), np.array(["d"])]  # "zz": not a training label
    np.save(tmp_path / "extra.npy", named, allow_pickle=True)
    assert torch.equal(load_cluster_file(tmp_path / "extra.npy", 6, list("abcdef")), expected)  # "zz" skipped
    with pytest.raises(ValueError, match="label names"):
        load_cluster_file(tmp_path / "named.npy", 6)


@pytest.mark.parametrize(("content", "message"), [
    (np.array([[0, 4, -1], [1, 2, -1], [3, -1, -1]]),
     r"covers 5 of the data's 6 labels; labels in no cluster: 1, e\.g\. label 5 \('f'\)"),
    (np.array([[0, 1], [1, 2]]), "a label of cluster 1 already belongs to another cluster"),
    (np.array([[0, 1], [2, 9]]), r"cluster 1 names label ids outside \[0, 6\) \(the data has 6 labels\): 9"),
    (np.array([0, 1, 1, 2, 0]), "5 ids for the data's 6 labels"),
    (np.array([0, 1, -1, 2, 0, 1]), r"labels with a negative cluster id: 1, e\.g\. label 2 \('c'\)"),
    (np.array([0.0, 1.0, 1.0, 2.0, 0.0, 1.0]), "expected integer cluster ids or label ids, got a float64 array"),
    (np.zeros((0, 3), dtype=np.int64), "holds no clusters"),
])
def test_cluster_files_that_do_not_cover_every_label_fail_with_the_fix(tmp_path, content, message):
    """Strict: a stale or foreign file fails before training with what is wrong and the fix, never spread by id."""
    np.save(tmp_path / "clusters.npy", content)
    with pytest.raises(ClusterFileError, match=message) as info:
        load_cluster_file(tmp_path / "clusters.npy", 6, list("abcdef"))
    assert str(tmp_path / "clusters.npy") in str(info.value) and "build_clusters: true" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"cluster file .*nowhere\.npy does not exist.*build_clusters"):
        load_cluster_file(tmp_path / "nowhere.npy", 6)


def test_empty_clusters_are_allowed_and_logged(tmp_path, caplog):
    np.save(tmp_path / "gap.npy", np.array([0, 0, 2, 2]))  # cluster 1 has no label: its meta-label is never positive
    assert load_cluster_file(tmp_path / "gap.npy", 4).tolist() == [0, 0, 2, 2]
    assert "1 of 3 clusters have no label" in caplog.text


def test_cluster_files_are_strict_and_read_label_names(tmp_path):
    groups = np.empty(2, dtype=object)
    groups[0], groups[1] = np.array([0, 2, 4]), np.array([1, 3])
    np.save(tmp_path / "groups.npy", groups, allow_pickle=True)
    assert load_cluster_file(tmp_path / "groups.npy", 5).tolist() == [0, 1, 0, 1, 0]
    np.save(tmp_path / "assign.npy", np.array([1, 1, 0]))
    assert load_cluster_file(tmp_path / "assign.npy", 3).tolist() == [1, 1, 0]
    uncovered = r"covers 5 of the data's 7 labels; labels in no cluster: 2, e\.g\. label 5, 6"
    with pytest.raises(ClusterFileError, match=uncovered):  # labels 5, 6 are in no cluster: strict, not spread
        load_cluster_file(tmp_path / "groups.npy", 7)
    with pytest.raises(ClusterFileError, match=r"cluster 0 names label ids outside \[0, 4\).*: 4;"):
        load_cluster_file(tmp_path / "groups.npy", 4)
    named = np.empty(2, dtype=object)
    named[0], named[1] = np.array(["b", "zz"]), np.array(["a", "c"])  # "zz" is not a training label
    np.save(tmp_path / "named.npy", named, allow_pickle=True)
    assert load_cluster_file(tmp_path / "named.npy", 3, ["a", "b", "c"]).tolist() == [1, 0, 1]
    with pytest.raises(LookupError):
        load_cluster_file(tmp_path / "named.npy", 3)
    with pytest.raises(ClusterFileError, match=r"e\.g\. label 3 \('d'\)"):  # a training label the file lacks
        load_cluster_file(tmp_path / "named.npy", 4, ["a", "b", "c", "d"])
