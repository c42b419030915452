"""Sparse-positive losses against dense references built in the test (BCEWithLogits, a naive squared hinge)."""

from __future__ import annotations

import pytest
import torch

from xmc_dst.losses import bce_with_logits, positive_logits, squared_hinge, xmc_loss


def _random_batch(batch: int = 7, labels: int = 23, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, labels, generator=g, dtype=torch.float64) * 3
    ids, offsets = [], [0]
    for row in range(batch):
        count = 0 if row == 2 else int(torch.randint(1, 6, (1,), generator=g))  # row 2 has no positive
        ids.append(torch.randperm(labels, generator=g)[:count])
        offsets.append(offsets[-1] + count)
    return logits, torch.cat(ids), torch.tensor(offsets)


def _dense_targets(label_ids, label_offsets, batch, labels):
    target = torch.zeros(batch, labels, dtype=torch.float64)
    for row in range(batch):
        target[row, label_ids[label_offsets[row]:label_offsets[row + 1]]] = 1.0
    return target


def _normalise(total, reduction, batch, labels):
    return {"sum": total, "mean": total / (batch * labels), "batch_mean": total / batch}[reduction]



def test_positive_weights_scale_each_positive_term_as_dense_weighted_losses_do():
    logits, ids, offsets = _random_batch(seed=3)
    batch, labels = logits.shape
    target = _dense_targets(ids, offsets, batch, labels)
    weights = torch.rand(labels, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 9 + 1
    element = torch.where(target.bool(), weights.expand(batch, labels), torch.ones_like(target))  # negatives: 1
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=element, reduction="sum")
    hinge = (element * torch.relu(1.0 - (2 * target - 1) * logits).square()).sum()
    close = dict(rtol=1e-5, atol=1e-4)  # the losses compute in fp32
    torch.testing.assert_close(bce_with_logits(logits, ids, offsets, "sum", weights).double(), bce, **close)
    torch.testing.assert_close(squared_hinge(logits, ids, offsets, "sum", weights).double(), hinge, **close)
    ones = torch.ones(labels, dtype=torch.float64)
    unweighted = bce_with_logits(logits, ids, offsets, "sum")
    torch.testing.assert_close(xmc_loss("bce", logits, ids, offsets, "sum", ones), unweighted, **close)


def test_positive_logits_gathers_csr_positives():
    logits, ids, offsets = _random_batch()
    expected = [logits[row, ids[j]] for row in range(len(offsets) - 1) for j in range(offsets[row], offsets[row + 1])]
    torch.testing.assert_close(positive_logits(logits, ids, offsets).double(), torch.stack(expected))


@pytest.mark.parametrize("reduction", ["sum", "mean", "batch_mean"])
def test_bce_matches_dense_bce_with_logits(reduction):
    logits, ids, offsets = _random_batch()
    batch, labels = logits.shape
    target = _dense_targets(ids, offsets, batch, labels)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    got = bce_with_logits(logits.float(), ids, offsets, reduction)
    torch.testing.assert_close(got.double(), _normalise(reference, reduction, batch, labels), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean", "batch_mean"])
def test_squared_hinge_matches_naive_loop(reduction):
    logits, ids, offsets = _random_batch(seed=1)
    batch, labels = logits.shape
    target = _dense_targets(ids, offsets, batch, labels)
    total = 0.0
    for i in range(batch):
        for j in range(labels):
            y = 1.0 if target[i, j] else -1.0
            total += max(0.0, 1.0 - y * float(logits[i, j])) ** 2
    got = squared_hinge(logits.float(), ids, offsets, reduction)
    expected = _normalise(torch.tensor(total, dtype=torch.float64), reduction, batch, labels)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["bce", "squared_hinge"])
def test_gradients_match_dense_reference(name):
    logits, ids, offsets = _random_batch(seed=2)
    batch, labels = logits.shape
    target = _dense_targets(ids, offsets, batch, labels)
    z_sparse = logits.float().clone().requires_grad_(True)
    xmc_loss(name, z_sparse, ids, offsets, "sum").backward()
    z_dense = logits.clone().requires_grad_(True)
    if name == "bce":
        dense = torch.nn.functional.binary_cross_entropy_with_logits(z_dense, target, reduction="sum")
    else:
        y = 2 * target - 1
        dense = torch.clamp(1 - y * z_dense, min=0).pow(2).sum()
    dense.backward()
    torch.testing.assert_close(z_sparse.grad.double(), z_dense.grad, rtol=1e-5, atol=1e-5)


def test_auto_reduction_is_the_authors_choice():
    logits, ids, offsets = _random_batch(seed=3)
    torch.testing.assert_close(bce_with_logits(logits, ids, offsets), bce_with_logits(logits, ids, offsets, "sum"))
    torch.testing.assert_close(squared_hinge(logits, ids, offsets), squared_hinge(logits, ids, offsets, "mean"))


def test_fp16_logits_are_computed_in_fp32():
    logits, ids, offsets = _random_batch(seed=4)
    half = logits.half()
    got = bce_with_logits(half, ids, offsets, "sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, bce_with_logits(half.float(), ids, offsets, "sum"))


def test_empty_positives_and_bad_arguments():
    logits = torch.zeros(3, 4)
    ids, offsets = torch.zeros(0, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    # all negatives at z = 0: softplus(0) = log 2 each; hinge (1 + 0)^2 = 1 each
    torch.testing.assert_close(bce_with_logits(logits, ids, offsets, "sum"), torch.tensor(12 * 0.6931471805599453))
    torch.testing.assert_close(squared_hinge(logits, ids, offsets, "sum"), torch.tensor(12.0))
    with pytest.raises(ValueError, match="reduction"):
        bce_with_logits(logits, ids, offsets, "median")
    with pytest.raises(ValueError, match="loss must be"):
        xmc_loss("focal", logits, ids, offsets)
