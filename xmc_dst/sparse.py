"""The fixed fan-in sparse layer and its rewiring primitive.

Every output (label) ``l`` reads exactly ``fan_in`` inputs ``indices[l]`` with weights ``weight[l]``:

    y[b, l] = sum_j weight[l, j] * x[b, indices[l, j]] + bias[l]

so a head of ``L`` labels costs ``L * fan_in`` weights instead of ``L * in_features``, and the structure is a plain
``[L, fan_in]`` tensor pair rather than a general sparse matrix. Dynamic sparse training changes ``indices`` in place
(:meth:`FixedFanInLinear.rewire`) while the fan-in of every label stays fixed.

Implementations (``impl``), all checked against the same naive gather oracle in the tests:

* ``kernel``: C kernels (``csrc/fixed_fan_in.c``) that walk the labels once per pass; fastest on CPU.
* ``csr``: ``torch.sparse.mm`` forward; backward computes the weight gradient with ``torch.sparse.sampled_addmm`` and
  the input gradient with the transposed CSR product, blocked by labels so each block's output gradient stays in
  cache. Works on CPU and CUDA.
* ``embedding_bag``: portable fallback built on ``embedding_bag`` and chunked gathers; any device.
* ``triton``: Triton kernels (``triton_fan_in.py``, the optional ``triton`` extra) that read fp32/fp16/bf16 inputs as
  they arrive and accumulate in fp32; CUDA (on CPU only through Triton's interpreter, for tests).

``auto`` picks ``kernel`` on CPU where the kernels build, ``triton`` on CUDA where Triton imports, else ``csr`` on
CPU/CUDA and ``embedding_bag`` elsewhere.

The layer always accumulates in fp32 (or fp64 for fp64 inputs), also under autocast: an fp16 sum over the fan-in
would lose the small weights DST is about to prune. The logits are fp32 too (the loss over hundreds of thousands of
labels needs it), or the autocast dtype with ``autocast_logits=True``. The ``triton`` path reads half-precision inputs
directly; the others compute on an fp32 copy of them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from xmc_dst.kernels import advise_huge_pages, load_kernels

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Impl = Literal["auto", "kernel", "csr", "embedding_bag", "triton"]
IMPLS: tuple[str, ...] = ("kernel", "csr", "embedding_bag", "triton")
# Index dtype: int32 halves the index memory (670K x 32 indices: 86 MB instead of 171 MB) and covers any input width
# below 2**31; embedding_bag, CSR tensors and the C kernels all take int32 indices directly.
INDEX_DTYPE = torch.int32
# Labels per block of the blocked transposed product in the ``csr`` backward on CPU: 1024 x batch 64 fp32 output-
# gradient rows are 256 KB, which stays in L2 while the block's connections are scattered.
CSR_BLOCK_LABELS = 1024
# Labels per chunk of the gathers in the ``embedding_bag`` backward: bounds the [chunk, fan_in, batch] temporary.
GATHER_CHUNK_ELEMENTS = 1 << 24
# Random keys per step of the PyTorch regrowth path ([rows, in_features] fp32: 64 MB).
REGROW_CHUNK_ELEMENTS = 1 << 24


def _num_threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def triton_problem(device: torch.device) -> str | None:
    """Why ``impl="triton"`` cannot run on ``device`` (None when it can); imports Triton on first use."""
    try:
        from xmc_dst import triton_fan_in
    except ImportError as err:
        return f"impl='triton' needs Triton ({err}); install it with `pip install 'xmc-dst[triton]'`"
    return triton_fan_in.unsupported(device)


class _KernelFunction(torch.autograd.Function):
    """Forward and backward through the C kernels (CPU, fp32/fp64, contiguous weight and indices)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor) -> Tensor:  # noqa: D102
        lib = load_kernels()
        suffix = "f64" if x.dtype == torch.float64 else "f32"
        xt = x.t().contiguous()
        batch, num_out, fan_in = x.shape[0], weight.shape[0], weight.shape[1]
        out = torch.empty(batch, num_out, dtype=x.dtype)
        advise_huge_pages(out)
        getattr(lib, f"ffi_forward_{suffix}")(
            xt.data_ptr(), weight.data_ptr(), indices.data_ptr(), _ptr(bias), out.data_ptr(),
            num_out, fan_in, batch, out.stride(0), out.stride(1), _num_threads(),
        )
        ctx.save_for_backward(xt, weight, indices)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        xt, weight, indices = ctx.saved_tensors
        lib = load_kernels()
        suffix = "f64" if xt.dtype == torch.float64 else "f32"
        grad_out = grad_out.to(xt.dtype)
        want_x, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_w = torch.empty_like(weight) if want_w else None
        if grad_w is not None:
            advise_huge_pages(grad_w)
        grad_xt = torch.empty_like(xt) if want_x else None
        if want_x or want_w:
            getattr(lib, f"ffi_backward_{suffix}")(
                xt.data_ptr(), weight.data_ptr(), indices.data_ptr(), grad_out.data_ptr(), _ptr(grad_w),
                _ptr(grad_xt), weight.shape[0], weight.shape[1], xt.shape[1], xt.shape[0],
                grad_out.stride(0), grad_out.stride(1), _num_threads(),
            )
        grad_b = grad_out.sum(0) if (ctx.has_bias and want_b) else None
        grad_x = grad_xt.t() if grad_xt is not None else None
        return grad_x, grad_w, grad_b, None


