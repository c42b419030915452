"""The fixed fan-in layer on CUDA: every CUDA implementation against the naive oracle, autocast, rewiring."""

from __future__ import annotations

import pytest
import torch

from xmc_dst.sparse import FixedFanInLinear, regrow, triton_problem

pytestmark = pytest.mark.gpu


def oracle(x, weight, indices, bias):
    return (x[:, indices.long()] * weight).sum(-1) + bias


@pytest.mark.parametrize("impl", ["csr", "embedding_bag", "triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_impls_match_oracle(impl: str, dtype: torch.dtype) -> None:
    have_triton = triton_problem(torch.device("cuda")) is None
    if impl == "triton" and not have_triton:
        pytest.skip("Triton does not import")
    lay = FixedFanInLinear(96, 3000, 12, impl=impl, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    assert lay.resolved_impl() == (("triton" if have_triton else "csr") if impl == "auto" else impl)
    x = torch.randn(33, 96, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(33, 3000, device="cuda", dtype=dtype)
    lay(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = lay.weight.detach().clone().requires_grad_()
    b_ref = lay.bias.detach().clone().requires_grad_()
    oracle(x_ref, w_ref, lay.indices, b_ref).backward(grad)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(lay.weight.grad, w_ref.grad, **tol)
    torch.testing.assert_close(lay.bias.grad, b_ref.grad, **tol)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_fp32(amp_dtype: torch.dtype) -> None:
    lay = FixedFanInLinear(64, 2000, 8).cuda()
    x = torch.randn(16, 64, device="cuda").to(amp_dtype).requires_grad_()
    with torch.autocast("cuda", dtype=amp_dtype):
        y = lay(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    torch.testing.assert_close(y, oracle(x.detach().float(), lay.weight.detach(), lay.indices, lay.bias.detach()),
                               rtol=1e-4, atol=1e-4)
    assert x.grad.dtype == amp_dtype and torch.isfinite(lay.weight.grad).all()


def test_cuda_rewire_keeps_rows_sorted_unique_and_state_on_device() -> None:
    lay = FixedFanInLinear(128, 5000, 16).cuda()
    opt = torch.optim.Adam(lay.parameters())
    lay(torch.randn(8, 128, device="cuda")).sum().backward()
    opt.step()
    old = lay.indices.clone()
    result = lay.rewire("fraction", 0.25, torch.Generator(device="cuda").manual_seed(0))
    assert lay.reset_optimizer_state(opt, result) == 2
    idx = lay.indices
    assert idx.is_cuda and (idx[:, 1:] > idx[:, :-1]).all()
    assert result.num_pruned == 5000 * 4
    kept = ~result.regrown
    # survivors keep their inputs; regrown inputs were not connected before
    old_sets = old.cpu().tolist()
    for r, (row, mask) in enumerate(zip(idx.cpu().tolist(), result.regrown.cpu().tolist(), strict=True)):
        for i, new in zip(row, mask, strict=True):
            assert (i not in old_sets[r]) if new else (i in old_sets[r])
    assert (opt.state[lay.weight]["exp_avg"][result.regrown] == 0).all()
    assert kept.sum() == 5000 * 12
    new, _ = regrow(old, torch.ones_like(old, dtype=torch.bool), 128, torch.Generator(device="cuda").manual_seed(1))
    assert new.is_cuda and not (new.unsqueeze(-1) == old.long().unsqueeze(1)).any()
