"""Ranking metrics for extreme multi-label classification (P@k, nDCG@k, PSP@k, PSnDCG@k).

Conventions (shared by the functional API and :class:`XMCMetrics`):

* Positives are CSR: ``label_ids`` [nnz] and ``label_offsets`` [batch + 1] with ``label_offsets[0] == 0`` and
  ``label_offsets[-1] == nnz``; the positives of document ``i`` are ``label_ids[label_offsets[i]:label_offsets[i+1]]``
  and are assumed to be distinct. Predictions are ``topk_ids`` [batch, k_max], best first. Negative ids are padding
  (never a hit), e.g. what :func:`filter_reciprocal` leaves behind.
* Definitions follow pyxclib (``xclib.evaluation.xc_metrics``):
  ``P@k = mean_i (1/k) sum_{r<=k} hit_ir``;
  ``nDCG@k = mean_i DCG@k_i / IDCG@k_i`` with ``DCG@k_i = sum_{r<=k} hit_ir / log2(r+1)`` and ``IDCG@k_i`` the DCG of
  ``min(k, n_i)`` hits, ``n_i`` the number of positives of document ``i``;
  ``PSP@k = sum_i (1/k) sum_{r<=k} w_ir hit_ir / sum_i (1/k) sum_{r<=k} w*_ir`` where ``w*_i`` are the propensity
  weights of document ``i``'s positives sorted descending (the best achievable ranking), zero-padded;
  ``PSnDCG@k`` is the same ratio of sums of ``PSDCG@k_i / IDCG@k_i`` (IDCG unweighted, as in pyxclib).
* A document with no positives contributes 0 to every numerator (and to the PS denominators) but is still counted
  in the number of documents, exactly as pyxclib does (its row mean includes such rows).
* All values are returned in percent (x100). A metric whose denominator is zero (no document, or no positive at
  all for the PS metrics) is reported as 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "XMCMetrics",
    "filter_reciprocal",
    "hits",
    "inverse_propensity",
    "mask_reciprocal_logits",
    "ndcg_at_k",
    "precision_at_k",
    "psndcg_at_k",
    "psp_at_k",
    "xmc_metrics",
]

# (row, label) pairs are encoded as row * _KEY_BASE + label; valid for labels < 2**32 and rows < 2**31.
_KEY_BASE = 1 << 32
_SUM_NAMES = ("p", "ndcg", "psp", "psp_ideal", "psndcg", "psndcg_ideal")


def _rows_of_positives(label_ids: Tensor, label_offsets: Tensor) -> Tensor:
    """Row index of every positive in the CSR ``label_ids`` (no host sync).

    A +1 at each row start, then a cumsum (empty rows stack their +1s); cheaper than ``repeat_interleave`` on
    CPU, whose thread pool wake-up dominates at these sizes.
    """
    starts = torch.zeros(label_ids.numel() + 1, dtype=torch.long, device=label_ids.device)
    inner = label_offsets[1:-1].to(device=label_ids.device, dtype=torch.long)
    starts.index_add_(0, inner, torch.ones_like(inner))
    return torch.cumsum(starts[:-1], 0)


def hits(topk_ids: Tensor, label_ids: Tensor, label_offsets: Tensor) -> Tensor:
    """Return a BoolTensor [batch, k_max]: ``True`` where ``topk_ids[i, r]`` is a positive of document ``i``.

    Vectorised: (row, label) pairs are encoded as ``row * 2**32 + label`` keys and looked up with ``torch.isin``
    (sort based); memory is O(nnz + batch * k_max). Negative (padding) ids are never hits.
    """
    batch, k_max = topk_ids.shape
    if label_ids.numel() == 0 or topk_ids.numel() == 0:
        return torch.zeros(batch, k_max, dtype=torch.bool, device=topk_ids.device)
    rows = _rows_of_positives(label_ids, label_offsets)
    pos_keys = rows * _KEY_BASE + label_ids.long()
    query = torch.arange(batch, device=topk_ids.device).unsqueeze(1) * _KEY_BASE + topk_ids.long()
    return torch.isin(query, pos_keys) & (topk_ids >= 0)


def inverse_propensity(label_counts: Tensor, num_docs: int, A: float = 0.55, B: float = 1.5) -> Tensor:
    """Inverse propensity ``w_l = 1 + C (N_l + B)^-A`` with ``C = (ln N - 1)(B + 1)^A`` (Jain et al., KDD 2016).

    ``label_counts`` [num_labels] holds the training frequency ``N_l`` of each label, ``num_docs`` the number of
    training documents ``N``. Typical (A, B): (0.55, 1.5) by default, (0.5, 0.4) Wikipedia, (0.6, 2.6) Amazon.
    """
    c = (math.log(num_docs) - 1.0) * (B + 1.0) ** A
    return 1.0 + c * torch.pow(label_counts.double() + B, -A)


def _ideal_weights(label_ids: Tensor, label_offsets: Tensor, inv_propensity: Tensor, k_max: int) -> Tensor:
    """[batch, k_max] weights of each row's positives sorted descending (the best ranking), zero-padded."""
    batch = label_offsets.numel() - 1
    out = torch.zeros(batch, k_max, dtype=torch.float64, device=label_ids.device)
    if label_ids.numel() == 0:
        return out
    rows = _rows_of_positives(label_ids, label_offsets)
    w = inv_propensity.to(device=label_ids.device, dtype=torch.float64)[label_ids]
    order = torch.argsort(w, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # rows ascending, weights descending within a row
    rows, w = rows[order], w[order]
    rank = torch.arange(rows.numel(), device=rows.device) - label_offsets[rows]
    keep = rank < k_max
    out[rows[keep], rank[keep]] = w[keep]
    return out


def _check_ks(ks: Sequence[int], k_max: int) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if max(ks) > k_max:
        raise ValueError(f"max(ks)={max(ks)} exceeds the number of predictions per row ({k_max})")
    return ks


def _batch_sums(
    topk_ids: Tensor,
    label_ids: Tensor,
    label_offsets: Tensor,
    ks: Sequence[int],
    inv_propensity: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-batch sums over documents (float64, one entry per k) that every metric is a ratio of."""
    ks = _check_ks(ks, topk_ids.shape[1])
    k_hi = max(ks)
    device = topk_ids.device
    topk_ids = topk_ids[:, :k_hi]
    h = hits(topk_ids, label_ids, label_offsets).double()
    col = torch.tensor([k - 1 for k in ks], device=device)
    inv_k = 1.0 / torch.tensor(ks, dtype=torch.float64, device=device)
    disc = 1.0 / torch.log2(torch.arange(2, k_hi + 2, dtype=torch.float64, device=device))  # 1/log2(r+1)
    cum_disc = torch.cumsum(disc, 0)
    n_pos = (label_offsets[1:] - label_offsets[:-1]).to(device)
    # IDCG@k per row = DCG of min(k, n_pos) hits; rows without positives get 1 (their DCG is 0 anyway).
    n_ideal = torch.minimum(n_pos.unsqueeze(1), torch.tensor(ks, device=device))  # [batch, |ks|]
    idcg = torch.where(n_ideal > 0, cum_disc[(n_ideal - 1).clamp(min=0)], 1.0)

    sums = {
        "p": (torch.cumsum(h, 1)[:, col] * inv_k).sum(0),
        "ndcg": (torch.cumsum(h * disc, 1)[:, col] / idcg).sum(0),
    }
    if inv_propensity is not None:
        w = inv_propensity.to(device=device, dtype=torch.float64)
        wh = w[topk_ids.clamp(min=0)] * h
        wi = _ideal_weights(label_ids, label_offsets, w, k_hi)
        sums["psp"] = (torch.cumsum(wh, 1)[:, col] * inv_k).sum(0)
        sums["psp_ideal"] = (torch.cumsum(wi, 1)[:, col] * inv_k).sum(0)
        sums["psndcg"] = (torch.cumsum(wh * disc, 1)[:, col] / idcg).sum(0)
        sums["psndcg_ideal"] = (torch.cumsum(wi * disc, 1)[:, col] / idcg).sum(0)
    return sums


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, 100.0 * num / torch.where(den > 0, den, 1.0), torch.zeros_like(num))


def _finalise(sums: dict[str, Tensor], num_docs: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Turn document sums into the metric dict (percent)."""
    values = {"P": _safe_ratio(sums["p"], num_docs), "nDCG": _safe_ratio(sums["ndcg"], num_docs)}
    if "psp" in sums:
        values["PSP"] = _safe_ratio(sums["psp"], sums["psp_ideal"])
        values["PSnDCG"] = _safe_ratio(sums["psndcg"], sums["psndcg_ideal"])
    return {f"{name}@{k}": v[j] for name, v in values.items() for j, k in enumerate(ks)}


def xmc_metrics(
    topk_ids: Tensor,
    label_ids: Tensor,
    label_offsets: Tensor,
    ks: Sequence[int] = (1, 3, 5),
    inv_propensity: Tensor | None = None,
) -> dict[str, Tensor]:
    """All metrics at once: ``{"P@k", "nDCG@k"}`` and, with ``inv_propensity``, ``{"PSP@k", "PSnDCG@k"}`` (percent)."""
    ks = _check_ks(ks, topk_ids.shape[1])
    sums = _batch_sums(topk_ids, label_ids, label_offsets, ks, inv_propensity)
    num_docs = torch.tensor(float(topk_ids.shape[0]), dtype=torch.float64, device=topk_ids.device)
    return _finalise(sums, num_docs, ks)


def _select(values: dict[str, Tensor], name: str, ks: Sequence[int]) -> Tensor:
    return torch.stack([values[f"{name}@{k}"] for k in ks])


def precision_at_k(topk_ids: Tensor, label_ids: Tensor, label_offsets: Tensor, ks: Sequence[int] = (1, 3, 5)) -> Tensor:
    """P@k for each k in ``ks`` (percent), as a float64 tensor [len(ks)]."""
    return _select(xmc_metrics(topk_ids, label_ids, label_offsets, ks), "P", ks)


def ndcg_at_k(topk_ids: Tensor, label_ids: Tensor, label_offsets: Tensor, ks: Sequence[int] = (1, 3, 5)) -> Tensor:
    """nDCG@k for each k in ``ks`` (percent), as a float64 tensor [len(ks)]."""
    return _select(xmc_metrics(topk_ids, label_ids, label_offsets, ks), "nDCG", ks)


def psp_at_k(
    topk_ids: Tensor, label_ids: Tensor, label_offsets: Tensor, inv_propensity: Tensor, ks: Sequence[int] = (1, 3, 5)
) -> Tensor:
    """PSP@k for each k in ``ks`` (percent), normalised by the best achievable PSP@k on these documents."""
    return _select(xmc_metrics(topk_ids, label_ids, label_offsets, ks, inv_propensity), "PSP", ks)


def psndcg_at_k(
    topk_ids: Tensor, label_ids: Tensor, label_offsets: Tensor, inv_propensity: Tensor, ks: Sequence[int] = (1, 3, 5)
) -> Tensor:
    """PSnDCG@k for each k in ``ks`` (percent), normalised by the best achievable value on these documents."""
    return _select(xmc_metrics(topk_ids, label_ids, label_offsets, ks, inv_propensity), "PSnDCG", ks)


class XMCMetrics(Metric):
    """P@k, nDCG@k and (given ``inv_propensity``) PSP@k, PSnDCG@k accumulated over batches, in percent.

    States are float64 sums with ``dist_reduce_fx="sum"`` (DDP-safe, mergeable); an update needs
    O(batch * k_max + nnz) memory. ``compute()`` returns the same dict as :func:`xmc_metrics` on the concatenation.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 3, 5), inv_propensity: Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks, max((int(k) for k in ks), default=0))
        self.inv_propensity: Tensor | None
        if inv_propensity is not None:
            self.register_buffer("inv_propensity", inv_propensity.detach().double(), persistent=False)
        else:
            self.inv_propensity = None
        names = _SUM_NAMES if inv_propensity is not None else _SUM_NAMES[:2]
        for name in names:
            self.add_state(f"{name}_sum", torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_docs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, topk_ids: Tensor, label_ids: Tensor, label_offsets: Tensor) -> None:
        """Accumulate one batch: ``topk_ids`` [batch, k_max], CSR positives ``label_ids``/``label_offsets``."""
        sums = _batch_sums(topk_ids, label_ids, label_offsets, self.ks, self.inv_propensity)
        for name, value in sums.items():
            state = getattr(self, f"{name}_sum")
            setattr(self, f"{name}_sum", state + value.to(state.device))
        self.num_docs = self.num_docs + topk_ids.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """The metric dict ``{"P@k", "nDCG@k"[, "PSP@k", "PSnDCG@k"]}`` in percent."""
        names = _SUM_NAMES if self.inv_propensity is not None else _SUM_NAMES[:2]
        sums = {name: getattr(self, f"{name}_sum") for name in names}
        return _finalise(sums, self.num_docs, self.ks)


def filter_reciprocal(
    topk_scores: Tensor, topk_ids: Tensor, doc_indices: Tensor, filter_pairs: Tensor
) -> tuple[Tensor, Tensor]:
    """Drop the (test doc, label) pairs of ``filter_labels_test.txt`` from top-k predictions ("drop and shift").

    ``doc_indices`` [batch] are the rows' indices in the test set, ``filter_pairs`` [P, 2] the (doc, label) pairs.
    Filtered entries get score ``-inf`` and id ``-1`` and are moved to the end of their row with a stable sort, so
    the surviving predictions keep their order and shift left; ``-1`` ids never count as hits. Take
    ``k_max + (most pairs per doc)`` candidates before filtering to still score k full predictions per row, or
    filter dense logits before top-k with :func:`mask_reciprocal_logits` (exact, same result).
    """
    pairs = torch.as_tensor(filter_pairs, dtype=torch.long, device=topk_ids.device).reshape(-1, 2)
    keys = pairs[:, 0] * _KEY_BASE + pairs[:, 1]
    query = doc_indices.long().to(topk_ids.device).unsqueeze(1) * _KEY_BASE + topk_ids.long()
    drop = torch.isin(query, keys) & (topk_ids >= 0)
    scores = topk_scores.masked_fill(drop, float("-inf"))
    ids = topk_ids.masked_fill(drop, -1)
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)  # kept (0) first, dropped (1) last
    return scores.gather(1, order), ids.gather(1, order)


def mask_reciprocal_logits(logits: Tensor, doc_indices: Tensor, filter_pairs: Tensor) -> Tensor:
    """Return ``logits`` [batch, num_labels] with the filtered (doc, label) pairs set to ``-inf`` (out of place)."""
    pairs = torch.as_tensor(filter_pairs, dtype=torch.long, device=logits.device).reshape(-1, 2)
    pair_docs, pair_labels = pairs[:, 0].contiguous(), pairs[:, 1]
    docs = doc_indices.long().to(logits.device)
    doc_sorted, perm = torch.sort(docs)
    lo = torch.searchsorted(doc_sorted, pair_docs, side="left")
    hi = torch.searchsorted(doc_sorted, pair_docs, side="right")
    counts = hi - lo  # how many batch rows hold each pair's doc (0 if not in the batch; >1 if repeated)
    pair_idx = torch.repeat_interleave(torch.arange(pair_docs.numel(), device=logits.device), counts)
    starts = torch.repeat_interleave(lo, counts)
    within = torch.arange(pair_idx.numel(), device=logits.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    rows = perm[starts + within]
    out = logits.clone()
    out[rows, pair_labels[pair_idx]] = float("-inf")
    return out
