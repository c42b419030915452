"""Multi-label losses computed from dense logits and sparse (CSR) positives, never from a dense target matrix.

A batch's positives are ``label_ids`` [nnz] with ``label_offsets`` [batch + 1] (the datamodules' format, see
:mod:`xmc_dst.metrics`); they are assumed distinct within a row. With ``L`` labels the dense target matrix would be
``batch x L`` floats next to the logits; each loss below is instead "every logit as a negative" plus a correction at
the ``nnz`` positives, gathered by index.

Reductions, and which one the authors of the SPARTEX paper use:

* ``sum``: the sum over all ``batch x L`` entries. Their binary cross-entropy (adopted from Renee) is this.
* ``mean``: the sum divided by ``batch x L``. Their squared hinge is ``sparse_hinge_loss(...).mean()`` over an
  element-wise loss (as in their earlier TensorFlow code, a mean over labels then over the batch), i.e. this.
* ``batch_mean``: the sum divided by ``batch`` (sum over labels, mean over documents).

``auto`` picks the authors' choice for the loss. With Adam the scale hardly matters; with SGD it sets the step size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

Reduction = Literal["auto", "sum", "mean", "batch_mean"]
LossName = Literal["bce", "squared_hinge"]
AUTHORS_REDUCTION: dict[str, str] = {"bce": "sum", "squared_hinge": "mean"}

__all__ = ["AUTHORS_REDUCTION", "LOSSES", "bce_with_logits", "positive_logits", "rows_of", "squared_hinge", "xmc_loss"]


def rows_of(label_offsets: Tensor, nnz: int) -> Tensor:
    """Row index of every positive of the CSR ``label_offsets`` (length ``nnz``)."""
    lengths = label_offsets[1:] - label_offsets[:-1]
    rows = torch.arange(lengths.numel(), device=label_offsets.device)
    return torch.repeat_interleave(rows, lengths.to(rows.device), output_size=nnz)


def positive_logits(logits: Tensor, label_ids: Tensor, label_offsets: Tensor) -> Tensor:
    """The logits at the positives, [nnz], in CSR order."""
    label_ids = label_ids.to(logits.device).long()
    rows = rows_of(label_offsets.to(logits.device), label_ids.numel())
    return logits[rows, label_ids]


def _reduce(total: Tensor, logits: Tensor, reduction: str, loss: str) -> Tensor:
    if reduction == "auto":
        reduction = AUTHORS_REDUCTION[loss]
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(1, logits.numel())
    if reduction == "batch_mean":
        return total / max(1, logits.shape[0])
    raise ValueError(f"reduction must be one of auto, sum, mean, batch_mean; got {reduction!r}")


def _weighted(terms: Tensor, label_ids: Tensor, positive_weights: Tensor | None) -> Tensor:
    """The positives' loss terms, each times its label's weight when there are weights."""
    if positive_weights is None:
        return terms.sum()
    weights = positive_weights.to(device=terms.device, dtype=terms.dtype)
    return (terms * weights[label_ids.to(terms.device).long()]).sum()


def bce_with_logits(logits: Tensor, label_ids: Tensor, label_offsets: Tensor, reduction: Reduction = "auto",
                    positive_weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy ``sum softplus(z) - sum_{positives} z`` (exactly BCE with 0/1 targets), in fp32.

    ``softplus(z) = -log(1 - sigmoid(z))`` is the loss of a negative; a positive's loss ``softplus(-z)`` equals
    ``softplus(z) - z``, hence the correction at the positives only. ``positive_weights`` [num_labels] multiplies
    each positive's term by its label's weight (e.g. inverse propensities: tail positives count more).
    """
    z = logits.float()
    pos = positive_logits(z, label_ids, label_offsets)
    total = F.softplus(z).sum() - F.softplus(pos).sum() + _weighted(F.softplus(-pos), label_ids, positive_weights)
    return _reduce(total, z, reduction, "bce")


def squared_hinge(logits: Tensor, label_ids: Tensor, label_offsets: Tensor, reduction: Reduction = "auto",
                  positive_weights: Tensor | None = None, margin: float = 1.0) -> Tensor:
    """Squared hinge ``sum max(0, margin - y z)^2`` with ``y = +1`` at positives and ``-1`` elsewhere, in fp32;
    ``positive_weights`` as in :func:`bce_with_logits`."""
    z = logits.float()
    pos = positive_logits(z, label_ids, label_offsets)
    total = F.relu(margin + z).square().sum() - F.relu(margin + pos).square().sum()
    total = total + _weighted(F.relu(margin - pos).square(), label_ids, positive_weights)
    return _reduce(total, z, reduction, "squared_hinge")


LOSSES = {"bce": bce_with_logits, "squared_hinge": squared_hinge}


def xmc_loss(name: LossName, logits: Tensor, label_ids: Tensor, label_offsets: Tensor,
             reduction: Reduction = "auto", positive_weights: Tensor | None = None) -> Tensor:
    """Dispatch by loss name (``bce`` or ``squared_hinge``)."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}") from None
    return fn(logits, label_ids, label_offsets, reduction, positive_weights)