@dataclass
class _Transposed:
    """The connections sorted by input, blocked by labels; rebuilt only when the topology changes.

    Block ``k`` covers labels ``[starts[k], starts[k+1])``; within it ``col_ptr[k]`` are CSR row pointers over the
    inputs, ``rows`` the local label of each connection and ``order`` its position in ``weight.view(-1)``.
    """

    starts: list[int]
    col_ptr: Tensor  # [num_blocks, in_features + 1]
    rows: Tensor  # [nnz], local label ids
    order: Tensor  # [nnz], int64 positions into the flat weight


def _build_transposed(indices: Tensor, in_features: int, block_labels: int) -> _Transposed:
    num_out, fan_in = indices.shape
    block_labels = max(1, min(block_labels, num_out))
    flat = indices.reshape(-1).long()
    label = torch.arange(num_out, device=indices.device).repeat_interleave(fan_in)
    block = label // block_labels
    # Sort connections by (block, input, label): a stable sort on (block, input) keeps labels ascending.
    order = torch.argsort(block * in_features + flat, stable=True)
    num_blocks = (num_out + block_labels - 1) // block_labels
    key = block * in_features + flat
    counts = torch.zeros(num_blocks * in_features, dtype=torch.int64, device=indices.device)
    counts = counts.index_add_(0, key, torch.ones_like(key)).view(num_blocks, -1)  # bincount reads its max on CUDA
    col_ptr = torch.zeros(num_blocks, in_features + 1, dtype=torch.int64, device=indices.device)
    col_ptr[:, 1:] = counts.cumsum(1)
    rows = (label[order] - block[order] * block_labels).to(INDEX_DTYPE)
    starts = list(range(0, num_out, block_labels)) + [num_out]
    return _Transposed(starts, col_ptr.to(INDEX_DTYPE), rows, order)


def _csr(indices: Tensor, values: Tensor, in_features: int) -> Tensor:
    num_out, fan_in = indices.shape
    crow = torch.arange(0, num_out * fan_in + 1, fan_in, dtype=indices.dtype, device=indices.device)
    return torch.sparse_csr_tensor(crow, indices.reshape(-1), values.reshape(-1), (num_out, in_features),
                                   check_invariants=False)


def _transposed_product(tr: _Transposed, weight: Tensor, grad_t: Tensor, in_features: int) -> Tensor:
    """``W^T @ grad_t`` ([in, batch]) from the blocked transposed structure; ``grad_t`` is [out, batch]."""
    values = weight.reshape(-1)[tr.order]
    acc = torch.zeros(in_features, grad_t.shape[1], dtype=weight.dtype, device=weight.device)
    offset = 0
    for k in range(len(tr.starts) - 1):
        start, stop = tr.starts[k], tr.starts[k + 1]
        nnz = (stop - start) * weight.shape[1]
        block = torch.sparse_csr_tensor(tr.col_ptr[k], tr.rows[offset:offset + nnz], values[offset:offset + nnz],
                                        (in_features, stop - start), check_invariants=False)
        acc += torch.sparse.mm(block, grad_t[start:stop])
        offset += nnz
    return acc


def _output_of_transposed(ctx, out_t: Tensor, bias: Tensor | None, transposed: _Transposed, *saved: Tensor) -> Tensor:
    """The ``[batch, out]`` output of a ``[out, batch]`` product, bias added; keeps what backward needs."""
    if bias is not None:
        out_t += bias[:, None]
    ctx.save_for_backward(*saved)
    ctx.transposed, ctx.has_bias = transposed, bias is not None
    return out_t.t()


