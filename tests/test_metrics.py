"""Tests for xmc_dst.metrics against brute-force references written with plain loops over dense fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xmc_dst.metrics import (
    XMCMetrics,
    filter_reciprocal,
    hits,
    inverse_propensity,
    mask_reciprocal_logits,
    ndcg_at_k,
    precision_at_k,
    psndcg_at_k,
    psp_at_k,
    xmc_metrics,
)

# ----------------------------------------------------------------------------------------------------------------
# Fixtures and brute-force references
# ----------------------------------------------------------------------------------------------------------------


def make_fixture(seed: int, n_docs: int = 40, n_labels: int = 30, k_max: int = 7):
    """Dense 0/1 ground truth with empty rows and rows with few/many positives, integer scores with many ties."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n_docs, n_labels), dtype=np.int64)
    for i in range(n_docs):
        n_pos = int(rng.choice([0, 0, 1, 2, 3, 5, 9]))  # some empty rows, some rows with fewer than k positives
        y[i, rng.choice(n_labels, size=n_pos, replace=False)] = 1
    scores = rng.integers(0, 4, size=(n_docs, n_labels)).astype(np.float64)  # heavy ties
    scores += 2 * y * rng.integers(0, 2, size=y.shape)  # make the model better than chance
    # weights with ties too
    w = 1.0 + rng.integers(1, 5, size=n_labels) / 2.0
    return y, scores, w


def rank_naive(scores_row) -> list[int]:
    """Labels by descending score, ties broken by ascending label id."""
    return sorted(range(len(scores_row)), key=lambda lab: (-scores_row[lab], lab))


def topk_stable(scores: np.ndarray, k: int) -> torch.Tensor:
    """Same ranking as rank_naive, with torch (stable sort keeps ascending label order among ties)."""
    order = torch.sort(torch.from_numpy(scores), dim=1, descending=True, stable=True).indices
    return order[:, :k]


