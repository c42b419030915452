"""Topology helpers of dynamic sparse training that work on any fixed fan-in layer (``weight``/``indices`` [out, k]).

* :func:`gradient_candidates` picks, per label, the unconnected inputs with the largest dense-gradient magnitude
  (RigL's growth criterion) without ever holding the dense ``[out, in]`` gradient: the gradient of a linear layer is
  ``dy^T x`` and is formed one block of labels at a time.
* :func:`apply_regrowth` writes chosen inputs into the pruned slots, re-sorts every row and returns a
  :class:`~xmc_dst.sparse.RewireResult`, so the layer's ``reset_optimizer_state`` moves optimizer state exactly as
  after its own ``rewire``.
* :class:`EverActive` is the bit-packed "ever active" map behind the in-time over-parameterisation rate (ITOP):
  one bit per possible connection, ``out * ceil(in / 64) * 8`` bytes (670K x 768: 64 MB; a bool map would be 514 MB).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xmc_dst.sparse import RewireResult

# Elements of one [labels, in] block of the dense gradient: 2**24 fp32 values are 64 MB.
GRADIENT_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def gradient_candidates(x: Tensor, dy: Tensor, indices: Tensor, counts: Tensor,
                        chunk_elements: int = GRADIENT_CHUNK_ELEMENTS) -> Tensor:
    """Per label, the ``max(counts)`` unconnected inputs with the largest ``|dL/dW|``, best first.

    Args:
        x: the layer's inputs [B, in] (all micro-batches of the step, all ranks).
        dy: the loss gradient at the layer's outputs [B, out].
        indices: current connections [out, k]; they are never candidates.
        counts: how many inputs each label needs [out]; only labels with ``counts > 0`` are scored.

    Returns ``[out, max(counts)]`` int64 input ids (rows that need fewer use a prefix). Cost: ``2 * B * out * in``
    flops (one dense-head forward) and one ``[chunk, in]`` fp32 block of at most ``chunk_elements`` values at a time.
    """
    num_out, in_features = dy.shape[1], x.shape[1]
    need = int(counts.max()) if counts.numel() else 0
    result = torch.zeros(num_out, need, dtype=torch.long, device=indices.device)
    if need == 0:
        return result
    rows = counts.nonzero().squeeze(1)
    xf = x.float()
    dyf = dy.float()
    chunk = max(1, chunk_elements // max(1, in_features))
    for start in range(0, rows.numel(), chunk):
        block = rows[start:start + chunk]
        scores = (dyf[:, block].t() @ xf).abs_()  # [chunk, in] block of the dense gradient
        scores.nan_to_num_(nan=0.0, posinf=torch.finfo(scores.dtype).max)  # an overflowed fp16 step stays valid
        scores.scatter_(1, indices[block].long(), -1.0)  # connected inputs are never chosen (|g| >= 0 > -1)
        result[block] = scores.topk(need, dim=1, sorted=True).indices
    return result


@torch.no_grad()
def apply_regrowth(weight: Tensor, indices: Tensor, pruned: Tensor, candidates: Tensor) -> RewireResult:
    """Replace the ``pruned`` slots of each row by the row's first candidates, zero their weights, re-sort rows.

    ``candidates[r, :n_r]`` (``n_r`` = pruned slots of row ``r``) must be distinct and absent from the row. The
    pruned slots of a row, left to right, take candidates 0, 1, ...; then each row is sorted and the weights follow.
    ``weight`` and ``indices`` are updated in place.
    """
    rank = pruned.long().cumsum(1) - 1  # position of each pruned slot among its row's pruned slots
    chosen = candidates.gather(1, rank.clamp(min=0, max=max(0, candidates.shape[1] - 1))) \
        if candidates.shape[1] else torch.zeros_like(rank)
    merged = torch.where(pruned, chosen, indices.long())
    sorted_idx, permutation = merged.sort(dim=1)
    regrown = pruned.gather(1, permutation)
    new_weight = weight.gather(1, permutation).masked_fill_(regrown, 0.0)
    weight.copy_(new_weight)
    indices.copy_(sorted_idx.to(indices.dtype))
    return RewireResult(regrown=regrown, permutation=permutation, num_pruned=int(pruned.sum()))


class EverActive:
    """Bit-packed ``[out, in]`` map of every connection that has been active at least once.

    ``rate`` is the in-time over-parameterisation rate (Liu et al., 2021): the share of all ``out * in`` possible
    connections explored so far. Bits are set by adding ``1 << bit`` only where the bit is still clear (indices are
    unique within a row, so no two additions hit the same bit), which is an OR without a bitwise scatter.
    """

    def __init__(self, indices: Tensor, in_features: int) -> None:
        self.in_features = in_features
        self.words = torch.zeros(indices.shape[0], (in_features + 63) // 64, dtype=torch.long, device=indices.device)
        self.count = 0
        self.add(indices)

    def add(self, indices: Tensor) -> int:
        """Mark ``indices`` [out, k] as active; return how many connections were new."""
        if self.words.device != indices.device:
            self.words = self.words.to(indices.device)
        idx = indices.long()
        word, bit = idx >> 6, idx & 63
        fresh = ((self.words.gather(1, word) >> bit) & 1) == 0
        self.words.scatter_add_(1, word, torch.where(fresh, torch.ones_like(idx) << bit, torch.zeros_like(idx)))
        added = int(fresh.sum())
        self.count += added
        return added

    @property
    def rate(self) -> float:
        return self.count / float(self.words.shape[0] * self.in_features)

    def state_dict(self) -> dict:
        return {"words": self.words.cpu(), "count": self.count, "in_features": self.in_features}

    @classmethod
    def from_state_dict(cls, state: dict) -> EverActive:
        obj = cls.__new__(cls)
        obj.words, obj.count, obj.in_features = state["words"], int(state["count"]), int(state["in_features"])
        return obj

    def dense(self) -> Tensor:
        """The map as a bool ``[out, in]`` tensor (tests and small layers only)."""
        bits = (self.words[:, :, None] >> torch.arange(64, device=self.words.device)) & 1
        return bits.reshape(self.words.shape[0], -1)[:, : self.in_features].bool()
