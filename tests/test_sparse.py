"""FixedFanInLinear against a naive gather oracle, and the rewiring primitive against brute-force per-row checks."""

from __future__ import annotations

import math

import pytest
import torch

from xmc_dst.kernels import load_kernels
from xmc_dst.sparse import (
    IMPLS,
    FixedFanInLinear,
    prune_mask,
    random_indices,
    regrow,
    reset_optimizer_state,
    triton_problem,
)

HAVE_KERNELS = load_kernels() is not None
TRITON_PROBLEM = triton_problem(torch.device("cpu"))
SKIPS = {"kernel": pytest.mark.skipif(not HAVE_KERNELS, reason="no C compiler"),
         "triton": pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM))}
impls = [pytest.param(i, marks=SKIPS.get(i, ())) for i in IMPLS]
regrow_paths = [pytest.param(True, marks=pytest.mark.skipif(not HAVE_KERNELS, reason="no C compiler"), id="kernel"),
                pytest.param(False, id="torch")]


def oracle(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[b, l] = sum_j weight[l, j] * x[b, indices[l, j]] + bias[l], by materialising the gather (small sizes only)."""
    gathered = x[:, indices.long()]  # [batch, out, fan_in]
    y = (gathered * weight).sum(-1)
    return y + bias if bias is not None else y


def layer(in_features=40, out_features=70, fan_in=6, bias=True, impl="auto", seed=0, dtype=torch.float64):
    return FixedFanInLinear(in_features, out_features, fan_in, bias=bias, impl=impl,
                            generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_oracle(impl: str, bias: bool) -> None:
    lay = layer(bias=bias, impl=impl)
    x = torch.randn(9, 40, dtype=torch.float64, requires_grad=True)
    y = lay(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = lay.weight.detach().clone().requires_grad_()
    b_ref = lay.bias.detach().clone().requires_grad_() if bias else None
    y_ref = oracle(x_ref, w_ref, lay.indices, b_ref)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lay.weight.grad, w_ref.grad)
    if bias:
        torch.testing.assert_close(lay.bias.grad, b_ref.grad)


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(impl: str, bias: bool) -> None:
    lay = layer(in_features=12, out_features=9, fan_in=4, bias=bias, impl=impl)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    params = [lay.weight] + ([lay.bias] if bias else [])

    def fn(x, *params):
        return torch.func.functional_call(lay, {"weight": params[0], **({"bias": params[1]} if bias else {})}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_sparse_matches_the_oracle_of_the_densified_rows(bias: bool) -> None:
    lay = layer(bias=bias)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 0, 12, 1, 40]  # an empty row, and a row naming every input
    ids = torch.cat([torch.randperm(40, generator=g)[:n] for n in lengths])
    values = torch.randn(ids.numel(), dtype=torch.float64, generator=g)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    dense = torch.zeros(len(lengths), 40, dtype=torch.float64)
    for row in range(len(lengths)):
        dense[row, ids[offsets[row]:offsets[row + 1]]] = values[offsets[row]:offsets[row + 1]]
    for rewired in (False, True):
        if rewired:  # the cached input-major structure must follow the new topology
            lay.rewire("fraction", 0.5, torch.Generator().manual_seed(2))
        lay.zero_grad()
        y = lay.forward_sparse(offsets, ids, values)
        grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
        y.backward(grad)
        w_ref = lay.weight.detach().clone().requires_grad_()
        b_ref = lay.bias.detach().clone().requires_grad_() if bias else None
        y_ref = oracle(dense, w_ref, lay.indices, b_ref)
        y_ref.backward(grad)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(lay.weight.grad, w_ref.grad)
        if bias:
            torch.testing.assert_close(lay.bias.grad, b_ref.grad)
    with pytest.raises(ValueError, match=r"sparse input ids must lie in \[0, 40\)"):
        lay.forward_sparse(torch.tensor([0, 1]), torch.tensor([40]), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("impl", impls)
def test_gradient_of_expanded_and_transposed_output_grads(impl: str) -> None:
    """Loss shapes that hand back stride-0 or transposed gradients still give the oracle's gradients."""
    lay = layer(impl=impl, dtype=torch.float32)
    x = torch.randn(7, 40, requires_grad=True)
    lay(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = lay.weight.detach().clone().requires_grad_()
    oracle(x_ref, w_ref, lay.indices, lay.bias.detach()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lay.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)

    x.grad = None
    lay.weight.grad = None
    g = torch.randn(70, 7).t()  # non-contiguous [batch, out]
    lay(x).backward(g)
    x_ref.grad = None
    w_ref.grad = None
    oracle(x_ref, w_ref, lay.indices, lay.bias.detach()).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lay.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", impls)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_fp32(impl: str, amp_dtype: torch.dtype) -> None:
    lay = layer(impl=impl, dtype=torch.float32)
    x = torch.randn(6, 40).to(amp_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=amp_dtype):
        y = lay(x)
    assert y.dtype == torch.float32
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == amp_dtype and lay.weight.grad.dtype == torch.float32
    # fp32 accumulation: identical to the fp32 oracle on the same (rounded) inputs.
    x32 = x.detach().float().requires_grad_()
    y_ref = oracle(x32, lay.weight.detach(), lay.indices, lay.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(lay.weight.grad).all()


def test_auto_picks_kernel_on_cpu_and_inputs_of_any_leading_shape() -> None:
    lay = layer(dtype=torch.float32)
    assert lay.resolved_impl() == ("kernel" if HAVE_KERNELS else "csr")
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(lay(x), oracle(x.reshape(6, 40), lay.weight.detach(), lay.indices,
                                               lay.bias.detach()).reshape(2, 3, 70))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fan_in"):
        FixedFanInLinear(10, 5, 11)
    with pytest.raises(ValueError, match="impl"):
        FixedFanInLinear(10, 5, 3, impl="cuda_magic")
    with pytest.raises(ValueError, match="10 features"):
        FixedFanInLinear(10, 5, 3)(torch.randn(2, 9))


def test_initial_topology_is_unique_sorted_uniform_and_scaled() -> None:
    lay = FixedFanInLinear(50, 4000, 10, generator=torch.Generator().manual_seed(3))
    idx = lay.indices
    assert idx.dtype == torch.int32 and idx.shape == (4000, 10)
    assert (idx[:, 1:] > idx[:, :-1]).all() and idx.min() >= 0 and idx.max() < 50
    # Each input is used 4000 * 10 / 50 = 800 times in expectation; chi-square with 49 dof, p ~ 1e-6 bound.
    counts = torch.bincount(idx.reshape(-1).long(), minlength=50).double()
    chi2 = float(((counts - 800) ** 2 / 800).sum())
    assert chi2 < 110, chi2
    bound = 1 / math.sqrt(10)
    assert lay.weight.abs().max() <= bound and lay.weight.std() > 0.5 * bound / math.sqrt(3)


def test_random_indices_is_deterministic_per_generator() -> None:
    a = random_indices(300, 64, 8, torch.Generator().manual_seed(1))
    b = random_indices(300, 64, 8, torch.Generator().manual_seed(1))
    c = random_indices(300, 64, 8, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def naive_prune(weight: torch.Tensor, mode: str, amount: float, cap: int) -> torch.Tensor:
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for r, row in enumerate(weight.abs().tolist()):
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        chosen = [j for j in order if row[j] < amount] if mode == "threshold" else order[:round(amount * len(row))]
        for j in chosen[:cap]:
            mask[r, j] = True
    return mask


@pytest.mark.parametrize("use_kernel", regrow_paths)
@pytest.mark.parametrize("mode,amount", [("fraction", 0.3), ("fraction", 0.0), ("fraction", 1.0),
                                         ("threshold", 0.05), ("threshold", 0.0)])
def test_prune_mask_matches_naive(use_kernel: bool, mode: str, amount: float) -> None:
    weight = torch.randn(200, 12) * 0.1
    if use_kernel:  # exact ties (and signs) are broken by slot, as in the naive reference
        weight[::3, 5] = weight[::3, 2].neg()
    torch.testing.assert_close(prune_mask(weight, mode, amount, use_kernel=use_kernel),
                               naive_prune(weight, mode, amount, 12))
    # A cap (rows that cannot regrow everything) keeps the strongest of the candidates.
    torch.testing.assert_close(prune_mask(weight, mode, amount, max_per_row=2, use_kernel=use_kernel),
                               naive_prune(weight, mode, amount, 2))


@pytest.mark.parametrize("use_kernel", regrow_paths)
@pytest.mark.parametrize("mode,amount", [("fraction", 0.3), ("threshold", 0.08)])
def test_rewire_keeps_survivors_and_fan_in(use_kernel: bool, mode: str, amount: float, monkeypatch) -> None:
    if not use_kernel:
        monkeypatch.setenv("XMC_DST_DISABLE_KERNELS", "1")
        load_kernels.cache_clear()
    try:
        lay = FixedFanInLinear(64, 500, 16, generator=torch.Generator().manual_seed(0))
        before = {(r, int(i)): float(w) for r in range(500)
                  for i, w in zip(lay.indices[r].tolist(), lay.weight[r].tolist(), strict=True)}
        expected_pruned = naive_prune(lay.weight.detach(), mode, amount, 64 - 16)
        result = lay.rewire(mode, amount, torch.Generator().manual_seed(7))
    finally:
        load_kernels.cache_clear()
    idx, weight = lay.indices, lay.weight.detach()
    assert (idx[:, 1:] > idx[:, :-1]).all() and idx.shape == (500, 16)
    assert result.num_pruned == int(expected_pruned.sum()) > 0
    assert int(result.regrown.sum()) == result.num_pruned
    assert int(lay.topology_version) == 1
    for r in range(500):
        old_inputs = {i for (row, i) in before if row == r}
        pruned_inputs = {sorted(old_inputs)[j] for j in expected_pruned[r].nonzero().flatten().tolist()}
        for j, i in enumerate(idx[r].tolist()):
            if result.regrown[r, j]:
                assert i not in old_inputs and weight[r, j] == 0  # new input, zero weight
            else:
                assert i in old_inputs and i not in pruned_inputs and weight[r, j] == before[(r, i)]
            # permutation points at the old slot for survivors
            if not result.regrown[r, j]:
                assert sorted(old_inputs)[int(result.permutation[r, j])] == i


@pytest.mark.parametrize("use_kernel", regrow_paths)
def test_regrowth_is_uniform_over_free_inputs(use_kernel: bool) -> None:
    """One row pattern regrown many times: every free input is drawn about equally often; taken ones never."""
    rows, in_features, fan_in = 6000, 20, 5
    base = torch.tensor([1, 4, 9, 15, 19]).expand(rows, fan_in).contiguous()
    pruned = torch.zeros(rows, fan_in, dtype=torch.bool)
    pruned[:, 0] = pruned[:, 3] = True  # two new inputs per row among the 15 free ones
    new, perm = regrow(base, pruned, in_features, torch.Generator().manual_seed(5), use_kernel=use_kernel)
    assert (new[:, 1:] > new[:, :-1]).all()
    merged_kept = {4, 9, 19}
    assert all(merged_kept <= set(row) for row in new.tolist())
    drawn = [i for row in new.tolist() for i in row if i not in merged_kept]
    counts = torch.bincount(torch.tensor(drawn), minlength=in_features).double()
    assert counts[[1, 4, 9, 15, 19]].sum() == 0
    free = [i for i in range(in_features) if i not in (1, 4, 9, 15, 19)]
    expected = 2 * rows / len(free)
    chi2 = float(((counts[free] - expected) ** 2 / expected).sum())
    assert chi2 < 50, chi2  # 14 dof
    assert torch.equal(regrow(base, pruned, in_features, torch.Generator().manual_seed(5), use_kernel=use_kernel)[0],
                       new)


@pytest.mark.parametrize("use_kernel", regrow_paths)
def test_regrow_dense_rows_still_finish(use_kernel: bool) -> None:
    """Rows with fan-in close to the input width leave few free inputs; regrowth fills them exactly."""
    idx = random_indices(50, 10, 5, torch.Generator().manual_seed(0))
    pruned = torch.ones(50, 5, dtype=torch.bool)
    new, _ = regrow(idx, pruned, 10, torch.Generator().manual_seed(1), use_kernel=use_kernel)
    for old_row, new_row in zip(idx.tolist(), new.tolist(), strict=True):
        assert sorted(set(range(10)) - set(old_row)) == new_row


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_state_follows_connections(opt_cls) -> None:
    torch.manual_seed(0)
    lay = FixedFanInLinear(30, 40, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"lr": 0.1, "momentum": 0.9} if opt_cls is torch.optim.SGD else {"lr": 0.01}
    opt = opt_cls(lay.parameters(), **kwargs)
    for _ in range(3):
        opt.zero_grad()
        lay(torch.randn(4, 30)).pow(2).mean().backward()
        opt.step()
    state_keys = [k for k, v in opt.state[lay.weight].items() if torch.is_tensor(v) and v.shape == lay.weight.shape]
    assert state_keys
    snapshot = {k: {(r, i): float(v) for r in range(40)
                    for i, v in zip(lay.indices[r].tolist(), opt.state[lay.weight][k][r].tolist(), strict=True)}
                for k in state_keys}
    result = lay.rewire("fraction", 0.5, torch.Generator().manual_seed(1))
    assert lay.reset_optimizer_state(opt, result) == len(state_keys)
    for k in state_keys:
        state = opt.state[lay.weight][k]
        for r in range(40):
            for j, i in enumerate(lay.indices[r].tolist()):
                expected = 0.0 if result.regrown[r, j] else snapshot[k][(r, i)]
                assert float(state[r, j]) == expected
    # An optimizer that never saw the parameter is left alone.
    assert reset_optimizer_state(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]), lay.weight, result) == 0


@pytest.mark.parametrize("impl", impls)
def test_cached_structure_follows_rewire_and_load_state_dict(impl: str) -> None:
    lay = layer(impl=impl, dtype=torch.float32)
    x = torch.randn(5, 40, requires_grad=True)
    lay(x).sum().backward()  # builds any cache
    other = layer(impl=impl, dtype=torch.float32, seed=11)
    other.rewire("fraction", 0.5, torch.Generator().manual_seed(2))
    for change in (lambda: lay.rewire("fraction", 0.5, torch.Generator().manual_seed(3)),
                   lambda: lay.load_state_dict(other.state_dict())):
        change()
        x.grad = None
        lay(x).backward(torch.ones(5, 70))
        x_ref = x.detach().clone().requires_grad_()
        oracle(x_ref, lay.weight.detach(), lay.indices, lay.bias.detach()).backward(torch.ones(5, 70))
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert int(lay.topology_version) == 1 and set(lay.state_dict()) == {"weight", "bias", "indices",
                                                                      "topology_version"}


def test_uniform_regrowth_init_and_bad_mode() -> None:
    lay = FixedFanInLinear(32, 50, 8, generator=torch.Generator().manual_seed(0))
    result = lay.rewire("fraction", 0.25, torch.Generator().manual_seed(0), init="uniform")
    new_weights = lay.weight.detach()[result.regrown]
    assert new_weights.abs().max() <= 1 / math.sqrt(8) and (new_weights != 0).all()
    with pytest.raises(ValueError, match="mode"):
        lay.rewire("random", 0.1)
    with pytest.raises(ValueError, match="fraction"):
        lay.rewire("fraction", 1.5)


@pytest.mark.parametrize("mode,amount,init", [("fraction", 0.3, "zero"), ("threshold", 0.2, "uniform")])
def test_rewire_and_state_reset_never_read_device_values(mode: str, amount: float, init: str) -> None:
    """On the 'meta' device every read of a tensor's values fails (``.item()``, ``bool()``, ``.tolist()``,
    ``nonzero``, boolean indexing, a copy to the host): a rewire and the optimizer-state reset that run there with a
    CPU generator (as the DST callback passes) would run on a GPU without waiting for it."""
    layer = FixedFanInLinear(64, 300, 8, device="meta")
    state = {"exp_avg": torch.zeros_like(layer.weight), "exp_avg_sq": torch.zeros_like(layer.weight)}
    optimizer = torch.optim.Adam(layer.parameters())
    optimizer.state[layer.weight] = state
    result = layer.rewire(mode, amount, torch.Generator().manual_seed(0), init=init)
    assert layer.reset_optimizer_state(optimizer, result) == 2
    assert result.regrown.device.type == layer.indices.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        _ = result.num_pruned  # the count reads the device, only when asked for

