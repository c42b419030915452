"""What dynamic sparse training needs beside the fixed fan-in layer's own rewiring (torch only).

* :class:`GradientScores` is RigL's growth criterion, handed to ``rewire(..., candidates=...)``: the magnitude of the
  dense gradient ``|dL/dW|`` of a linear layer, formed from the inputs and output gradients of one step one block of
  outputs at a time (a linear layer's gradient is ``dy^T x``), so the dense ``[out, in]`` gradient never exists.
* :class:`EverActive` is the bit-packed "ever active" map behind the in-time over-parameterisation rate (ITOP):
  one bit per possible connection, ``out * ceil(in / 64) * 8`` bytes (670K x 768: 64 MB; a bool map would be 514 MB),
  or the same for a fixed random sample of rows (a sampling estimate at a fraction of the cost).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GRADIENT_CHUNK_ELEMENTS", "EverActive", "GradientScores"]

# Elements of one [labels, in] block of the dense gradient: 2**24 fp32 values are 64 MB.
GRADIENT_CHUNK_ELEMENTS = 1 << 24


class GradientScores:
    """Regrowth candidates by dense-gradient magnitude (RigL), from one step's layer inputs and output gradients.

    Args:
        x: the layer's inputs [B, in] (all micro-batches of the step, all ranks).
        dy: the loss gradient at the layer's outputs [B, out].
        chunk_elements: at most this many fp32 scores exist at a time (one ``[chunk, in]`` block).

    A layer whose index rows are its outputs (:class:`~xmc_dst.sparse.FixedFanInLinear`) calls
    :meth:`best_unconnected`; a layer whose rows stand for several outputs
    (:class:`~xmc_dst.grouped.GroupedFanInLinear`) passes them as ``members`` and gets their summed scores.
    Non-finite inputs or gradients (an overflowed fp16 step) score as 0, so the topology stays valid.
    """

    def __init__(self, x: Tensor, dy: Tensor, chunk_elements: int = GRADIENT_CHUNK_ELEMENTS) -> None:
        self.x = torch.nan_to_num(x.float())
        self.dy_t = dy.float().t()  # [out, B]: a view of fp32 gradients
        self.in_features, self.num_outputs = x.shape[1], dy.shape[1]
        self.chunk_rows = max(1, chunk_elements // max(1, self.in_features))

    def block(self, outputs: Tensor) -> Tensor:
        """``|dL/dW|`` of the given outputs, fp32 ``[len(outputs), in]``."""
        return (torch.nan_to_num(self.dy_t[outputs]) @ self.x).abs_()

    @torch.no_grad()
    def best_unconnected(self, indices: Tensor, counts: Tensor, members: Tensor | None = None) -> Tensor:
        """Per row of ``indices``, the ``max(counts)`` inputs with the largest score among those not in the row,
        best first: ``[rows, max(counts)]`` int64 (rows that need fewer use a prefix; rows with ``counts == 0`` are
        not scored). A row is one output, or with ``members`` ``[rows, G]`` (output ids, -1 for none) the sum of its
        members' scores (a group of outputs sharing the row). Cost: ``2 * B * outputs * in`` flops, one dense-head
        forward at most."""
        need = int(counts.max()) if counts.numel() else 0
        result = torch.zeros(indices.shape[0], need, dtype=torch.long, device=indices.device)
        if need == 0:
            return result
        rows = counts.nonzero().squeeze(1)
        width = 1 if members is None else members.shape[1]
        chunk = max(1, self.chunk_rows // width)
        for start in range(0, rows.numel(), chunk):
            block_rows = rows[start:start + chunk]
            scores = self._row_scores(block_rows, members)
            scores.scatter_(1, indices[block_rows].long(), -1.0)  # connected inputs are never chosen (|g| >= 0 > -1)
            result[block_rows] = scores.topk(need, dim=1, sorted=True).indices
        return result

    def _row_scores(self, rows: Tensor, members: Tensor | None) -> Tensor:
        if members is None:
            return self.block(rows)
        outputs = members[rows]  # [n, G]
        scores = self.block(outputs.clamp(min=0).reshape(-1)).view(*outputs.shape, self.in_features)
        return scores.mul_((outputs >= 0)[:, :, None]).sum(1)


class EverActive:
    """Bit-packed ``[rows, in]`` map of every connection that has been active at least once.

    ``rate`` is the in-time over-parameterisation rate (Liu et al., 2021): the share of all possible connections
    explored so far. With ``rows`` (a sorted subset of the layer's outputs) only those rows are tracked and the rate
    is a sampling estimate: 65,536 of 670K rows cost 6 MB and a tenth of the time, and estimate the rate with a
    standard error below ``0.5 / sqrt(65536 * in)``. Bits are set by adding ``1 << bit`` where the bit is still
    clear (inputs are unique within a row, so additions into one word hit distinct bits), an OR without a bitwise
    scatter. ``count`` is a 0-d tensor on the map's device: updating it never waits for a GPU.
    """

    def __init__(self, indices: Tensor, in_features: int, rows: Tensor | None = None) -> None:
        self.in_features = in_features
        self.rows = rows.to(indices.device) if rows is not None else None
        num_rows = indices.shape[0] if rows is None else rows.numel()
        self.words = torch.zeros(num_rows, (in_features + 63) // 64, dtype=torch.long, device=indices.device)
        self.count = torch.zeros((), dtype=torch.long, device=indices.device)
        self.add(indices)

    @classmethod
    def sampled(cls, indices: Tensor, in_features: int, max_rows: int | None, seed: int = 0) -> EverActive:
        """Track every row, or a fixed random sample of ``max_rows`` rows when the layer has more."""
        if max_rows is None or indices.shape[0] <= max_rows:
            return cls(indices, in_features)
        sample = torch.randperm(indices.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        return cls(indices, in_features, sample.sort().values)

    def add(self, indices: Tensor, only: Tensor | None = None) -> Tensor:
        """Mark ``indices`` [out, k] as active (only where the bool mask ``only`` is set, e.g. the regrown slots of
        a rewire: survivors are marked already); return how many tracked connections were new (a 0-d tensor).

        Every slot is processed and the unwanted ones add zero: no boolean indexing, whose result size would have
        to be read back from the device.
        """
        if self.words.device != indices.device:  # once, after a checkpoint restored the map on CPU
            self.words, self.count = self.words.to(indices.device), self.count.to(indices.device)
        if self.rows is not None:
            self.rows = self.rows.to(indices.device)
            indices = indices.index_select(0, self.rows)
            only = only.index_select(0, self.rows) if only is not None else None
        idx = indices.long()
        row = torch.arange(idx.shape[0], device=idx.device)[:, None]
        flat = (row * self.words.shape[1] + (idx >> 6)).reshape(-1)
        bit = (idx & 63).reshape(-1)
        words = self.words.view(-1)
        fresh = ((words[flat] >> bit) & 1) == 0
        if only is not None:
            fresh &= only.reshape(-1)
        words.index_add_(0, flat, fresh.long() << bit)
        added = fresh.sum()
        self.count += added
        return added

    @property
    def possible(self) -> int:
        """Connections the map covers: tracked rows x inputs."""
        return self.words.shape[0] * self.in_features

    @property
    def rate(self) -> float:
        return int(self.count) / float(self.possible)

    def state_dict(self) -> dict:
        return {"words": self.words.cpu(), "count": int(self.count), "in_features": self.in_features,
                "rows": self.rows.cpu() if self.rows is not None else None}

    @classmethod
    def from_state_dict(cls, state: dict) -> EverActive:
        obj = cls.__new__(cls)
        obj.words, obj.in_features = state["words"], int(state["in_features"])
        obj.count = torch.tensor(int(state["count"]), dtype=torch.long, device=obj.words.device)
        obj.rows = state.get("rows")
        return obj

    def dense(self) -> Tensor:
        """The map as a bool ``[rows, in]`` tensor (tests and small layers only)."""
        bits = (self.words[:, :, None] >> torch.arange(64, device=self.words.device)) & 1
        return bits.reshape(self.words.shape[0], -1)[:, : self.in_features].bool()
