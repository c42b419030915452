"""The group-shared fixed fan-in layer: groups of ``G`` labels read the same ``fan_in`` inputs (HASTE's layout).

Labels are placed into ``num_groups = ceil(L / G)`` groups of ``G`` slots (the last group padded). Group ``g`` has one
index row ``indices[g]`` ``[fan_in]`` and a weight block ``weight[g]`` ``[G, fan_in]``; label ``l`` sits in slot
``label_position[l]`` (group ``p // G``, row ``p % G``):

    y[b, l] = sum_j weight[g, r, j] * x[b, indices[g, j]] + bias[l],    p = label_position[l], g = p // G, r = p % G

so one gathered input tile ``[fan_in, batch]`` feeds a small dense product with the group's ``[G, fan_in]`` block
(cache-resident on CPU) instead of ``G`` separate gathers, and the index rows shrink ``G`` times. The outputs come
back in the original label order, the bias is kept in it too.

Grouping (:func:`group_positions`): labels sorted by a cluster assignment (e.g. the balanced 2-means tree of
:mod:`xmc_dst.clusters` over the label embeddings), then cut into consecutive runs of ``G``; without an assignment
(``label_id``) the label ids in order, the control.

Dynamic sparse training keeps the rewiring protocol of :class:`xmc_dst.sparse.FixedFanInLinear`, row = group: a slot
of a group is pruned by the mean ``|w|`` over the group's labels (the per-group ranking of the sum; the mean keeps a
threshold's meaning of a per-weight magnitude), regrown at random or at the inputs with the largest summed
``|dL/dW|`` over the group's labels (:meth:`xmc_dst.regrowth.GradientScores.best_unconnected` with ``members``), and
all ``G`` weights of a slot and their optimizer state move with it.

Implementations: ``torch`` (groups in chunks: one gather of the chunk's input tiles, then batched matrix products,
forward and both gradients; any device) and ``kernel`` (the C kernels of ``csrc/fixed_fan_in.c``, CPU fp32/fp64);
``auto`` takes ``kernel`` where it builds. Compute is fp32 (fp64 for fp64 inputs) whatever the weights' dtype, so bf16
weights (:class:`xmc_dst.optim.GroupwiseOptimizer` with stochastic rounding) are read as they are stored.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from xmc_dst.kernels import advise_huge_pages, load_kernels
from xmc_dst.sparse import (
    INDEX_DTYPE,
    RegrowthCandidates,
    RewireResult,
    _num_threads,
    _ptr,
    _uniform,
    fill_pruned,
    prune_mask,
    random_indices,
    regrow,
)

__all__ = ["GROUPED_IMPLS", "GroupedFanInLinear", "group_positions", "reset_grouped_optimizer_state"]

GroupedImpl = Literal["auto", "torch", "kernel"]
GROUPED_IMPLS: tuple[str, ...] = ("torch", "kernel")
# Input elements gathered per chunk of the ``torch`` path: 2**18 fp32 values (1 MB) stay in L2 while the chunk's
# products read them; with fan-in 32 and batch 64, 128 groups per chunk.
TILE_ELEMENTS = 1 << 18


def covering_group_size(num_labels: int, fan_in: int, in_features: int, group_size: int) -> int:
    """The largest group size up to ``group_size`` whose groups can still cover the input: ``L / G`` index rows of
    ``fan_in`` slots hold at least ``in_features`` connections, i.e. ``G <= L * fan_in / in_features`` (at least 1).

    Why: a group shares one index row, so the whole head reads at most ``ceil(L / G) * fan_in`` distinct inputs. On a
    small label set with a large group (Bibtex: 159 labels, G = 32, fan-in 64 over 1,024 inputs: 5 rows, 320 slots)
    most inputs are read by no label at all and accuracy falls (P@1 60.3 against the per-label head's 63.0), while
    groups that can cover the input (G = 8 there) cost nothing measurable. On label spaces of thousands of labels and
    more the bound never binds.
    """
    if min(num_labels, fan_in, in_features, group_size) < 1:
        raise ValueError(f"num_labels, fan_in, in_features and group_size must be at least 1, got {num_labels}, "
                         f"{fan_in}, {in_features}, {group_size}")
    return max(1, min(group_size, num_labels * fan_in // in_features))


def group_positions(num_labels: int, group_size: int, assignment: Tensor | None = None) -> Tensor:
    """Slot of every label, int32 ``[num_labels]``: labels sorted by ``assignment`` (stable, so label ids break ties
    inside a cluster), or by id without one, fill groups of ``group_size`` in that order; the last group is padded.

    Consecutive runs of one cluster's labels become groups, so balanced clusters of any size (the auxiliary
    objective's, or ``ceil(L / G)`` clusters of ``G``) give groups of similar labels.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    if assignment is None:
        return torch.arange(num_labels, dtype=INDEX_DTYPE)
    assignment = torch.as_tensor(assignment).reshape(-1)
    if assignment.numel() != num_labels:
        raise ValueError(f"a label assignment needs one cluster id per label: {assignment.numel()} ids for "
                         f"{num_labels} labels")
    order = torch.argsort(assignment.long().cpu(), stable=True)  # slot -> label
    position = torch.empty(num_labels, dtype=torch.long)
    position[order] = torch.arange(num_labels)
    return position.to(INDEX_DTYPE)


def _check_positions(position: Tensor, num_labels: int, num_slots: int) -> None:
    if position.shape != (num_labels,):
        raise ValueError(f"label_position must have shape ({num_labels},), got {tuple(position.shape)}")
    if num_labels and (int(position.min()) < 0 or int(position.max()) >= num_slots
                       or torch.unique(position).numel() != num_labels):
        raise ValueError(f"label_position must give every label its own slot in [0, {num_slots})")


class _GroupedTorch(torch.autograd.Function):
    """Forward and both gradients of the grouped layer in chunks of groups (gather once, then ``bmm``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,  # noqa: D102
                position: Tensor, order: Tensor) -> Tensor:
        xt = x.t().contiguous()  # [in, batch]: a group's tile is fan_in contiguous rows
        groups, size, fan_in = weight.shape
        batch = xt.shape[1]
        chunk = _chunk_groups(fan_in, batch)
        y = torch.empty(groups, size, batch, dtype=x.dtype, device=x.device)
        for start in range(0, groups, chunk):
            stop = min(groups, start + chunk)
            tile = xt.index_select(0, indices[start:stop].reshape(-1)).view(stop - start, fan_in, batch)
            torch.bmm(weight[start:stop].to(x.dtype), tile, out=y[start:stop])
        out_t = y.view(groups * size, batch).index_select(0, position)  # [labels, batch], original order
        if bias is not None:
            out_t += bias.to(x.dtype)[:, None]
        ctx.save_for_backward(xt, weight, indices, position)
        ctx.has_bias = bias is not None
        return out_t.t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        xt, weight, indices, position = ctx.saved_tensors
        groups, size, fan_in = weight.shape
        batch = xt.shape[1]
        grad_t = grad_out.to(xt.dtype).t().contiguous()  # free when the loss handed back the output's layout
        grad_slots = torch.zeros(groups * size, batch, dtype=xt.dtype, device=xt.device)
        grad_slots.index_add_(0, position, grad_t)  # positions are unique: a scatter; padding slots stay zero
        grad_slots = grad_slots.view(groups, size, batch)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.empty(weight.shape, dtype=xt.dtype, device=xt.device) if want_w else None
        grad_xt = torch.zeros_like(xt) if want_x else None
        chunk = _chunk_groups(fan_in, batch)
        for start in range(0, groups, chunk):
            stop = min(groups, start + chunk)
            flat = indices[start:stop].reshape(-1)
            g = grad_slots[start:stop]
            if want_w:
                tile = xt.index_select(0, flat).view(stop - start, fan_in, batch)
                torch.bmm(g, tile.transpose(1, 2), out=grad_w[start:stop])
            if want_x:
                grad_tile = torch.bmm(weight[start:stop].to(xt.dtype).transpose(1, 2), g)  # [chunk, fan_in, batch]
                grad_xt.index_add_(0, flat, grad_tile.view(-1, batch))
        grad_b = grad_t.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = grad_xt.t() if want_x else None
        return grad_x, grad_w, grad_b, None, None, None


def _grouped_kernels():
    """The C kernel library where it builds and has the grouped kernels, else None."""
    lib = load_kernels()
    return lib if lib is not None and hasattr(lib, "ffi_grouped_forward_f32") else None


def _chunk_groups(fan_in: int, batch: int) -> int:
    return max(1, TILE_ELEMENTS // max(1, fan_in * batch))


class _GroupedKernel(torch.autograd.Function):
    """Forward and both gradients through the C kernels (CPU, fp32/fp64 compute, contiguous tensors); ``order`` is
    the label of every slot (int32, -1 for padding), the inverse of ``position``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,  # noqa: D102
                position: Tensor, order: Tensor) -> Tensor:
        lib = load_kernels()
        suffix = "f64" if x.dtype == torch.float64 else "f32"
        xt = x.t().contiguous()
        w, w_bf16 = _kernel_weights(weight, x.dtype)
        groups, size, fan_in = w.shape
        out_t = torch.empty(position.numel(), xt.shape[1], dtype=x.dtype)
        advise_huge_pages(out_t)
        b = bias.to(x.dtype).contiguous() if bias is not None else None
        getattr(lib, f"ffi_grouped_forward_{suffix}")(
            xt.data_ptr(), w.data_ptr(), w_bf16, indices.data_ptr(), order.data_ptr(), _ptr(b), out_t.data_ptr(),
            groups, size, fan_in, xt.shape[1], _num_threads())
        ctx.save_for_backward(xt, weight, indices, order)
        ctx.has_bias = bias is not None
        return out_t.t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        xt, weight, indices, order = ctx.saved_tensors
        lib = load_kernels()
        suffix = "f64" if xt.dtype == torch.float64 else "f32"
        grad_t = grad_out.to(xt.dtype).t().contiguous()
        w, w_bf16 = _kernel_weights(weight, xt.dtype)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_w = torch.empty(w.shape, dtype=xt.dtype) if want_w else None
        if grad_w is not None:
            advise_huge_pages(grad_w)
        grad_xt = torch.empty_like(xt) if want_x else None
        grad_b = torch.empty(grad_t.shape[0], dtype=xt.dtype) if want_b else None
        if want_x or want_w or want_b:
            groups, size, fan_in = w.shape
            getattr(lib, f"ffi_grouped_backward_{suffix}")(
                xt.data_ptr(), w.data_ptr(), w_bf16, indices.data_ptr(), order.data_ptr(), grad_t.data_ptr(),
                _ptr(grad_w), _ptr(grad_xt), _ptr(grad_b), groups, size, fan_in, xt.shape[0], xt.shape[1],
                _num_threads())
        return grad_xt.t() if want_x else None, grad_w, grad_b, None, None, None


