"""benchmarks/peers.py: feature building, the unseen-label protocol and the metric glue against brute force.

The peer packages are optional: their tests skip when the package (or PECOS's interpreter) is missing.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sp = pytest.importorskip("scipy.sparse")  # scipy and scikit-learn come with the `test` extra
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]
# Loaded from its file, not by putting benchmarks/ on sys.path (its metrics.py / data.py would shadow other modules).
_SPEC = importlib.util.spec_from_file_location("benchmarks_peers", REPO / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = peers  # dataclasses resolve their module through sys.modules
_SPEC.loader.exec_module(peers)


def _peer_data(x_train: sp.csr_matrix, y_train: sp.csr_matrix, x_test: sp.csr_matrix, test_rows: list[list[int]],
               inv: np.ndarray) -> peers.PeerData:
    y_test = peers.label_matrix(test_rows, y_train.shape[1])
    return peers.PeerData("toy", "toy", x_train, y_train, x_test, y_test.indices.astype(np.int64),
                          y_test.indptr.astype(np.int64), inv, "toy", inv, "toy")


def test_tfidf_bow_equals_hand_computation() -> None:
    x_train = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=np.float32))
    x_test = sp.csr_matrix(np.array([[0, 1, 1, 1], [1, 0, 0, 0]], dtype=np.float32))
    train, test, description = peers.tfidf_bow(x_train, x_test)
    n, df = 3, np.array([3, 2, 1, 1])
    idf = np.log((1 + n) / (1 + df)) + 1  # scikit-learn's smoothed idf, fitted on train only
    for got, dense in ((train, x_train.toarray()), (test, x_test.toarray())):
        expected = dense * idf
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        assert got.dtype == np.float32 and got.has_sorted_indices
        np.testing.assert_allclose(got.toarray(), expected, rtol=1e-6)
    assert "TfidfTransformer" in description


def test_tfidf_text_uses_train_unigrams_and_bigrams_only() -> None:
    train, test, description = peers.tfidf_text(["red apple pie", "green apple"], ["red pie banana", "apple pie"])
    # vocabulary: red, apple, pie, green + red apple, apple pie, green apple
    assert train.shape == (2, 7) and test.shape == (2, 7) and "7 terms" in description
    assert test[0].nnz == 2  # red, pie ("banana" and "red pie" are not in the training vocabulary)
    assert test[1].nnz == 3  # apple, pie, "apple pie"
    np.testing.assert_allclose(sp.linalg.norm(train, axis=1), 1.0, rtol=1e-6)


def test_drop_unseen_keeps_documents() -> None:
    indptr = np.array([0, 2, 3, 3, 5])
    indices = np.array([0, 3, 3, 1, 2])
    counts = np.array([5, 1, 2, 0])  # label 3 never occurs in training
    ids, offsets, dropped = peers.drop_unseen(indptr, indices, counts)
    assert dropped == 2
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_array_equal(offsets, [0, 1, 1, 1, 3])


def test_topk_rows_pads_with_minus_one() -> None:
    np.testing.assert_array_equal(peers.topk_rows([[4, 2], [], [1, 2, 3, 4, 5, 6]], k=5),
                                  [[4, 2, -1, -1, -1], [-1] * 5, [1, 2, 3, 4, 5]])


def _brute_force(topk: np.ndarray, positives: list[list[int]], inv: np.ndarray, k: int) -> tuple[float, float]:
    """P@k and PSP@k (percent) straight from the definitions (pyxclib): loops, no vectorisation."""
    p_sum = psp_num = psp_den = 0.0
    for row, pos in zip(topk, positives, strict=True):
        hits = [int(label) for label in row[:k] if label >= 0 and int(label) in pos]
        p_sum += len(hits) / k
        psp_num += sum(inv[label] for label in hits) / k
        psp_den += sum(sorted((inv[label] for label in pos), reverse=True)[:k]) / k
    return 100 * p_sum / len(positives), 100 * psp_num / psp_den


def test_evaluate_equals_brute_force_with_project_propensity() -> None:
    rng = np.random.default_rng(0)
    num_labels, docs = 12, 30
    counts = rng.integers(1, 50, size=num_labels)
    inv = peers.inverse_propensities(counts, 200)
    # Jain et al. (2016) by hand: w = 1 + C (N_l + B)^-A, C = (ln N - 1)(B + 1)^A, A = 0.55, B = 1.5
    np.testing.assert_allclose(inv, 1 + (np.log(200) - 1) * 2.5**0.55 * (counts + 1.5) ** -0.55, rtol=1e-12)
    positives = [sorted(rng.choice(num_labels, size=rng.integers(0, 5), replace=False).tolist()) for _ in range(docs)]
    topk = np.stack([rng.permutation(num_labels)[:5] for _ in range(docs)])
    topk[3, 2:] = -1  # a peer that returned fewer than 5 labels
    empty = sp.csr_matrix((1, 1), dtype=np.float32)
    data = _peer_data(empty, sp.csr_matrix((1, num_labels), dtype=np.float32), empty, positives, inv)
    got = peers.evaluate(topk, data)
    for k in peers.KS:
        p_k, psp_k = _brute_force(topk, positives, inv, k)
        assert got[f"P@{k}"] == pytest.approx(p_k, abs=1e-9)
        assert got[f"PSP@{k}"] == pytest.approx(psp_k, abs=1e-9)


def test_load_bow_drops_unseen_labels_and_keeps_docs(tmp_path: Path) -> None:
    from datamodules import BoWXMCDataModule

    (tmp_path / "train.txt").write_text("4 3 4\n0 0:1 1:1\n1 1:1\n0,1 0:1 2:1\n 2:1\n", encoding="ascii")
    (tmp_path / "test.txt").write_text("2 3 4\n0,3 0:1\n2,3 1:1 2:1\n", encoding="ascii")  # 2, 3: no train positive
    data = peers.load_bow(BoWXMCDataModule(tmp_path), "tiny", propensity="full-train")
    assert data.x_train.shape == (4, 3) and data.y_train.shape == (4, 4) and data.x_test.shape == (2, 3)
    np.testing.assert_array_equal(data.test_label_ids, [0])
    np.testing.assert_array_equal(data.test_label_offsets, [0, 1, 1])
    assert data.notes[0].startswith("3 test positives")
    np.testing.assert_allclose(data.inv_propensity, peers.inverse_propensities(np.array([2, 2, 0, 0]), 4))


def test_write_xc_is_read_back_by_the_project_reader(tmp_path: Path) -> None:
    from datamodules.formats import read_xc_single

    x = peers._f32(sp.csr_matrix(np.array([[0.5, 0, 0.25], [0, 0, 1.0], [0.125, 0.5, 0]])))
    y = peers.label_matrix([[1, 3], [], [0]], 4)
    peers.write_xc(tmp_path / "train.txt", x, y)
    back = read_xc_single(tmp_path / "train.txt")
    np.testing.assert_array_equal(back.label_indptr, y.indptr)
    np.testing.assert_array_equal(back.label_indices, y.indices)
    np.testing.assert_allclose(sp.csr_matrix((back.feature_values, back.feature_indices, back.feature_indptr),
                                             shape=x.shape).toarray(), x.toarray())


def _separable(seed: int = 0) -> peers.PeerData:
    """Six labels, each marked by its own feature (plus noise): a correct peer gets P@1 = 100."""
    rng = np.random.default_rng(seed)

    def docs(n: int) -> tuple[sp.csr_matrix, list[list[int]]]:
        labels = [[i % 6] for i in range(n)]
        dense = rng.random((n, 10)) * 0.1
        for row, (label,) in enumerate(labels):
            dense[row, label] = 1.0
        return peers._f32(sp.csr_matrix(dense)), labels

    x_train, train_labels = docs(60)
    x_test, test_labels = docs(12)
    return _peer_data(x_train, peers.label_matrix(train_labels, 6), x_test, test_labels, np.ones(6))


@pytest.mark.parametrize("system", ["omikuji-parabel", "omikuji-bonsai", "napkinxc-plt", "pecos-xrlinear"])
def test_peer_learns_a_separable_toy(system: str) -> None:
    if system.startswith("omikuji"):
        pytest.importorskip("omikuji")
    if system.startswith("napkinxc"):
        pytest.importorskip("napkinxc")
    if system.startswith("pecos") and peers._probe_pecos(peers.pecos_python()):
        pytest.skip(peers._probe_pecos(peers.pecos_python()) or "")
    fit_predict, _ = peers.PEERS[system]
    topk, train_s, predict_s = fit_predict(_separable(), 1, 0)
    assert topk.shape == (12, peers.TOP_K) and train_s >= 0 and predict_s >= 0
    assert peers.evaluate(topk, _separable())["P@1"] == pytest.approx(100.0)


def test_row_schema_and_markdown() -> None:
    row = {"dataset": "toy", "system": "s", "runs": 2, "metrics": {m: [1.0, 0.5] for m in peers.METRICS},
           "train_s": [1.0, 0.1], "predict_s": [0.2, 0.0], "features": "f", "params": "p", "train_docs": 1,
           "test_docs": 1, "num_labels": 1, "train_split": "full", "propensity": "A", "notes": [], "machine": "m",
           "commit": "c" * 40, "command": "python x", "threads": 2}
    text = peers.markdown([row])
    assert "| toy | s | 2 | 1.00 ± 0.50 |" in text and "| - |" in text and "`python x`" in text
    assert peers.mean_std([1.0, 2.0, 3.0]) == [2.0, 1.0] and peers.mean_std([4.0]) == [4.0, 0.0]
    assert math.isclose(peers.mean_std([0.1, 0.2])[0], 0.15)
    assert importlib.util.find_spec("yaml") is not None  # the protocol is read from configs/<dataset>.yaml
    from benchmarks.quality import DATASETS as GRID  # importable: loading peers.py put the repository on sys.path

    for dataset in peers.DATASETS:  # the split our models train on, read from the config each dataset runs with
        data = yaml.safe_load((REPO / GRID[dataset]["config"]).read_text(encoding="utf-8"))["data"]["init_args"]
        assert peers._config_protocol(dataset) == (data["val_fraction"], data.get("seed", 42))
    with pytest.raises(FileNotFoundError, match="configs/nowhere.yaml"):
        peers._config_protocol("nowhere")