def dense_to_csr(y: np.ndarray, shuffle_seed: int | None = None):
    """CSR (label_ids, label_offsets) of a dense 0/1 matrix; optionally unsorted within rows."""
    rng = np.random.default_rng(shuffle_seed)
    ids, offsets = [], [0]
    for row in y:
        pos = [int(j) for j in np.flatnonzero(row)]
        if shuffle_seed is not None:
            rng.shuffle(pos)
        ids.extend(pos)
        offsets.append(len(ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def reference_metrics(y: np.ndarray, ranked: list[list[int]], ks, w=None) -> dict[str, float]:
    """pyxclib's definitions computed one document and one rank at a time (percent)."""
    n_docs = y.shape[0]
    out = {}
    for k in ks:
        p = nd = psp = psp_best = psn = psn_best = 0.0
        for i in range(n_docs):
            positives = [lab for lab in range(y.shape[1]) if y[i, lab]]
            n_ideal = min(k, len(positives))
            idcg = sum(1.0 / math.log2(r + 1) for r in range(1, n_ideal + 1))
            dcg = psdcg = prec = psprec = 0.0
            for r in range(1, k + 1):
                lab = ranked[i][r - 1]
                if lab >= 0 and y[i, lab]:
                    prec += 1.0
                    dcg += 1.0 / math.log2(r + 1)
                    if w is not None:
                        psprec += w[lab]
                        psdcg += w[lab] / math.log2(r + 1)
            p += prec / k
            nd += dcg / idcg if idcg > 0 else 0.0
            if w is not None:
                best = sorted((w[lab] for lab in positives), reverse=True)[:k]
                psp += psprec / k
                psp_best += sum(best) / k
                if idcg > 0:
                    psn += psdcg / idcg
                    psn_best += sum(b / math.log2(r + 1) for r, b in enumerate(best, start=1)) / idcg
        out[f"P@{k}"] = 100 * p / n_docs
        out[f"nDCG@{k}"] = 100 * nd / n_docs
        if w is not None:
            out[f"PSP@{k}"] = 100 * psp / psp_best
            out[f"PSnDCG@{k}"] = 100 * psn / psn_best
    return out


def assert_close_dict(got: dict, expected: dict, tol: float = 1e-9) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, abs=tol), key


# ----------------------------------------------------------------------------------------------------------------
# hits
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hits_matches_naive(seed: int) -> None:
    y, scores, _ = make_fixture(seed)
    topk = topk_stable(scores, 7)
    topk[::5, -1] = -1  # padding ids are never hits
    label_ids, label_offsets = dense_to_csr(y, shuffle_seed=seed)  # unsorted within rows
    got = hits(topk, label_ids, label_offsets)
    expected = [[bool(lab >= 0 and y[i, lab]) for lab in row] for i, row in enumerate(topk.tolist())]
    assert got.dtype == torch.bool
    assert got.tolist() == expected


def test_hits_no_positives_at_all() -> None:
    topk = torch.tensor([[0, 1], [2, 3]])
    got = hits(topk, torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert got.shape == (2, 2) and not got.any()


def test_hits_large_label_ids() -> None:
    """Keys must not collide across rows for label ids far beyond the batch size (670K+ labels)."""
    topk = torch.tensor([[670_000, 5], [5, 670_000]])
    label_ids = torch.tensor([670_000, 5])
    label_offsets = torch.tensor([0, 1, 2])
    assert hits(topk, label_ids, label_offsets).tolist() == [[True, False], [True, False]]


# ----------------------------------------------------------------------------------------------------------------
# Functional metrics vs brute force
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_functional_matches_bruteforce(seed: int) -> None:
    y, scores, w = make_fixture(seed)
    ks = (1, 3, 5, 7)
    topk = topk_stable(scores, 7)
    ranked = [rank_naive(row) for row in scores]
    assert topk.tolist() == [r[:7] for r in ranked]  # the torch ranking is the naive one, ties included
    label_ids, label_offsets = dense_to_csr(y, shuffle_seed=seed + 100)
    got = xmc_metrics(topk, label_ids, label_offsets, ks=ks, inv_propensity=torch.from_numpy(w))
    assert_close_dict(got, reference_metrics(y, ranked, ks, w))


def test_functional_without_propensity_has_no_ps_keys() -> None:
    y, scores, _ = make_fixture(7)
    topk = topk_stable(scores, 5)
    label_ids, label_offsets = dense_to_csr(y)
    got = xmc_metrics(topk, label_ids, label_offsets)
    assert_close_dict(got, reference_metrics(y, [rank_naive(r) for r in scores], (1, 3, 5)))


def test_single_metric_functions() -> None:
    y, scores, w = make_fixture(11)
    topk = topk_stable(scores, 5)
    label_ids, label_offsets = dense_to_csr(y)
    ref = reference_metrics(y, [rank_naive(r) for r in scores], (1, 3, 5), w)
    wt = torch.from_numpy(w)
    for fn, name, extra in [
        (precision_at_k, "P", ()),
        (ndcg_at_k, "nDCG", ()),
        (psp_at_k, "PSP", (wt,)),
        (psndcg_at_k, "PSnDCG", (wt,)),
    ]:
        got = fn(topk, label_ids, label_offsets, *extra, ks=(1, 3, 5))
        assert got.tolist() == pytest.approx([ref[f"{name}@{k}"] for k in (1, 3, 5)], abs=1e-9)


def test_hand_computed_example() -> None:
    """Doc 0: positives {2, 9}, ranking [1, 2, 3]; doc 1: positive {4}, ranking [4, 5, 6]; doc 2: no positives."""
    topk = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 0]])
    label_ids = torch.tensor([2, 9, 4])
    label_offsets = torch.tensor([0, 2, 3, 3])
    w = torch.ones(10)
    w[2], w[4], w[9] = 2.0, 3.0, 5.0
    got = xmc_metrics(topk, label_ids, label_offsets, ks=(1, 2), inv_propensity=w)
    g = 1 / math.log2(3)
    expected = {
        "P@1": 100 * (0 + 1 + 0) / 3,
        "P@2": 100 * (0.5 + 0.5 + 0) / 3,
        "nDCG@1": 100 * (0 + 1 + 0) / 3,
        "nDCG@2": 100 * (g / (1 + g) + 1 + 0) / 3,  # doc 1: IDCG over min(2, 1) = 1 positive
        "PSP@1": 100 * (0 + 3) / (5 + 3),
        "PSP@2": 100 * (2 / 2 + 3 / 2) / ((5 + 2) / 2 + 3 / 2),
        "PSnDCG@1": 100 * (0 + 3) / (5 + 3),
        "PSnDCG@2": 100 * (2 * g / (1 + g) + 3) / ((5 + 2 * g) / (1 + g) + 3),
    }
    assert_close_dict(got, expected, tol=1e-12)


