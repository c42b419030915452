"""The compiled Triton kernels on CUDA against the gather oracle, and a GPU rewire that never waits for the device."""

from __future__ import annotations

import pytest
import torch
from test_triton import check_against_oracle

from callbacks import DynamicSparseTraining
from callbacks.dst import find_sparse_layers
from xmc_dst.regrowth import EverActive
from xmc_dst.sparse import FixedFanInLinear, triton_problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.is_available() and triton_problem(torch.device("cuda"))
                                                  is not None, reason="Triton does not import")]

SHAPES = [  # in_features, labels, fan_in, batch: a real head's width, label counts off every block, odd batches
    (768, 10_007, 32, 64),
    (768, 20_011, 13, 257),
    (100, 999, 1, 1),
]


@pytest.mark.parametrize("input_grad", ["atomic", "transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_compiled_kernels_match_oracle(shape, dtype, input_grad, monkeypatch) -> None:
    from xmc_dst import triton_fan_in

    monkeypatch.setattr(triton_fan_in, "INPUT_GRAD", input_grad)
    in_features, labels, fan_in, batch = shape
    gen = torch.Generator().manual_seed(sum(shape))
    layer = FixedFanInLinear(in_features, labels, fan_in, impl="triton", generator=gen).cuda()
    x = torch.randn(batch, in_features, generator=gen).to("cuda", dtype).requires_grad_()
    grad = torch.randn(batch, labels, generator=gen).cuda()
    check_against_oracle(layer, x, grad, tol=2e-5)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_autocast_reads_half_inputs_and_returns_fp32_or_half_logits(amp_dtype) -> None:
    layer = FixedFanInLinear(256, 5000, 16, generator=torch.Generator().manual_seed(0)).cuda()
    assert layer.resolved_impl() == "triton"
    x = torch.randn(32, 256, device="cuda").to(amp_dtype).requires_grad_()
    with torch.autocast("cuda", dtype=amp_dtype):
        y = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == amp_dtype and layer.weight.grad.dtype == torch.float32
    layer.autocast_logits = True
    with torch.autocast("cuda", dtype=amp_dtype):
        assert layer(x).dtype == amp_dtype


@pytest.mark.parametrize("input_grad", ["atomic", "transposed"])
def test_training_step_rewire_reset_and_dst_update_never_sync(input_grad, monkeypatch) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call (``.item()``, ``nonzero``,
    boolean indexing, a blocking copy either way): forward, backward, rewire, optimizer-state reset and a DST
    update run under it with the callback's CPU generator."""
    from types import SimpleNamespace

    from xmc_dst import triton_fan_in

    monkeypatch.setattr(triton_fan_in, "INPUT_GRAD", input_grad)
    layer = FixedFanInLinear(768, 50_000, 32, generator=torch.Generator().manual_seed(0)).cuda()
    optimizer = torch.optim.Adam(layer.parameters())
    x = torch.randn(64, 768, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # compile the kernels, create the optimizer state, build any cached structure
    optimizer.step()
    dst = DynamicSparseTraining(interval=1, end_step=10, prune="fraction", seed=0)
    dst.layers = find_sparse_layers(torch.nn.ModuleDict({"head": layer}))
    dst.generator = torch.Generator().manual_seed(0)
    dst.ever_active = {"head": EverActive.sampled(layer.indices, 768, max_rows=None)}
    fake = SimpleNamespace(optimizers=[optimizer], world_size=1, global_step=1, loggers=[])
    before = layer.indices.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
        result = layer.rewire("fraction", 0.25, torch.Generator().manual_seed(1))
        layer.reset_optimizer_state(optimizer, result)
        dst.update(fake, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dst.log_finished_updates(fake, wait=True)
    assert result.num_pruned == 50_000 * 8
    assert not torch.equal(before, layer.indices) and bool((layer.indices[:, 1:] > layer.indices[:, :-1]).all())
    assert dst.history[0]["dst/regrown_fraction"] == pytest.approx(round(dst.amount_at(1) * 32) / 32)
    # The same CPU generator state gives the same GPU topology.
    again = FixedFanInLinear(768, 50_000, 32, generator=torch.Generator().manual_seed(0)).cuda()
    again.weight.data.copy_(layer.weight.data)
    first = again.rewire("fraction", 0.25, torch.Generator().manual_seed(5)).permutation
    twin = FixedFanInLinear(768, 50_000, 32, generator=torch.Generator().manual_seed(0)).cuda()
    twin.weight.data.copy_(layer.weight.data)
    assert torch.equal(twin.rewire("fraction", 0.25, torch.Generator().manual_seed(5)).permutation, first)
    assert torch.equal(twin.indices, again.indices)