def _kernel_weights(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """The weights the kernels read and whether they are bf16: fp32 kernels widen a group's bf16 block as they reach
    it (no fp32 copy of all weights per pass); anything else is converted to the compute dtype."""
    if weight.dtype == torch.bfloat16 and dtype == torch.float32:
        return weight.detach().contiguous(), 1
    return weight.detach().to(dtype).contiguous(), 0


class GroupedFanInLinear(nn.Module):
    """A linear layer whose outputs come in groups of ``group_size`` that share their ``fan_in`` inputs.

    Args:
        in_features: input width.
        out_features: number of outputs (labels).
        fan_in: inputs per group, ``1 <= fan_in <= in_features``.
        group_size: labels per group (``G``); 1 is the per-label layout.
        bias: learn an additive bias per output.
        impl: ``auto``, ``torch`` or ``kernel`` (see the module docstring).
        generator: random source of the initial topology and weights.
        label_position: slot of every label (:func:`group_positions`); default: label-id order.
        dtype: weight and bias dtype (e.g. ``torch.bfloat16``; compute stays fp32).
        autocast_logits: under autocast, return the logits in the autocast dtype instead of fp32.

    The protocol is :class:`~xmc_dst.sparse.FixedFanInLinear`'s (``indices``, ``rewire``, ``reset_optimizer_state``,
    ``in_features``, ``out_features``) with one index row per group, so :class:`callbacks.DynamicSparseTraining`
    drives it unchanged; the topology (``indices``, ``label_position``) is in buffers and checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, fan_in: int, group_size: int, bias: bool = True,
                 impl: GroupedImpl = "auto", generator: torch.Generator | None = None,
                 label_position: Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, autocast_logits: bool = False) -> None:
        super().__init__()
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be between 1 and in_features={in_features}, got {fan_in}")
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        if impl not in ("auto", *GROUPED_IMPLS):
            raise ValueError(f"impl must be one of auto, {', '.join(GROUPED_IMPLS)}; got {impl!r}")
        self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
        self.group_size, self.impl, self.autocast_logits = group_size, impl, autocast_logits
        self.num_groups = max(1, math.ceil(out_features / group_size))
        self.weight = nn.Parameter(torch.empty(self.num_groups, group_size, fan_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("indices", torch.empty(self.num_groups, fan_in, dtype=INDEX_DTYPE, device=device))
        position = group_positions(out_features, group_size) if label_position is None else label_position
        _check_positions(position, out_features, self.num_groups * group_size)
        self.register_buffer("label_position", position.to(device=device, dtype=INDEX_DTYPE))
        # slot -> label (-1: padding), derived from label_position; a buffer so that it follows .to() and memory counts
        self.register_buffer("_slot_labels", torch.empty(self.num_groups * group_size, dtype=INDEX_DTYPE,
                                                         device=device), persistent=False)
        self._slot_key: tuple | None = None
        self.register_buffer("topology_version", torch.zeros((), dtype=torch.int64, device=device))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A uniform random index row per group and fan-in-scaled weights; padding slots hold zero weights."""
        self.indices.copy_(random_indices(self.num_groups, self.in_features, self.fan_in, generator,
                                          self.indices.device))
        bound = 1.0 / math.sqrt(self.fan_in)
        self.weight.copy_(_uniform(self.weight.shape, bound, generator, self.weight))
        self.weight.mul_(self.slot_used().view(self.num_groups, self.group_size, 1).to(self.weight.dtype))
        if self.bias is not None:
            self.bias.copy_(_uniform(self.bias.shape, bound, generator, self.bias))
        self.topology_version.zero_()

    @torch.no_grad()
    def set_label_position(self, position: Tensor) -> None:
        """Regroup the labels (e.g. by clusters known only once the data is read); the groups' weights stay."""
        _check_positions(position, self.out_features, self.num_groups * self.group_size)
        self.label_position.copy_(position.to(self.label_position.device, INDEX_DTYPE))
        self.weight.mul_(self.slot_used().view(self.num_groups, self.group_size, 1).to(self.weight.dtype))

    def slot_used(self) -> Tensor:
        """Bool ``[num_groups * group_size]``: the slots that hold a label (the others are padding)."""
        used = torch.zeros(self.num_groups * self.group_size, dtype=torch.bool, device=self.label_position.device)
        return used.index_fill_(0, self.label_position.long(), True)

    def members(self) -> Tensor:
        """Label of every slot, int64 ``[num_groups, group_size]`` (-1 for padding)."""
        return self.slot_labels().long().view(self.num_groups, self.group_size)

    def slot_labels(self) -> Tensor:
        """Label of every slot, int32 ``[num_groups * group_size]`` (-1 for padding); cached until the grouping
        changes (``set_label_position``, ``load_state_dict``, ``.to``)."""
        position, slots = self.label_position, self._slot_labels
        key = (position.data_ptr(), position._version, slots.data_ptr(), slots._version)
        if self._slot_key != key:
            slots.fill_(-1).index_copy_(0, position.long(), torch.arange(self.out_features, dtype=INDEX_DTYPE,
                                                                          device=position.device))
            self._slot_key = (position.data_ptr(), position._version, slots.data_ptr(), slots._version)
        return slots

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
                f"group_size={self.group_size}, groups={self.num_groups}, bias={self.bias is not None}, "
                f"impl={self.impl}")

    def resolved_impl(self, device: torch.device | None = None) -> str:
        """The implementation ``forward`` uses on ``device`` (default: where the weights are)."""
        device = device or self.weight.device
        kernel = device.type == "cpu" and _grouped_kernels() is not None
        if self.impl == "kernel" and not kernel:
            raise RuntimeError("impl='kernel' needs a CPU tensor and a working C compiler; use impl='auto'")
        if self.impl != "auto":
            return self.impl
        return "kernel" if kernel else "torch"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        out_dtype = compute
        if self.autocast_logits and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        function = _GroupedKernel if self.resolved_impl(x.device) == "kernel" else _GroupedTorch
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = function.apply(x.to(compute).contiguous(), self.weight, self.bias, self.indices.contiguous(),
                               self.label_position, self.slot_labels())
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``[out, in]`` weight in label order (for tests and small layers only)."""
        rows = self.weight.detach().reshape(-1, self.fan_in)[self.label_position.long()]
        cols = self.indices.long().repeat_interleave(self.group_size, 0)[self.label_position.long()]
        dense = torch.zeros(self.out_features, self.in_features, dtype=rows.dtype, device=rows.device)
        return dense.scatter_(1, cols, rows)

    def slot_magnitude(self) -> Tensor:
        """fp32 ``[num_groups, fan_in]``: mean ``|w|`` of each slot over its group's labels (padding excluded)."""
        used = self.slot_used().view(self.num_groups, self.group_size).sum(1).clamp(min=1)
        return self.weight.detach().float().abs().sum(1).div_(used[:, None])

    @torch.no_grad()
    def rewire(self, mode: Literal["threshold", "fraction"], amount: float, generator: torch.Generator | None = None,
               init: Literal["zero", "uniform"] = "zero",
               candidates: RegrowthCandidates | None = None) -> RewireResult:
        """Prune weak slots per group by :meth:`slot_magnitude` and regrow as many (SET: random inputs; RigL: the
        best ``candidates`` by the group's summed gradient scores), as :meth:`FixedFanInLinear.rewire` per row.

        The result is per slot, ``[num_groups, fan_in]``: every weight of a slot (all ``G`` labels) moves with it
        and starts at ``init`` where it was regrown (zero at padding slots whatever ``init``).
        """
        if init not in ("zero", "uniform"):
            raise ValueError(f"init must be 'zero' or 'uniform', got {init!r}")
        prune = prune_mask(self.slot_magnitude(), mode, amount, max_per_row=self.in_features - self.fan_in)
        if candidates is None:
            sorted_idx, permutation = regrow(self.indices, prune, self.in_features, generator)
        else:
            chosen = candidates.best_unconnected(self.indices, prune.sum(1), members=self.members())
            sorted_idx, permutation = fill_pruned(self.indices, prune, chosen)
        regrown = prune.gather(1, permutation)
        moved = self.weight.gather(2, _slots(permutation, self.group_size))
        self.weight.copy_(moved.masked_fill_(regrown[:, None, :], 0.0))
        self.indices.copy_(sorted_idx.to(self.indices.dtype))
        if init == "uniform":
            fresh = _uniform(self.weight.shape, 1.0 / math.sqrt(self.fan_in), generator, self.weight)
            fresh.mul_(self.slot_used().view(self.num_groups, self.group_size, 1).to(fresh.dtype))
            self.weight.copy_(torch.where(regrown[:, None, :], fresh, self.weight))
        self.topology_version += 1
        return RewireResult(regrown=regrown, permutation=permutation)

    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer, result: RewireResult) -> int:
        """Move this layer's optimizer state with its slots and zero it at regrown ones."""
        return reset_grouped_optimizer_state(optimizer, self.weight, result)


def _slots(permutation: Tensor, group_size: int) -> Tensor:
    """``permutation`` [groups, fan_in] expanded over a group's labels, for a gather along the fan-in of a block."""
    return permutation[:, None, :].expand(-1, group_size, -1)


def reset_grouped_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, result: RewireResult) -> int:
    """After a grouped ``rewire``, make ``param``'s ``[groups, G, fan_in]`` optimizer state follow its slots: every
    state tensor shaped like it is permuted along the fan-in as the weights were and zeroed at regrown slots.
    Returns how many tensors were changed."""
    state = optimizer.state.get(param)
    if not state:
        return 0
    changed = 0
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            permutation = _slots(result.permutation.to(value.device), param.shape[1])
            value.copy_(value.gather(2, permutation).masked_fill_(result.regrown.to(value.device)[:, None, :], 0))
            changed += 1
    return changed