class _CSRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,  # noqa: D102
                transposed: _Transposed) -> Tensor:
        in_features = x.shape[1]
        out_t = torch.sparse.mm(_csr(indices, weight, in_features), x.t().contiguous())  # [out, batch]
        return _output_of_transposed(ctx, out_t, bias, transposed, x, weight, indices)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        x, weight, indices = ctx.saved_tensors
        grad_t = grad_out.to(x.dtype).t().contiguous()  # free when grad_out came back in the output's layout
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            pattern = _csr(indices, weight, x.shape[1])
            grad_w = torch.sparse.sampled_addmm(pattern, grad_t, x, beta=0.0).values().view_as(weight)
        if ctx.needs_input_grad[0]:
            grad_x = _transposed_product(ctx.transposed, weight, grad_t, x.shape[1]).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_t.sum(1)
        return grad_x, grad_w, grad_b, None, None


class _EmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,  # noqa: D102
                transposed: _Transposed) -> Tensor:
        xt = x.t().contiguous()
        out_t = nn.functional.embedding_bag(indices, xt, per_sample_weights=weight, mode="sum")  # [out, batch]
        return _output_of_transposed(ctx, out_t, bias, transposed, xt, weight, indices)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        xt, weight, indices = ctx.saved_tensors
        grad_t = grad_out.to(xt.dtype).t().contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            num_out, fan_in = weight.shape
            chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, fan_in * xt.shape[1]))
            grad_w = torch.empty_like(weight)
            for start in range(0, num_out, chunk):
                stop = min(num_out, start + chunk)
                gathered = xt[indices[start:stop].long()]  # [chunk, fan_in, batch]
                grad_w[start:stop] = torch.bmm(gathered, grad_t[start:stop, :, None]).squeeze(-1)
        if ctx.needs_input_grad[0]:
            tr = ctx.transposed
            # One block: every input is a bag of the labels it feeds, weighted by the connection's weight.
            grad_xt = nn.functional.embedding_bag(
                tr.rows.long(), grad_t, tr.col_ptr[0, :-1].long(), per_sample_weights=weight.reshape(-1)[tr.order],
                mode="sum",
            )
            grad_x = grad_xt.t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_t.sum(1)
        return grad_x, grad_w, grad_b, None, None


def _expand_ranges(starts: Tensor, counts: Tensor) -> Tensor:
    """Positions ``starts[i] .. starts[i] + counts[i]`` of every ``i``, concatenated (int64)."""
    total = int(counts.sum())
    first = torch.repeat_interleave(starts - counts.cumsum(0) + counts, counts, output_size=total)
    return first + torch.arange(total, dtype=torch.int64, device=starts.device)


def sparse_input_linear(weight: Tensor, bias: Tensor | None, offsets: Tensor, ids: Tensor, values: Tensor,
                        col_ptr: Tensor, rows: Tensor, num_out: int, order: Tensor | None = None) -> Tensor:
    """``y = x @ W^T`` for sparse inputs ``x`` (CSR rows ``offsets``/``ids``/``values``) and a weight stored by input:
    input ``i``'s connections are ``col_ptr[i]:col_ptr[i + 1]``, feeding outputs ``rows[...]`` with the flat weights
    ``weight.view(-1)[order[...]]`` (``order`` None: the connections are the flat weights in that order). Only the
    connections of each row's non-zero inputs are touched; differentiable in ``weight`` and ``bias``."""
    return _SparseInputFunction.apply(weight, bias, offsets, ids, values, col_ptr, rows, order, num_out)


