"""Regrowth helpers of dynamic sparse training against brute force: RigL's candidates from the dense gradient
``dy^T x``, the layer's rewire with them, and the ever-active (ITOP) map as an OR of index sets."""

from __future__ import annotations

import math

import torch

from xmc_dst.regrowth import EverActive, GradientScores
from xmc_dst.sparse import FixedFanInLinear, apply_regrowth


def dense(indices: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], in_features, dtype=values.dtype).scatter_(1, indices.long(), values)


def test_gradient_candidates_in_label_chunks_match_the_dense_gradient():
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(16, 50, generator=g), torch.randn(16, 37, generator=g)
    indices = torch.stack([torch.randperm(50, generator=g)[:6].sort().values for _ in range(37)]).int()
    counts = torch.randint(0, 5, (37,), generator=g)
    got = GradientScores(x, dy, chunk_elements=50 * 4).best_unconnected(indices, counts)  # 4 labels per chunk
    reference = (dy.t() @ x).abs().scatter_(1, indices.long(), -1.0)
    for row in range(37):
        n = int(counts[row])
        assert got[row, :n].tolist() == reference[row].topk(n).indices.tolist()

    weight = torch.randn(37, 6, generator=g)
    pruned = torch.rand(37, 6, generator=g) < counts[:, None] / 6.0
    pruned_counts = pruned.sum(1)
    cands = GradientScores(x, dy).best_unconnected(indices, pruned_counts)
    new_weight, new_indices = weight.clone(), indices.clone()
    result = apply_regrowth(new_weight, new_indices, pruned, cands)
    for row in range(37):
        kept = {int(i): float(w) for i, w, p in zip(indices[row], weight[row], pruned[row], strict=True) if not p}
        grown = set(cands[row, : int(pruned_counts[row])].tolist())
        assert set(new_indices[row].tolist()) == set(kept) | grown
        for slot, i in enumerate(new_indices[row].tolist()):
            assert float(new_weight[row, slot]) == kept.get(i, 0.0)
            assert bool(result.regrown[row, slot]) == (i in grown)
            assert int(indices[row, result.permutation[row, slot]]) == i or i in grown


def test_ever_active_map_is_an_or_of_indices():
    g = torch.Generator().manual_seed(0)
    rows = [torch.stack([torch.randperm(130, generator=g)[:9].sort().values for _ in range(7)]) for _ in range(4)]
    tracker = EverActive(rows[0].int(), 130)
    union = dense(rows[0], torch.ones(7, 9, dtype=torch.bool), 130)
    for r in rows[1:]:
        tracker.add(r.int())
        union |= dense(r, torch.ones(7, 9, dtype=torch.bool), 130)
    assert torch.equal(tracker.dense(), union) and tracker.count == int(union.sum())
    assert tracker.words.numel() * 8 == 7 * math.ceil(130 / 64) * 8
    sampled = EverActive.sampled(rows[0].int(), 130, max_rows=3, seed=5)
    for r in rows[1:]:
        sampled.add(r.int(), only=torch.rand(7, 9, generator=g) < 2)  # all slots, through the mask path
    assert sampled.rows.tolist() == sorted(torch.randperm(7, generator=torch.Generator().manual_seed(5))[:3].tolist())
    assert torch.equal(sampled.dense(), union[sampled.rows]) and sampled.possible == 3 * 130


def test_rewire_with_gradient_candidates_grows_the_largest_unconnected_gradients():
    g = torch.Generator().manual_seed(4)
    layer = FixedFanInLinear(40, 25, 5, generator=g)
    x, dy = torch.randn(12, 40, generator=g), torch.randn(12, 25, generator=g)
    old_indices, old_weight = layer.indices.clone(), layer.weight.detach().clone()
    drop = old_weight.abs() < 0.2  # the threshold rule, by hand
    result = layer.rewire("threshold", 0.2, candidates=GradientScores(x, dy, chunk_elements=40 * 3))
    reference = (dy.t() @ x).abs()
    old_set = dense(old_indices, torch.ones(25, 5, dtype=torch.bool), 40)
    new_set = dense(layer.indices, torch.ones(25, 5, dtype=torch.bool), 40)
    for row in range(25):
        n = int(drop[row].sum())
        best = reference[row].masked_fill(old_set[row], -1.0).topk(n).indices.tolist() if n else []
        kept = set(old_indices[row][~drop[row]].tolist())
        assert set(new_set[row].nonzero().squeeze(1).tolist()) == kept | set(best)
    assert torch.equal(dense(layer.indices, layer.weight.detach(), 40)[old_set & new_set],
                       dense(old_indices, old_weight, 40)[old_set & new_set])  # survivors keep their weights
    assert bool((layer.weight[result.regrown] == 0).all()) and result.num_pruned == int(drop.sum()) > 0
    assert int(layer.topology_version) == 1
