"""The Triton kernels of the fixed fan-in layer against the gather oracle, through Triton's CPU interpreter.

Awkward shapes on purpose: fan-ins that are no power of two (1, 5, 33), label counts that are no multiple of the
label block, batches of 1 and of more than one batch block, inputs in fp32/fp16/bf16, both input-gradient variants
(atomic scatter and the transposed structure, with several label chunks). The kernels use no ``tl.dot``, so bf16
inputs are checked as they are (the interpreter's bf16 ``tl.dot`` is what is broken). On a CUDA machine these tests
skip and ``tests/test_triton_gpu.py`` checks the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xmc_dst.sparse import FixedFanInLinear, triton_problem

PROBLEM = triton_problem(torch.device("cpu"))
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


def oracle(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = (x[:, indices.long()] * weight).sum(-1)
    return y + bias if bias is not None else y


def check_against_oracle(layer: FixedFanInLinear, x: torch.Tensor, grad: torch.Tensor, tol: float) -> torch.Tensor:
    """Forward and every gradient of ``layer`` against the fp64 oracle on the same (rounded) inputs."""
    y = layer(x)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if layer.bias is not None else None
    y64 = oracle(x64, w64, layer.indices, b64)
    y64.backward(grad.double())
    scale = lambda t: tol * max(1.0, float(t.detach().abs().max()))  # noqa: E731
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=scale(y64))
    torch.testing.assert_close(layer.weight.grad.double(), w64.grad, rtol=0, atol=scale(w64.grad))
    if b64 is not None:
        torch.testing.assert_close(layer.bias.grad.double(), b64.grad, rtol=0, atol=scale(b64.grad))
    if x.requires_grad:
        assert x.grad.dtype == x.dtype  # fp32 sums, rounded once to the input's dtype
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=torch.finfo(x.dtype).eps, atol=scale(x64.grad))
    return y


SHAPES = [  # in_features, labels, fan_in, batch
    (40, 133, 5, 3),
    (64, 47, 33, 70),
    (9, 1, 1, 1),
    (100, 300, 7, 17),
]


@pytest.mark.parametrize("input_grad", ["atomic", "transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kernels_match_oracle(shape, dtype, input_grad, monkeypatch) -> None:
    from xmc_dst import triton_fan_in

    monkeypatch.setattr(triton_fan_in, "INPUT_GRAD", input_grad)
    monkeypatch.setattr(triton_fan_in, "TRANSPOSED_BLOCK_LABELS", 128)  # one chunk or several, the last one short
    in_features, labels, fan_in, batch = shape
    gen = torch.Generator().manual_seed(sum(shape))
    layer = FixedFanInLinear(in_features, labels, fan_in, impl="triton", generator=gen)
    x = torch.randn(batch, in_features, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(batch, labels, generator=gen)
    y = check_against_oracle(layer, x, grad, tol=1e-5)
    assert y.dtype == torch.float32


def test_fp64_and_no_bias_and_weight_gradient_only() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = FixedFanInLinear(20, 37, 3, bias=False, impl="triton", generator=gen).double()
    check_against_oracle(layer, torch.randn(5, 20, dtype=torch.float64, generator=gen),
                         torch.randn(5, 37, dtype=torch.float64, generator=gen), tol=1e-12)


@pytest.mark.parametrize("input_grad", ["atomic", "transposed"])
def test_expanded_and_transposed_output_gradients(input_grad, monkeypatch) -> None:
    """Gradients with stride 0 (a sum) or label-major strides are read in place and still match."""
    from xmc_dst import triton_fan_in

    monkeypatch.setattr(triton_fan_in, "INPUT_GRAD", input_grad)
    layer = FixedFanInLinear(30, 90, 4, impl="triton", generator=torch.Generator().manual_seed(2))
    x = torch.randn(6, 30, requires_grad=True)
    check_against_oracle(layer, x, torch.ones(1, 1).expand(6, 90), tol=1e-5)
    layer.zero_grad()
    x.grad = None
    check_against_oracle(layer, x, torch.randn(90, 6).t(), tol=1e-5)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_reads_half_inputs_without_an_fp32_copy(amp_dtype) -> None:
    layer = FixedFanInLinear(48, 200, 6, impl="triton", generator=torch.Generator().manual_seed(3))
    x = torch.randn(8, 48).to(amp_dtype).requires_grad_()

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.fp32_copies: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and \
                    isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape in ((8, 48), (48, 8)):
                self.fp32_copies.append(tuple(out.shape))
            return out

    with torch.autocast("cpu", dtype=amp_dtype), Casts() as casts:
        y = layer(x)
    assert casts.fp32_copies == [] and y.dtype == torch.float32
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == amp_dtype
    torch.testing.assert_close(y, oracle(x.detach().float(), layer.weight.detach(), layer.indices,
                                         layer.bias.detach()), rtol=1e-5, atol=1e-5)

    half_logits = FixedFanInLinear(48, 200, 6, impl="triton", autocast_logits=True,
                                   generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=amp_dtype):
        y_half = half_logits(x)
    assert y_half.dtype == amp_dtype
    torch.testing.assert_close(y_half.float(), y, rtol=1e-2, atol=1e-2)  # one rounding of the fp32 sums
    assert half_logits(x.float()).dtype == torch.float32  # outside autocast: fp32 as always


def test_impl_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch) -> None:
    from xmc_dst import triton_fan_in

    monkeypatch.setattr(triton_fan_in, "INTERPRET", False)
    layer = FixedFanInLinear(8, 4, 2, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(torch.randn(2, 8))
    assert FixedFanInLinear(8, 4, 2).resolved_impl() != "triton"  # auto never picks it on CPU