class _SparseInputFunction(torch.autograd.Function):
    """``y = x @ W^T`` for a sparse ``x`` given as CSR rows: only the connections of each row's non-zero inputs."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, offsets: Tensor, ids: Tensor, values: Tensor,  # noqa: D102
                col_ptr: Tensor, rows: Tensor, order: Tensor | None, num_out: int) -> Tensor:
        num_rows = offsets.numel() - 1
        ptr = col_ptr.long()
        ids = ids.long()
        starts, counts = ptr[ids], ptr[ids + 1] - ptr[ids]
        pair = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts)
        positions = _expand_ranges(starts, counts)
        connection = positions if order is None else order.index_select(0, positions)  # into weight.view(-1)
        row = torch.repeat_interleave(torch.arange(num_rows, device=ids.device), offsets.diff().long())
        target = row.index_select(0, pair) * num_out + rows.index_select(0, positions).long()  # into out.view(-1)
        coefficient = values.to(weight.dtype).index_select(0, pair)
        out = torch.zeros(num_rows * num_out, dtype=weight.dtype, device=weight.device)
        out.index_add_(0, target, coefficient * weight.reshape(-1).index_select(0, connection))
        out = out.view(num_rows, num_out)
        if bias is not None:
            out += bias
        ctx.save_for_backward(connection, target, coefficient)
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        connection, target, coefficient = ctx.saved_tensors
        grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.zeros(ctx.weight_shape.numel(), dtype=coefficient.dtype, device=coefficient.device)
            upstream = grad_out.reshape(-1).index_select(0, target).to(coefficient.dtype)
            grad_w.index_add_(0, connection, coefficient * upstream)
            grad_w = grad_w.view(ctx.weight_shape)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_out.sum(0)
        return grad_w, grad_b, None, None, None, None, None, None, None


@dataclass
class RewireResult:
    """What one :meth:`FixedFanInLinear.rewire` did.

    ``permutation[l, j]`` is the slot that new slot ``j`` of row ``l`` came from (rows are re-sorted after regrowth,
    so surviving connections can move); ``regrown[l, j]`` marks the slots that hold a new connection. Both stay on
    the layer's device; the counts below read from it (on a GPU: wait for it) only when asked for.
    """

    regrown: Tensor  # bool [out, fan_in]
    permutation: Tensor  # int64 [out, fan_in]

    @property
    def num_pruned(self) -> int:
        """How many connections were pruned (and as many regrown)."""
        return int(self.regrown.sum())

    @property
    def regrown_fraction(self) -> float:
        """Share of all slots that were regrown."""
        return self.num_pruned / max(1, self.regrown.numel())


class RegrowthCandidates(Protocol):
    """Chosen regrowth inputs for :meth:`FixedFanInLinear.rewire` (e.g. :class:`xmc_dst.regrowth.GradientScores`)."""

    def best_unconnected(self, indices: Tensor, counts: Tensor, members: Tensor | None = None) -> Tensor:
        """Per row of ``indices`` [rows, k], ``max(counts)`` distinct inputs absent from the row, best first; with
        ``members`` [rows, G] (output ids, -1 for none) a row is scored for all its outputs together."""
        ...


class FixedFanInLinear(nn.Module):
    """A linear layer in which every output reads exactly ``fan_in`` of the inputs.

    Args:
        in_features: input width.
        out_features: number of outputs (labels).
        fan_in: connections per output, ``1 <= fan_in <= in_features``.
        bias: learn an additive bias per output.
        impl: ``auto``, ``kernel``, ``csr``, ``embedding_bag`` or ``triton`` (see the module docstring).
        generator: random source for the initial topology and weights.
        autocast_logits: under autocast, return the logits in the autocast dtype instead of fp32.
    """

    def __init__(self, in_features: int, out_features: int, fan_in: int, bias: bool = True, impl: Impl = "auto",
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, autocast_logits: bool = False) -> None:
        super().__init__()
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be between 1 and in_features={in_features}, got {fan_in}")
        if impl not in ("auto", *IMPLS):
            raise ValueError(f"impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
        if in_features >= 2**31:
            raise ValueError("in_features must be below 2**31 (int32 indices)")
        self.in_features, self.out_features, self.fan_in, self.impl = in_features, out_features, fan_in, impl
        self.autocast_logits = autocast_logits
        self.weight = nn.Parameter(torch.empty(out_features, fan_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("indices", torch.empty(out_features, fan_in, dtype=INDEX_DTYPE, device=device))
        # Counts rewires; persistent so that checkpoints carry it.
        self.register_buffer("topology_version", torch.zeros((), dtype=torch.int64, device=device))
        self._transposed: _Transposed | None = None
        self._transposed_key: tuple | None = None
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw a uniform random topology (without replacement per row) and fan-in-scaled weights."""
        self.indices.copy_(random_indices(self.out_features, self.in_features, self.fan_in, generator,
                                          self.indices.device))
        bound = 1.0 / math.sqrt(self.fan_in)
        self.weight.copy_(_uniform(self.weight.shape, bound, generator, self.weight))
        if self.bias is not None:
            self.bias.copy_(_uniform(self.bias.shape, bound, generator, self.bias))
        self.topology_version.zero_()

    @torch.no_grad()
    def start_from(self, embeddings: Tensor, first: int = 0) -> None:
        """Start outputs ``first ..`` at their rows of ``embeddings`` ``[n, in_features]``: each output connects to
        the ``fan_in`` inputs where its row is largest, weighted by those values rescaled to the norm of the output's
        present weights (the initialisation's scale is kept); biases stay. A row with no positive value keeps its
        start (nothing points anywhere)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.in_features:
            raise ValueError(f"embeddings must be [n, {self.in_features}], got {list(embeddings.shape)}")
        rows = slice(first, first + embeddings.shape[0])
        values, chosen = embeddings.float().to(self.weight.device).topk(self.fan_in, dim=1)
        chosen, order = chosen.sort(dim=1)
        values = values.gather(1, order)
        scale = self.weight[rows].float().norm(dim=1, keepdim=True) / values.norm(dim=1, keepdim=True).clamp_min(1e-12)
        keep = values.max(dim=1).values <= 0
        self.weight[rows] = torch.where(keep[:, None], self.weight[rows].float(), values * scale).to(self.weight.dtype)
        self.indices[rows] = torch.where(keep[:, None], self.indices[rows], chosen.to(self.indices.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
                f"bias={self.bias is not None}, impl={self.impl}")

    def resolved_impl(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str:
        """The implementation ``forward`` uses on ``device`` (default: where the weights are)."""
        device = device or self.weight.device
        dtype = dtype or torch.float32
        if self.impl != "auto":
            if self.impl == "kernel" and (device.type != "cpu" or load_kernels() is None):
                raise RuntimeError("impl='kernel' needs a CPU tensor and a working C compiler; use impl='auto'")
            if self.impl == "triton" and (problem := triton_problem(device)) is not None:
                raise RuntimeError(problem)
            return self.impl
        if device.type == "cpu" and dtype in (torch.float32, torch.float64) and load_kernels() is not None:
            return "kernel"
        if device.type == "cuda" and triton_problem(device) is None:
            return "triton"
        return "csr" if device.type in ("cpu", "cuda") else "embedding_bag"

    def transposed_structure(self, block_labels: int | None = None) -> _Transposed:
        """The input-major structure, cached until the indices change (rewire, ``load_state_dict``, ``.to``).

        ``block_labels`` defaults to :data:`CSR_BLOCK_LABELS` on CPU and to one block elsewhere.
        """
        idx = self.indices
        if block_labels is None:
            block_labels = CSR_BLOCK_LABELS if idx.device.type == "cpu" else self.out_features
        key = (idx.data_ptr(), idx._version, idx.device, block_labels)
        if self._transposed is None or self._transposed_key != key:
            self._transposed = _build_transposed(idx, self.in_features, block_labels)
            self._transposed_key = key
        return self._transposed

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        out_dtype = compute
        if self.autocast_logits and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        impl = self.resolved_impl(x.device, compute)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if impl == "triton":
                return self._triton(x, out_dtype).reshape(*lead, self.out_features)
            x = x.to(compute)
            weight = self.weight.to(compute)
            bias = self.bias.to(compute) if self.bias is not None else None
            if impl == "kernel":
                y = _KernelFunction.apply(x.contiguous(), weight.contiguous(), bias, self.indices.contiguous())
            elif impl == "csr":
                y = _CSRFunction.apply(x, weight, bias, self.indices, self.transposed_structure())
            else:
                y = _EmbeddingBagFunction.apply(x, weight, bias, self.indices,
                                                self.transposed_structure(self.out_features))
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def forward_sparse(self, offsets: Tensor, ids: Tensor, values: Tensor) -> Tensor:
        """The output for sparse inputs: row ``r`` has ``values[offsets[r]:offsets[r+1]]`` at inputs ``ids[...]``.

        Equal to ``forward`` of the densified rows, at a cost proportional to the connections the rows' non-zero
        inputs feed (the transposed structure), not to ``rows * out_features * fan_in``: for TF-IDF inputs of a
        hundred thousand terms, of which a document has a few dozen, that is orders of magnitude less work, and no
        ``[rows, in_features]`` tensor is ever made. Accumulates in the weights' dtype (fp32 or fp64); no input
        gradient (the inputs are data).
        """
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.in_features):
            raise ValueError(f"sparse input ids must lie in [0, {self.in_features}), got {int(ids.min())}.."
                             f"{int(ids.max())}")
        compute = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        weight = self.weight.to(compute)
        bias = self.bias.to(compute) if self.bias is not None else None
        transposed = self.transposed_structure(self.out_features)
        return sparse_input_linear(weight, bias, offsets, ids, values, transposed.col_ptr[0], transposed.rows,
                                   self.out_features, transposed.order)

    def _triton(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        """The Triton kernels on ``x`` in its own dtype; the input gradient as :data:`triton_fan_in.INPUT_GRAD`."""
        from xmc_dst import triton_fan_in

        mode = triton_fan_in.INPUT_GRAD
        transposed = None
        if mode == "transposed" and x.requires_grad and torch.is_grad_enabled():
            transposed = self.transposed_structure(triton_fan_in.TRANSPOSED_BLOCK_LABELS)
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point inputs, got {x.dtype}")
        return triton_fan_in.TritonFanInFunction.apply(x, self.weight.contiguous(), self.bias,
                                                       self.indices.contiguous(), out_dtype, mode, transposed)

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``[out, in]`` weight (for tests and small layers only)."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        return dense.scatter_(1, self.indices.long(), self.weight.detach())

    @torch.no_grad()
    def rewire(self, mode: Literal["threshold", "fraction"], amount: float, generator: torch.Generator | None = None,
               init: Literal["zero", "uniform"] = "zero",
               candidates: RegrowthCandidates | None = None) -> RewireResult:
        """Prune weak connections per row by magnitude and regrow as many, at random inputs (SET) or at the best
        ``candidates`` (RigL).

        Args:
            mode: ``threshold`` drops every weight with ``|w| < amount``; ``fraction`` drops the
                ``round(amount * fan_in)`` smallest weights of each row.
            amount: the threshold or the fraction.
            generator: random source of the regrown inputs (deterministic for a given generator state).
            init: value of the regrown weights: ``zero`` or ``uniform`` in ``+-1/sqrt(fan_in)``.
            candidates: regrowth scores of this step (:class:`xmc_dst.regrowth.GradientScores`); each row then takes
                its best inputs among those it was not connected to, instead of random ones.

        New inputs are drawn uniformly among the inputs the row was not connected to before this call, so a rewire
        always changes the topology where it prunes. A row can regrow at most ``in_features - fan_in`` connections;
        beyond that its weakest are kept. Rows stay sorted and unique; the fan-in never changes.
        """
        if init not in ("zero", "uniform"):
            raise ValueError(f"init must be 'zero' or 'uniform', got {init!r}")
        prune = prune_mask(self.weight, mode, amount, max_per_row=self.in_features - self.fan_in)
        if candidates is None:
            sorted_idx, permutation = regrow(self.indices, prune, self.in_features, generator)
            result = commit_topology(self.weight, self.indices, prune, sorted_idx, permutation)
        else:
            chosen = candidates.best_unconnected(self.indices, prune.sum(1))
            result = apply_regrowth(self.weight, self.indices, prune, chosen)
        if init == "uniform":
            fresh = _uniform(self.weight.shape, 1.0 / math.sqrt(self.fan_in), generator, self.weight)
            self.weight.copy_(torch.where(result.regrown, fresh, self.weight))
        self.topology_version += 1
        return result

    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer, result: RewireResult) -> int:
        """Move this layer's optimizer state with its connections and zero it at regrown slots (see module helper)."""
        return reset_optimizer_state(optimizer, self.weight, result)


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
    values = torch.rand(shape, generator=device_generator(generator, like.device), device=like.device,
                        dtype=torch.float32)
    return ((values * 2 - 1) * bound).to(like.dtype)


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator that draws on ``device``: ``generator`` itself where it lives there, else a new one seeded by one
    draw from ``generator`` (a host-side draw for a CPU generator), so random tensors are made where they are used
    and never copied from the host: no host round trip on a GPU, and deterministic for a given generator state."""
    device = torch.device(device)
    if generator is None or device.type == "meta":  # meta tensors hold no values: nothing to draw
        return None
    here = generator.device
    if here.type == device.type and (here.index or 0) == (device.index or 0):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=here).item())
    return torch.Generator(device=device).manual_seed(seed)


def random_indices(num_rows: int, in_features: int, fan_in: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """``[num_rows, fan_in]`` sorted input ids drawn uniformly without replacement per row."""
    start = torch.zeros(num_rows, fan_in, dtype=torch.long, device=device)
    everything = torch.ones(num_rows, fan_in, dtype=torch.bool, device=device)
    # Regrowing every slot of rows that exclude nothing is exactly uniform sampling without replacement.
    indices, _ = regrow(start, everything, in_features, generator, exclude_old=False)
    return indices


def prune_mask(weight: Tensor, mode: str, amount: float, max_per_row: int | None = None,
               use_kernel: bool | None = None) -> Tensor:
    """Boolean ``[rows, fan_in]`` mask of the connections to prune, by magnitude per row (ties: lower slot first).

    ``fraction`` marks the ``round(amount * fan_in)`` weakest of each row, ``threshold`` every ``|w| < amount``;
    at most ``max_per_row`` per row either way (the weakest). fp32 CPU weights take the C kernel.
    """
    fan_in = weight.shape[1]
    cap = fan_in if max_per_row is None else max(0, min(fan_in, max_per_row))
    if mode not in ("threshold", "fraction"):
        raise ValueError(f"mode must be 'threshold' or 'fraction', got {mode!r}")
    if mode == "threshold" and amount < 0:
        raise ValueError(f"threshold must be >= 0, got {amount}")
    if mode == "fraction" and not 0.0 <= amount <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {amount}")
    lib = None
    if use_kernel is not False and weight.device.type == "cpu" and weight.dtype == torch.float32:
        lib = load_kernels()
    if lib is not None:
        count = cap if mode == "threshold" else min(cap, int(round(amount * fan_in)))
        w = weight.detach().contiguous()
        out = torch.empty(w.shape, dtype=torch.uint8)
        lib.ffi_prune_f32(w.data_ptr(), w.shape[0], fan_in, 0 if mode == "fraction" else 1, float(amount), count,
                          out.data_ptr(), _num_threads())
        return out.bool()
    magnitude = weight.detach().abs()
    if mode == "threshold":
        mask = magnitude < amount
        if cap < fan_in:  # rows that cannot regrow all of them keep their strongest below-threshold weights
            weakest = magnitude.topk(cap, dim=1, largest=False).indices
            mask &= torch.zeros_like(mask).scatter_(1, weakest, True)
        return mask
    count = min(cap, int(round(amount * fan_in)))
    mask = torch.zeros_like(magnitude, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, magnitude.topk(count, dim=1, largest=False).indices, True)
    return mask


def regrow(indices: Tensor, pruned: Tensor, in_features: int, generator: torch.Generator | None = None,
           exclude_old: bool = True, use_kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """Replace the ``pruned`` slots of ``indices`` ``[rows, k]`` by inputs drawn uniformly without replacement among
    the inputs the row does not keep (with ``exclude_old``, not the pruned ones either), then sort every row.

    Returns ``(sorted_indices, permutation)`` (int32, int64): new slot ``j`` of row ``r`` holds what slot
    ``permutation[r, j]`` of the merged row held. On CPU the C kernel does this in one pass over the rows (each row
    with its own random stream seeded from ``generator``); elsewhere, or with ``use_kernel=False``, a vectorised
    PyTorch path does, without reading anything back from the device (see :func:`_regrow_torch`). Both are
    deterministic for a given generator state, but they draw different inputs. A row must have at least as many
    free inputs as it prunes: checked on CPU; on other devices the check would wait for the device, and
    :meth:`FixedFanInLinear.rewire` caps the pruning so that it holds.
    """
    lib = load_kernels() if indices.device.type == "cpu" and use_kernel is not False else None
    if use_kernel and lib is None:
        raise RuntimeError("the regrowth kernel needs CPU tensors and a working C compiler")
    if lib is None:
        return _regrow_torch(indices, pruned, in_features, generator, exclude_old)
    gen_device = generator.device if generator is not None else indices.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())
    rows, k = indices.shape
    idx32 = indices.to(torch.int32).contiguous()
    mask = pruned.contiguous().view(torch.uint8)  # bool and uint8 share one byte per element
    out_idx = torch.empty(rows, k, dtype=INDEX_DTYPE)
    permutation = torch.empty(rows, k, dtype=torch.int64)
    status = lib.ffi_regrow(idx32.data_ptr(), mask.data_ptr(), rows, k, in_features, seed, int(exclude_old),
                            out_idx.data_ptr(), permutation.data_ptr(), _num_threads())
    if status != 0:
        raise ValueError(f"cannot regrow: a row has fewer than the requested free inputs among {in_features}")
    return out_idx, permutation


def _regrow_torch(indices: Tensor, pruned: Tensor, in_features: int, generator: torch.Generator | None,
                  exclude_old: bool) -> tuple[Tensor, Tensor]:
    """The PyTorch path of :func:`regrow`: random keys, with no host synchronisation.

    Every input of a row gets a uniform random key; the inputs the row keeps (with ``exclude_old``, also those it
    prunes) get the key 2, above every draw. The row's ``k`` smallest keys, in order, are its candidates, and its
    pruned slots, left to right, take the first of them: the smallest keys among the free inputs are a uniform
    random subset of them. Rows go in chunks of at most :data:`REGROW_CHUNK_ELEMENTS` keys; the loop runs over a
    number of chunks known from the shapes, never over rows or data-dependent retries, so a GPU never waits.
    """
    rows, k = indices.shape
    device = indices.device
    gen = device_generator(generator, device)
    old = indices.long()
    if device.type == "cpu":
        counts = pruned.sum(1)
        free = in_features - (k if exclude_old else k - counts)
        if bool((counts > free).any()):
            raise ValueError(f"cannot regrow: a row has fewer than the requested free inputs among {in_features}")
    candidates = torch.empty(rows, k, dtype=torch.long, device=device)
    chunk = max(1, REGROW_CHUNK_ELEMENTS // max(1, in_features))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        keys = torch.rand(stop - start, in_features, generator=gen, device=device)
        taken = old[start:stop]
        blocked = torch.full(taken.shape, 2.0, device=device)
        if not exclude_old:  # pruned slots give their input back to the draw
            blocked = torch.where(pruned[start:stop], keys.gather(1, taken), blocked)
        keys.scatter_(1, taken, blocked)
        candidates[start:stop] = keys.topk(k, dim=1, largest=False, sorted=True).indices
    return fill_pruned(indices, pruned, candidates)


def fill_pruned(indices: Tensor, pruned: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """Put each row's first candidates into its ``pruned`` slots (left to right: candidate 0, 1, ...), sort the rows.

    ``candidates[r, :n_r]`` (``n_r`` pruned slots in row ``r``) must be distinct and absent from the row's kept
    inputs. Returns ``(sorted_indices, permutation)`` as :func:`regrow`.
    """
    rank = pruned.long().cumsum(1) - 1  # position of each pruned slot among its row's pruned slots
    chosen = candidates.gather(1, rank.clamp(min=0, max=max(0, candidates.shape[1] - 1))) \
        if candidates.shape[1] else torch.zeros_like(rank)
    sorted_indices, permutation = torch.where(pruned, chosen, indices.long()).sort(dim=1)
    return sorted_indices.to(INDEX_DTYPE), permutation


@torch.no_grad()
def commit_topology(weight: Tensor, indices: Tensor, pruned: Tensor, sorted_indices: Tensor,
                    permutation: Tensor) -> RewireResult:
    """Write re-sorted rows in place: ``indices`` becomes ``sorted_indices``, every weight follows its connection
    (``weight[r, j] = weight[r, permutation[r, j]]``) and the slots that came from ``pruned`` ones start at zero."""
    regrown = pruned.gather(1, permutation)
    weight.copy_(weight.gather(1, permutation).masked_fill_(regrown, 0.0))
    indices.copy_(sorted_indices.to(indices.dtype))
    return RewireResult(regrown=regrown, permutation=permutation)


@torch.no_grad()
def apply_regrowth(weight: Tensor, indices: Tensor, pruned: Tensor, candidates: Tensor) -> RewireResult:
    """Replace the ``pruned`` slots of each row by the row's first candidates, zero their weights, re-sort rows.

    ``candidates[r, :n_r]`` (``n_r`` = pruned slots of row ``r``) must be distinct and absent from the row. The
    pruned slots of a row, left to right, take candidates 0, 1, ...; then each row is sorted and the weights follow.
    ``weight`` and ``indices`` are updated in place.
    """
    sorted_idx, permutation = fill_pruned(indices, pruned, candidates)
    return commit_topology(weight, indices, pruned, sorted_idx, permutation)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, result: RewireResult) -> int:
    """After ``rewire``, make ``param``'s per-element optimizer state follow its connections.

    Every state tensor shaped like the parameter (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``, ...) is
    permuted within rows as the weights were and zeroed at the regrown slots. Returns how many tensors were changed
    (0 when the optimizer does not hold ``param`` or has no state for it yet).
    """
    state = optimizer.state.get(param)
    if not state:
        return 0
    changed = 0
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape:  # masked_fill: a boolean index would sync
            value.copy_(value.gather(1, result.permutation.to(value.device)).masked_fill_(
                result.regrown.to(value.device), 0))
            changed += 1
    return changed
