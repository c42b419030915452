"""Triton kernels of the fixed fan-in layer: forward, weight gradient and input gradient on the GPU.

Why Triton: the head is memory-bound (670K labels x fan-in 32 x batch 64 moves under 1 GB per training step, a
fraction of a millisecond at HBM bandwidth), while ``torch.sparse`` computes in fp32 and launches many small
kernels. These kernels read the inputs in the dtype they arrive in (fp32, fp16 or bf16: no fp32 copy of the
activations under autocast), accumulate in fp32 (fp64 for fp64 inputs), and write the logits in fp32 or, on request,
in the autocast dtype.

Layout: the input is handed to the kernels transposed, ``xt [in_features, batch]`` in its own dtype (a copy of the
batch of activations, a few hundred KB), so that the values one connection reads for a block of the batch are
contiguous and the gathers hit L1/L2. ``weight``/``indices`` are the layer's ``[out, fan_in]`` tensors (int32
indices). Labels are processed in blocks of ``BLOCK_L``; the fan-in is a run-time loop, so any fan-in works without
padding, and every load is masked, so label counts and batch sizes need not be multiples of the blocks.

* forward: one program per (label block, batch block); ``acc[l, b] += w[l, j] * xt[idx[l, j], b]`` over ``j``.
* backward (one kernel for all three gradients): one program per label block, looping over the batch. It reads the
  output-gradient tile once per batch block and, per slot ``j``: the weight gradient
  ``dw[l, j] = sum_b dy[b, l] * xt[idx[l, j], b]`` (a sampled product), the bias gradient ``sum_b dy[b, l]`` and,
  with ``input_grad="atomic"``, the input gradient scattered as ``dxt[idx[l, j], b] += w[l, j] * dy[b, l]`` with
  fp32 atomics.
* ``input_grad="transposed"``: the input gradient from the connections sorted by input within label chunks
  (:func:`xmc_dst.sparse._build_transposed`, built once per topology version): one program per (input, chunk)
  sums its connections' ``w * dy`` over the chunk into a partial, and the partials are summed over chunks in a
  fixed order. Deterministic (no atomics) but it gathers every output gradient ``fan_in`` times.

Which input gradient is faster is a property of the GPU: ``benchmarks/head.py --impls triton triton-transposed``
measures both; :data:`INPUT_GRAD` is the default.

On CPU tensors the same kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this
module is imported (the tests do that); a GPU grouped head can reuse :func:`_gather_tile`'s addressing: a group's
gathered ``[fan_in, batch]`` tile times its ``[group, fan_in]`` weights is one ``tl.dot``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

InputGrad = Literal["atomic", "transposed"]
INPUT_GRAD: InputGrad = "atomic"
# Labels per chunk of the transposed structure: the chunk's output gradient (8192 labels x batch 256 x 4 B = 8 MB)
# stays in L2 while the chunk's programs gather from it; more chunks cost a larger partial buffer
# ([chunks, in_features, batch] fp32).
TRANSPOSED_BLOCK_LABELS = 8192
# Connections per step of the transposed kernel's loop over one input's connections in a chunk.
TRANSPOSED_BLOCK_CONNECTIONS = 64
NUM_WARPS = 4


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()


def unsupported(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` (None when they can)."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"impl='triton' needs CUDA tensors (got {device.type}); on CPU the kernels run only through Triton's "
            "interpreter, with TRITON_INTERPRET=1 set before xmc_dst is imported")


def block_sizes(batch: int) -> tuple[int, int]:
    """(labels, batch) per program: a 2048-element fp32 tile, 16 registers a thread at 4 warps."""
    block_b = min(64, triton.next_power_of_2(max(1, batch)))
    return max(16, 2048 // block_b), block_b


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _gather_tile(xt_ptr, cols, offs_b, batch, mask):
    """``xt[cols[l], offs_b[b]]`` as a ``[labels, batch]`` tile (int64 offsets: in * batch may pass 2**31)."""
    return tl.load(xt_ptr + cols.to(tl.int64)[:, None] * batch + offs_b[None, :], mask=mask, other=0.0)


@triton.jit
def _forward_kernel(xt_ptr, w_ptr, idx_ptr, bias_ptr, y_ptr, num_out, fan_in, batch, stride_yb, stride_yl,
                    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr):
    # One flat grid (a second grid axis stops at 65535 blocks); batch blocks vary fastest, so the programs of one
    # label block run together and read its weights and indices from L2 after the first.
    num_b = tl.cdiv(batch, BLOCK_B)
    pid_b = tl.program_id(0) % num_b
    pid_l = tl.program_id(0) // num_b
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_l = offs_l < num_out
    mask = mask_l[:, None] & (offs_b < batch)[None, :]
    row = offs_l.to(tl.int64) * fan_in
    acc = tl.zeros((BLOCK_L, BLOCK_B), dtype=ACC)
    for j in range(fan_in):
        cols = tl.load(idx_ptr + row + j, mask=mask_l, other=0)
        w = tl.load(w_ptr + row + j, mask=mask_l, other=0.0).to(ACC)
        acc += w[:, None] * _gather_tile(xt_ptr, cols, offs_b, batch, mask).to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_l, mask=mask_l, other=0.0).to(ACC)[:, None]
    out = y_ptr + offs_b.to(tl.int64)[None, :] * stride_yb + offs_l.to(tl.int64)[:, None] * stride_yl
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(xt_ptr, w_ptr, idx_ptr, dy_ptr, dw_ptr, db_ptr, dxt_ptr, num_out, fan_in, batch,
                     stride_db, stride_dl, WANT_W: tl.constexpr, WANT_B: tl.constexpr, WANT_X: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    offs_l = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < num_out
    row = offs_l.to(tl.int64) * fan_in
    db = tl.zeros((BLOCK_L,), dtype=ACC)
    for b0 in range(0, batch, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = mask_l[:, None] & (offs_b < batch)[None, :]
        dy = tl.load(dy_ptr + offs_b.to(tl.int64)[None, :] * stride_db + offs_l.to(tl.int64)[:, None] * stride_dl,
                     mask=mask, other=0.0).to(ACC)
        if WANT_B:
            db += tl.sum(dy, axis=1)
        for j in range(fan_in):
            cols = tl.load(idx_ptr + row + j, mask=mask_l, other=0)
            if WANT_W:
                part = tl.sum(_gather_tile(xt_ptr, cols, offs_b, batch, mask).to(ACC) * dy, axis=1)
                if b0 > 0:  # this program owns the rows: accumulate over batch blocks without atomics
                    part += tl.load(dw_ptr + row + j, mask=mask_l, other=0.0).to(ACC)
                tl.store(dw_ptr + row + j, part.to(dw_ptr.dtype.element_ty), mask=mask_l)
            if WANT_X:
                w = tl.load(w_ptr + row + j, mask=mask_l, other=0.0).to(ACC)
                tl.atomic_add(dxt_ptr + cols.to(tl.int64)[:, None] * batch + offs_b[None, :], w[:, None] * dy,
                              mask=mask, sem="relaxed")
    if WANT_B:
        tl.store(db_ptr + offs_l, db.to(db_ptr.dtype.element_ty), mask=mask_l)


@triton.jit
def _input_grad_transposed_kernel(dy_ptr, w_sorted_ptr, rows_ptr, col_ptr_ptr, part_ptr, num_out, fan_in,
                                  in_features, batch, block_labels, stride_db, stride_dl, ACC: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    d = tl.program_id(0)  # inputs vary fastest: a chunk's programs run together while its gradient is in L2
    chunk = tl.program_id(1)
    pointers = col_ptr_ptr + chunk.to(tl.int64) * (in_features + 1) + d
    start, stop = tl.load(pointers), tl.load(pointers + 1)
    first_label = chunk.to(tl.int64) * block_labels
    base = first_label * fan_in  # the chunk's connections start here in rows / w_sorted
    for b0 in range(0, batch, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        acc = tl.zeros((BLOCK_B,), dtype=ACC)
        for c0 in range(start, stop, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < stop
            labels = first_label + tl.load(rows_ptr + base + offs_c, mask=mask_c, other=0).to(tl.int64)
            w = tl.load(w_sorted_ptr + base + offs_c, mask=mask_c, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + labels[:, None] * stride_dl + offs_b.to(tl.int64)[None, :] * stride_db,
                         mask=mask_c[:, None] & mask_b[None, :], other=0.0).to(ACC)
            acc += tl.sum(w[:, None] * dy, axis=0)
        out = part_ptr + (chunk.to(tl.int64) * in_features + d) * batch + offs_b
        tl.store(out, acc.to(part_ptr.dtype.element_ty), mask=mask_b)


# ------------------------------------------------------------------------------------------------------ launchers


def forward(xt: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``y [batch, out]`` from ``xt [in, batch]``: ``y[b, l] = sum_j weight[l, j] * xt[indices[l, j], b] + bias[l]``."""
    batch, (num_out, fan_in) = xt.shape[1], weight.shape
    y = torch.empty(batch, num_out, dtype=out_dtype, device=xt.device)
    if y.numel() == 0:
        return y
    block_l, block_b = block_sizes(batch)
    grid = (triton.cdiv(batch, block_b) * triton.cdiv(num_out, block_l),)
    _forward_kernel[grid](xt, weight, indices, bias if bias is not None else weight, y, num_out, fan_in, batch,
                          y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                          ACC=_TL[_acc_dtype(xt, weight)], BLOCK_L=block_l, BLOCK_B=block_b, num_warps=NUM_WARPS)
    return y


