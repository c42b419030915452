"""GroupedFanInLinear against a naive per-label oracle with the same shared indices; grouping and rewiring checked by
brute force per group."""

from __future__ import annotations

import pytest
import torch

from xmc_dst import grouped
from xmc_dst.grouped import GROUPED_IMPLS, GroupedFanInLinear, _grouped_kernels, group_positions
from xmc_dst.regrowth import GradientScores

SKIPS = {"kernel": pytest.mark.skipif(_grouped_kernels() is None, reason="no C compiler")}
impls = [pytest.param(i, marks=SKIPS.get(i, ())) for i in GROUPED_IMPLS]


def per_label(lay: GroupedFanInLinear, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every label's own ``(weights, inputs)`` ``[labels, fan_in]``, read slot by slot from the definition."""
    weight = lay.weight.detach() if weight is None else weight
    weights, inputs = [], []
    for label in range(lay.out_features):
        slot = int(lay.label_position[label])
        group, row = divmod(slot, lay.group_size)
        weights.append(weight[group, row])
        inputs.append(lay.indices[group].long())
    return torch.stack(weights), torch.stack(inputs)


def oracle(x: torch.Tensor, weights: torch.Tensor, inputs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[b, l] = sum_j weights[l, j] * x[b, inputs[l, j]] + bias[l] by materialising the gather."""
    y = (x[:, inputs] * weights).sum(-1)
    return y + bias if bias is not None else y


def shuffled(num_labels: int, group_size: int, seed: int = 0) -> torch.Tensor:
    assignment = torch.randint(0, 4, (num_labels,), generator=torch.Generator().manual_seed(seed))
    return group_positions(num_labels, group_size, assignment)


def layer(in_features=30, out_features=46, fan_in=5, group_size=4, bias=True, impl="torch", seed=0,
          dtype=torch.float64) -> GroupedFanInLinear:
    lay = GroupedFanInLinear(in_features, out_features, fan_in, group_size, bias=bias, impl=impl,
                             generator=torch.Generator().manual_seed(seed),
                             label_position=shuffled(out_features, group_size, seed))
    return lay.to(dtype)


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", [1 << 18, 16])  # one chunk of groups, and a chunk per group
# batches below, at and above the kernels' 64-wide tile; groups of a whole and a partial block of 4 kernel rows
@pytest.mark.parametrize("batch,group_size", [(7, 4), (64, 6), (70, 3)])
def test_forward_and_gradients_match_per_label_oracle(impl, bias, tile, batch, group_size, monkeypatch) -> None:
    monkeypatch.setattr(grouped, "TILE_ELEMENTS", tile)
    lay = layer(bias=bias, impl=impl, group_size=group_size)
    x = torch.randn(batch, 30, dtype=torch.float64, requires_grad=True)
    y = lay(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    w_ref = lay.weight.detach().clone().requires_grad_()
    b_ref = lay.bias.detach().clone().requires_grad_() if bias else None
    x_ref = x.detach().clone().requires_grad_()
    weights, inputs = per_label(lay, w_ref)  # differentiable in the block, slot by slot
    y_ref = oracle(x_ref, weights, inputs, b_ref)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lay.weight.grad, w_ref.grad)
    if bias:
        torch.testing.assert_close(lay.bias.grad, b_ref.grad)
    padding = ~lay.slot_used().view(lay.num_groups, lay.group_size)
    assert padding.any() and lay.weight.grad[padding].abs().sum() == 0  # padding slots never learn


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(impl, bias) -> None:
    lay = layer(in_features=10, out_features=7, fan_in=3, group_size=3, bias=bias, impl=impl)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    params = [lay.weight] + ([lay.bias] if bias else [])

    def fn(x, *params):
        return torch.func.functional_call(lay, {"weight": params[0], **({"bias": params[1]} if bias else {})}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("batch", [5, 64])
def test_fp32_matches_the_oracle_in_every_kernel_path(impl, batch) -> None:
    lay = layer(impl=impl, group_size=5, dtype=torch.float32)
    x = torch.randn(batch, 30, requires_grad=True)
    y = lay(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    weights, inputs = per_label(lay)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = oracle(x_ref.double(), weights.double(), inputs, lay.bias.detach().double())
    y_ref.backward(grad.double())
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("batch", [6, 64])
def test_bf16_weights_compute_in_fp32_and_get_bf16_gradients(impl, batch) -> None:
    lay = layer(impl=impl, dtype=torch.bfloat16)
    x = torch.randn(batch, 30)
    y = lay(x)
    assert y.dtype == torch.float32
    weights, inputs = per_label(lay)
    torch.testing.assert_close(y, oracle(x, weights.float(), inputs, lay.bias.float()), atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert lay.weight.grad.dtype == torch.bfloat16
    x_ref = x.clone().requires_grad_()
    w_ref = lay.weight.detach().float().requires_grad_()  # the bf16 values, exactly, in fp32
    ref_weights, _ = per_label(lay, w_ref)
    oracle(x_ref, ref_weights, inputs, lay.bias.detach().float()).backward(grad)
    torch.testing.assert_close(lay.weight.grad, w_ref.grad.to(torch.bfloat16), atol=1e-2, rtol=1e-2)


def test_dense_weight_is_the_per_label_layer() -> None:
    lay = layer()
    x = torch.randn(5, 30, dtype=torch.float64)
    torch.testing.assert_close(lay(x), x @ lay.dense_weight().t() + lay.bias.detach())


def test_grouping_round_trip_permutation_and_padding() -> None:
    assignment = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2])  # 11 labels, G = 4: 3 groups, one padding slot
    position = group_positions(11, 4, assignment)
    assert sorted(position.tolist()) == list(range(11))  # one slot each; the padding is the last slot
    order = torch.argsort(position)  # slot -> label
    assert assignment[order].tolist() == sorted(assignment.tolist())  # clusters in runs
    # inside a cluster, label ids in order
    for cluster in range(3):
        labels = order[assignment[order] == cluster]
        assert labels.tolist() == sorted(labels.tolist())
    lay = GroupedFanInLinear(8, 11, 3, 4, label_position=position, generator=torch.Generator().manual_seed(0))
    members = lay.members()
    assert members.shape == (3, 4) and members[2, 3] == -1
    for label in range(11):
        slot = int(position[label])
        assert members[slot // 4, slot % 4] == label
    assert group_positions(5, 2).tolist() == [0, 1, 2, 3, 4]  # the label-id control
    assert lay.weight[2, 3].abs().sum() == 0  # padding starts at zero


def test_bad_groupings_and_arguments() -> None:
    with pytest.raises(ValueError, match="one cluster id per label"):
        group_positions(5, 2, torch.zeros(4))
    with pytest.raises(ValueError, match="its own slot"):
        GroupedFanInLinear(8, 4, 2, 2, label_position=torch.tensor([0, 1, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="label_position must have shape"):
        GroupedFanInLinear(8, 4, 2, 2, label_position=torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="group_size"):
        GroupedFanInLinear(8, 4, 2, 0)
    with pytest.raises(ValueError, match="fan_in"):
        GroupedFanInLinear(8, 4, 9, 2)


def snapshot(lay: GroupedFanInLinear) -> dict[tuple[int, int], torch.Tensor]:
    """(group, input) -> the weight column of that connection over the group's labels."""
    return {(g, int(i)): lay.weight[g, :, j].detach().clone()
            for g in range(lay.num_groups) for j, i in enumerate(lay.indices[g])}


@pytest.mark.parametrize("mode,amount", [("fraction", 0.4), ("threshold", 0.2)])
def test_rewire_prunes_weakest_group_slots_and_moves_weights(mode, amount) -> None:
    lay = layer(in_features=20, out_features=30, fan_in=6, group_size=4, dtype=torch.float32)
    magnitude = lay.slot_magnitude()
    used = lay.slot_used().view(lay.num_groups, 4)
    naive = lay.weight.detach().abs().sum(1) / used.sum(1, keepdim=True)  # mean over the group's labels
    torch.testing.assert_close(magnitude, naive)
    before = snapshot(lay)
    old = lay.indices.clone()
    result = lay.rewire(mode, amount, generator=torch.Generator().manual_seed(3))
    after = snapshot(lay)
    for g in range(lay.num_groups):
        row = lay.indices[g].tolist()
        assert row == sorted(set(row)) and len(row) == 6  # unique, sorted, fan-in kept
        if mode == "fraction":
            weakest = set(old[g, naive[g].argsort(stable=True)[:round(amount * 6)]].tolist())
        else:
            weakest = set(old[g, naive[g] < amount].tolist())
        kept = set(old[g].tolist()) - weakest
        assert kept <= set(row)
        assert not (set(row) - kept) & weakest  # a pruned input is not regrown at once
        for i in kept:
            torch.testing.assert_close(after[(g, i)], before[(g, i)])
        for j, i in enumerate(row):
            assert bool(result.regrown[g, j]) == (i not in kept)
            if i not in kept:
                assert after[(g, i)].abs().sum() == 0
    assert result.regrown.shape == (lay.num_groups, 6) and result.num_pruned > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_follows_group_slots(optimizer) -> None:
    lay = layer(in_features=20, out_features=30, fan_in=6, group_size=4, dtype=torch.float32)
    opt = (torch.optim.SGD(lay.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(lay.parameters(), lr=0.1))
    lay(torch.randn(5, 20)).square().sum().backward()
    opt.step()
    names = [k for k, v in opt.state[lay.weight].items() if torch.is_tensor(v) and v.shape == lay.weight.shape]

    def state_columns():
        return {name: {(g, int(i)): opt.state[lay.weight][name][g, :, j].clone()
                       for g in range(lay.num_groups) for j, i in enumerate(lay.indices[g])} for name in names}

    before = state_columns()
    result = lay.rewire("fraction", 0.5, generator=torch.Generator().manual_seed(1))
    assert lay.reset_optimizer_state(opt, result) == len(names) > 0
    after = state_columns()
    for name in names:
        for g in range(lay.num_groups):
            for j, i in enumerate(lay.indices[g].tolist()):
                if result.regrown[g, j]:
                    assert after[name][(g, i)].abs().sum() == 0
                else:
                    torch.testing.assert_close(after[name][(g, i)], before[name][(g, i)])


def test_gradient_regrowth_takes_the_best_summed_scores_per_group() -> None:
    lay = layer(in_features=16, out_features=14, fan_in=4, group_size=4, dtype=torch.float32)
    x, dy = torch.randn(9, 16), torch.randn(9, 14)
    dense = (dy.t() @ x).abs()  # |dL/dW| [labels, in]
    members = lay.members()
    old = lay.indices.clone()
    result = lay.rewire("fraction", 0.5, candidates=GradientScores(x, dy, chunk_elements=32))
    for g in range(lay.num_groups):
        labels = members[g][members[g] >= 0]
        score = dense[labels].sum(0)
        score[old[g].long()] = -1.0
        expected = set(score.topk(2).indices.tolist())
        grown = set(lay.indices[g][result.regrown[g]].tolist())
        assert grown == expected


def test_state_dict_round_trip_keeps_grouping_and_topology() -> None:
    lay = layer(dtype=torch.float32)
    lay.rewire("fraction", 0.3, generator=torch.Generator().manual_seed(0))
    other = GroupedFanInLinear(30, 46, 5, 4, impl="torch")
    other.load_state_dict(lay.state_dict())
    x = torch.randn(3, 30)
    torch.testing.assert_close(other(x), lay(x), rtol=0, atol=0)
    assert torch.equal(other.label_position, lay.label_position) and int(other.topology_version) == 1