def test_empty_documents_count_in_denominator() -> None:
    topk = torch.tensor([[3], [0]])
    label_ids = torch.tensor([3])
    got = xmc_metrics(topk, label_ids, torch.tensor([0, 1, 1]), ks=(1,), inv_propensity=torch.ones(4))
    assert float(got["P@1"]) == pytest.approx(50.0)
    assert float(got["nDCG@1"]) == pytest.approx(50.0)
    assert float(got["PSP@1"]) == pytest.approx(100.0)  # the empty row adds nothing to the ideal either


def test_no_positives_anywhere_gives_zero_not_nan() -> None:
    topk = torch.tensor([[0, 1]])
    got = xmc_metrics(
        topk, torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), ks=(1, 2), inv_propensity=torch.ones(2)
    )
    assert all(float(v) == 0.0 for v in got.values())


def test_k_larger_than_predictions_raises() -> None:
    with pytest.raises(ValueError):
        xmc_metrics(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0]), torch.tensor([0, 1, 1]), ks=(1, 5))


# ----------------------------------------------------------------------------------------------------------------
# Propensity
# ----------------------------------------------------------------------------------------------------------------


def test_inverse_propensity_formula_by_hand() -> None:
    counts = torch.tensor([0.0, 1.0, 10.0, 1000.0])
    n = 50_000
    got = inverse_propensity(counts, n)  # A=0.55, B=1.5
    c = (math.log(50_000) - 1) * math.pow(2.5, 0.55)
    expected = [1 + c * math.pow(x + 1.5, -0.55) for x in (0.0, 1.0, 10.0, 1000.0)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # a couple of literal values: N=50000, N_l=0 -> 1 + (ln 5e4 - 1) * 2.5**0.55 / 1.5**0.55
    assert float(got[0]) == pytest.approx(1 + (10.819778284410283 - 1) * (2.5 / 1.5) ** 0.55, rel=1e-12)
    wiki = inverse_propensity(torch.tensor([4.0]), 100, A=0.5, B=0.4)
    assert float(wiki[0]) == pytest.approx(1 + (math.log(100) - 1) * math.sqrt(1.4) / math.sqrt(4.4), rel=1e-12)
    assert torch.all(got[:-1] > got[1:])  # rarer labels weigh more


# ----------------------------------------------------------------------------------------------------------------
# Metric class
# ----------------------------------------------------------------------------------------------------------------


def _batches(seed: int, n_batches: int = 3):
    y, scores, w = make_fixture(seed, n_docs=45)
    topk = topk_stable(scores, 5)
    parts = np.array_split(np.arange(y.shape[0]), n_batches)
    batches = [(topk[idx], *dense_to_csr(y[idx])) for idx in parts]
    return y, topk, torch.from_numpy(w), batches


@pytest.mark.parametrize("with_ps", [False, True])
def test_metric_equals_functional_exactly(with_ps: bool) -> None:
    y, topk, w, _ = _batches(0)
    label_ids, label_offsets = dense_to_csr(y)
    inv = w if with_ps else None
    metric = XMCMetrics(ks=(1, 3, 5), inv_propensity=inv)
    metric.update(topk, label_ids, label_offsets)
    got = metric.compute()
    expected = xmc_metrics(topk, label_ids, label_offsets, ks=(1, 3, 5), inv_propensity=inv)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_metric_accumulates_over_batches(seed: int) -> None:
    y, topk, w, batches = _batches(seed, n_batches=4)
    metric = XMCMetrics(ks=(1, 3, 5), inv_propensity=w)
    for batch in batches:
        metric.update(*batch)
    one_shot = xmc_metrics(topk, *dense_to_csr(y), ks=(1, 3, 5), inv_propensity=w)
    assert_close_dict(metric.compute(), {k: float(v) for k, v in one_shot.items()}, tol=1e-10)
    scores = make_fixture(seed, n_docs=45)[1]
    ref = reference_metrics(y, [rank_naive(r) for r in scores], (1, 3, 5), w.numpy())
    assert_close_dict(metric.compute(), ref)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # merge_state leaves the update counter at 0
def test_merge_state_like_ddp() -> None:
    y, topk, w, batches = _batches(5, n_batches=4)
    full = XMCMetrics(ks=(1, 3, 5), inv_propensity=w)
    rank0 = XMCMetrics(ks=(1, 3, 5), inv_propensity=w)
    rank1 = XMCMetrics(ks=(1, 3, 5), inv_propensity=w)
    for j, batch in enumerate(batches):
        full.update(*batch)
        (rank0 if j % 2 == 0 else rank1).update(*batch)
    expected = {k: float(v) for k, v in full.compute().items()}

    # (a) torchmetrics' merge_state
    merged = XMCMetrics(ks=(1, 3, 5), inv_propensity=w)
    merged.merge_state(rank0)
    merged.merge_state(rank1)
    assert_close_dict(merged.compute(), expected, tol=1e-10)

    # (b) what a DDP all-reduce(sum) does: add the raw states of the two ranks
    summed = XMCMetrics(ks=(1, 3, 5), inv_propensity=w)
    for name in summed._defaults:
        setattr(summed, name, getattr(rank0, name) + getattr(rank1, name))
    summed._update_count = 1
    assert_close_dict(summed.compute(), expected, tol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Reciprocal-pair filtering
# ----------------------------------------------------------------------------------------------------------------


def _filter_fixture(seed: int):
    rng = np.random.default_rng(seed)
    n_test, n_labels, batch = 50, 25, 12
    pairs = sorted({(int(rng.integers(n_test)), int(rng.integers(n_labels))) for _ in range(120)})
    doc_indices = rng.choice(n_test, size=batch, replace=False)
    doc_indices[-1] = doc_indices[0]  # a repeated document must be filtered in both rows
    scores = rng.integers(0, 5, size=(batch, n_labels)).astype(np.float32)
    return pairs, torch.from_numpy(doc_indices), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_reciprocal_matches_naive(seed: int) -> None:
    pairs, doc_indices, scores = _filter_fixture(seed)
    k_cand = 10
    order = torch.sort(torch.from_numpy(scores), dim=1, descending=True, stable=True).indices[:, :k_cand]
    top_scores = torch.from_numpy(scores).gather(1, order)
    got_scores, got_ids = filter_reciprocal(top_scores, order, doc_indices, torch.tensor(pairs))
    pair_set = set(pairs)
    for i in range(order.shape[0]):
        doc = int(doc_indices[i])
        kept = [
            (float(s), int(lab))
            for s, lab in zip(top_scores[i], order[i], strict=True)
            if (doc, int(lab)) not in pair_set
        ]
        n_drop = k_cand - len(kept)
        assert got_ids[i].tolist() == [lab for _, lab in kept] + [-1] * n_drop
        assert got_scores[i].tolist() == [s for s, _ in kept] + [float("-inf")] * n_drop


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_reciprocal_logits_matches_naive(seed: int) -> None:
    pairs, doc_indices, scores = _filter_fixture(seed)
    logits = torch.from_numpy(scores)
    got = mask_reciprocal_logits(logits, doc_indices, torch.tensor(pairs))
    expected = scores.copy()
    for i, doc in enumerate(doc_indices.tolist()):
        for d, lab in pairs:
            if d == doc:
                expected[i, lab] = -np.inf
    assert np.array_equal(got.numpy(), expected)
    assert torch.equal(logits, torch.from_numpy(scores))  # out of place


def test_filter_then_score_equals_mask_then_topk() -> None:
    pairs, doc_indices, scores = _filter_fixture(4)
    pairs_t = torch.tensor(pairs)
    logits = torch.from_numpy(scores)
    k = 5
    max_per_doc = max(sum(1 for d, _ in pairs if d == doc) for doc in doc_indices.tolist())
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : k + max_per_doc]
    _, ids_a = filter_reciprocal(logits.gather(1, order), order, doc_indices, pairs_t)
    ids_b = torch.sort(
        mask_reciprocal_logits(logits, doc_indices, pairs_t), dim=1, descending=True, stable=True
    ).indices
    assert torch.equal(ids_a[:, :k], ids_b[:, :k])
    label_ids = torch.tensor([0, 1, 2, 3] * 12)
    label_offsets = torch.arange(0, 49, 4)
    a = xmc_metrics(ids_a[:, :k], label_ids, label_offsets)
    b = xmc_metrics(ids_b[:, :k], label_ids, label_offsets)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_filter_with_no_pairs_is_identity() -> None:
    ids = torch.tensor([[3, 1, 2]])
    scores = torch.tensor([[0.9, 0.5, 0.1]])
    s, i = filter_reciprocal(scores, ids, torch.tensor([0]), torch.zeros(0, 2, dtype=torch.long))
    assert torch.equal(s, scores) and torch.equal(i, ids)