def backward(xt: Tensor, weight: Tensor, indices: Tensor, grad_out: Tensor, want_x: bool, want_w: bool,
             want_b: bool, input_grad: InputGrad = "atomic",
             transposed=None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_xt [in, batch] in the accumulation dtype, grad_weight, grad_bias)``; ``None`` where not wanted.

    ``grad_out`` is ``[batch, out]`` with any strides (expanded and transposed gradients are read in place).
    ``input_grad="transposed"`` needs ``transposed``: the layer's structure blocked by :data:`TRANSPOSED_BLOCK_LABELS`.
    """
    acc = _acc_dtype(xt, weight)
    in_features, batch = xt.shape
    num_out, fan_in = weight.shape
    atomic_x = want_x and input_grad == "atomic"
    grad_w = torch.empty_like(weight) if want_w else None
    grad_b = torch.empty(num_out, dtype=weight.dtype, device=weight.device) if want_b else None
    grad_xt = torch.zeros(in_features, batch, dtype=acc, device=xt.device) if atomic_x else None
    if (want_w or want_b or atomic_x) and num_out and batch:
        block_l, block_b = block_sizes(batch)
        dummy = weight
        _backward_kernel[(triton.cdiv(num_out, block_l),)](
            xt, weight, indices, grad_out, grad_w if want_w else dummy, grad_b if want_b else dummy,
            grad_xt if atomic_x else dummy, num_out, fan_in, batch, grad_out.stride(0), grad_out.stride(1),
            WANT_W=want_w, WANT_B=want_b, WANT_X=atomic_x, ACC=_TL[acc], BLOCK_L=block_l, BLOCK_B=block_b,
            num_warps=NUM_WARPS)
    elif want_w or want_b:  # an empty batch: gradients of a sum over no rows
        for t in (grad_w, grad_b):
            if t is not None:
                t.zero_()
    if want_x and input_grad == "transposed":
        grad_xt = _input_grad_transposed(weight, grad_out, transposed, in_features, batch, acc)
    elif want_x and input_grad != "atomic":
        raise ValueError(f"input_grad must be 'atomic' or 'transposed', got {input_grad!r}")
    return grad_xt, grad_w, grad_b


def _input_grad_transposed(weight: Tensor, grad_out: Tensor, tr, in_features: int, batch: int,
                           acc: torch.dtype) -> Tensor:
    num_out, fan_in = weight.shape
    if tr is None or len(tr.starts) < 2:
        raise ValueError("input_grad='transposed' needs the layer's transposed structure")
    block_labels = tr.starts[1] - tr.starts[0]
    num_chunks = len(tr.starts) - 1
    if grad_out.stride(0) != 1 and num_out > 1:  # label-major, so one connection's batch values are contiguous
        grad_out = grad_out.t().contiguous().t()
    w_sorted = weight.reshape(-1)[tr.order]
    partial = torch.empty(num_chunks, in_features, batch, dtype=acc, device=weight.device)
    if batch and num_out:
        _, block_b = block_sizes(batch)
        _input_grad_transposed_kernel[(in_features, num_chunks)](
            grad_out, w_sorted, tr.rows, tr.col_ptr, partial, num_out, fan_in, in_features, batch, block_labels,
            grad_out.stride(0), grad_out.stride(1), ACC=_TL[acc], BLOCK_C=TRANSPOSED_BLOCK_CONNECTIONS,
            BLOCK_B=block_b, num_warps=NUM_WARPS)
    else:
        partial.zero_()
    return partial[0] if num_chunks == 1 else partial.sum(0)


class TritonFanInFunction(torch.autograd.Function):
    """Autograd through the kernels; ``x`` in its own dtype, gradients back in the dtypes of their inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,  # noqa: D102
                out_dtype: torch.dtype, input_grad: InputGrad, transposed) -> Tensor:
        xt = x.t().contiguous()
        y = forward(xt, weight, bias, indices, out_dtype)
        ctx.save_for_backward(xt, weight, indices)
        ctx.has_bias, ctx.x_dtype, ctx.input_grad, ctx.transposed = bias is not None, x.dtype, input_grad, transposed
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        xt, weight, indices = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_xt, grad_w, grad_b = backward(xt, weight, indices, grad_out, want_x, want_w, want_b, ctx.input_grad,
                                           ctx.transposed)
        grad_x = grad_xt.t().to(ctx.x_dtype) if grad_xt is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None
