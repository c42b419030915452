"""Label heads: plain ``nn.Module`` components that turn features ``[batch, in]`` into label scores ``[batch, labels]``.

The model is given a head *factory*, as it is given an encoder factory (a class or ``functools.partial``; in yaml a
``class_path`` with ``init_args``), and calls it with ``(in_features, num_labels, generator)``: the width of the layer
below, the label count of the data and the generator of the model's seed. What else a head needs is its own
documented arguments, including its optimizer settings: every head carries them as ``optimizer_settings`` (a
:class:`HeadOptimizer`), which :meth:`xmc_dst.model.XMCModule.configure_optimizers` reads for the head's parameter
group. A new kind of head is a new class with these three leading arguments and that attribute; the model does not
change.

* :class:`FixedFanInHead`: the fixed fan-in sparse layer (:class:`xmc_dst.sparse.FixedFanInLinear`), which dynamic
  sparse training rewires;
* :class:`GroupedFanInHead`: groups of ``group_size`` labels sharing one fan-in index row
  (:class:`xmc_dst.grouped.GroupedFanInLinear`), rewired per group by the same callback;
* :class:`DenseHead`: ``nn.Linear`` with the authors' ``N(0, 0.02)`` initialisation, the dense baseline.

The head classes are the layers themselves (subclasses), so a checkpoint holds ``head.weight``, ``head.indices``, ...
exactly as the layer names them. The sparse heads can store their weights in bf16 (``weight_dtype``): the optimizer
then steps them in fp32 and rounds back stochastically (:mod:`xmc_dst.optim`), momentum or moments in
``state_dtype``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xmc_dst.clusters import load_cluster_file
from xmc_dst.grouped import GroupedFanInLinear, GroupedImpl, covering_group_size, group_positions
from xmc_dst.optim import ALGORITHMS, SCHEDULES, STATE_DTYPES, Algorithm, Schedule
from xmc_dst.sparse import FixedFanInLinear, Impl, sparse_input_linear

__all__ = ["DenseHead", "FixedFanInHead", "GroupedFanInHead", "HeadFactory", "HeadOptimizer", "InputTooNarrow",
           "LexicalHead"]

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

HeadFactory = Callable[[int, int, torch.Generator | None], nn.Module]


@dataclass(frozen=True)
class HeadOptimizer:
    """Optimizer settings of a head's parameter group (the arguments of the same names of every head class).

    Attributes:
        algorithm: ``adamw`` or ``sgd`` (with ``momentum``).
        lr, weight_decay: learning rate and weight decay.
        momentum: momentum with ``sgd``.
        warmup_steps, lr_schedule: the head's linear warmup (optimizer steps) and schedule after it (``cosine``,
            ``linear``, ``constant``); None: the model's ``warmup_steps`` / ``lr_schedule``.
        state_dtype, rounding_seed: for bf16 weights, the dtype of momentum / moments (``float32`` or
            ``bfloat16``) and the seed of the stochastic rounding (see :mod:`xmc_dst.optim`).
    """

    algorithm: Algorithm = "adamw"
    lr: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int | None = None
    lr_schedule: Schedule | None = None
    state_dtype: str = "float32"
    rounding_seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"head optimizer must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise ValueError(f"head lr_schedule must be one of {SCHEDULES} or null, got {self.lr_schedule!r}")
        if min(self.lr, self.weight_decay, self.momentum, self.warmup_steps or 0) < 0:
            raise ValueError("head lr, weight_decay, momentum and warmup_steps must be non-negative")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"head state_dtype must be one of {tuple(STATE_DTYPES)}, got {self.state_dtype!r}")


def weight_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a head's ``weight_dtype`` argument."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"head weight_dtype must be one of {tuple(WEIGHT_DTYPES)}, got {name!r}")
    return WEIGHT_DTYPES[name]


def _check_fan_in(fan_in: int, in_features: int) -> None:
    if fan_in < 1:
        raise ValueError(f"fan_in must be at least 1, got {fan_in}")
    if fan_in > in_features:
        raise InputTooNarrow("fan_in", fan_in, in_features)


class InputTooNarrow(ValueError):
    """A head needs wider inputs than the layer below gives (``argument=needed`` but ``available`` inputs)."""

    def __init__(self, argument: str, needed: int, available: int) -> None:
        super().__init__(f"{argument}={needed} is larger than the head's {available} inputs")
        self.argument, self.needed, self.available = argument, needed, available


class FixedFanInHead(FixedFanInLinear):
    """The fixed fan-in sparse head: every label reads ``fan_in`` of the inputs, rewired by dynamic sparse training.

    Args:
        in_features, num_labels, generator: given by the model (input width, labels, seeded random source of the
            initial topology and weights).
        fan_in: inputs per label, ``1 <= fan_in <= in_features``.
        impl: ``auto``, ``kernel``, ``csr``, ``embedding_bag`` or ``triton`` (see :mod:`xmc_dst.sparse`).
        weight_dtype: ``float32`` or ``bfloat16`` (trained with stochastic rounding).
        optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule, state_dtype, rounding_seed: its optimizer
            settings (:class:`HeadOptimizer`).
    """

    def __init__(self, in_features: int, num_labels: int, generator: torch.Generator | None = None, fan_in: int = 64,
                 impl: Impl = "auto", weight_dtype: str = "float32", optimizer: Algorithm = "adamw", lr: float = 1e-2,
                 weight_decay: float = 1e-4, momentum: float = 0.9, warmup_steps: int | None = None,
                 lr_schedule: Schedule | None = None, state_dtype: str = "float32", rounding_seed: int = 0) -> None:
        settings = HeadOptimizer(optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule, state_dtype,
                                 rounding_seed)
        dtype = weight_dtype_of(weight_dtype)
        _check_fan_in(fan_in, in_features)
        super().__init__(in_features, num_labels, fan_in, impl=impl, generator=generator)
        self.to(dtype)  # drawn in fp32 and rounded once: the same topology either way
        self.optimizer_settings = settings


class GroupedFanInHead(GroupedFanInLinear):
    """The group-shared fixed fan-in head: groups of ``group_size`` labels read the same ``fan_in`` inputs.

    Args:
        in_features, num_labels, generator: given by the model.
        fan_in: inputs per group, ``1 <= fan_in <= in_features``.
        group_size: labels per group (HASTE: 16 or 32; 1 is the per-label head's layout), lowered (with a warning)
            to the largest size whose groups can still reach every input (:func:`xmc_dst.grouped.covering_group_size`).
        cluster_file: a label -> cluster assignment (see :func:`xmc_dst.clusters.load_cluster_file`; label ids, not
            names) whose clusters become runs of groups (:func:`xmc_dst.grouped.group_positions`); None: label-id
            order until :class:`callbacks.LabelGrouping` groups the labels by clusters of the training data.
        impl: ``auto``, ``torch`` or ``kernel`` (see :mod:`xmc_dst.grouped`).
        weight_dtype: ``float32`` or ``bfloat16`` (trained with stochastic rounding).
        optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule, state_dtype, rounding_seed: its optimizer
            settings (:class:`HeadOptimizer`).
    """

    def __init__(self, in_features: int, num_labels: int, generator: torch.Generator | None = None, fan_in: int = 32,
                 group_size: int = 16, cluster_file: str | None = None, impl: GroupedImpl = "auto",
                 weight_dtype: str = "float32", optimizer: Algorithm = "adamw", lr: float = 1e-2,
                 weight_decay: float = 1e-4, momentum: float = 0.9, warmup_steps: int | None = None,
                 lr_schedule: Schedule | None = None, state_dtype: str = "float32", rounding_seed: int = 0) -> None:
        settings = HeadOptimizer(optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule, state_dtype,
                                 rounding_seed)
        dtype = weight_dtype_of(weight_dtype)
        _check_fan_in(fan_in, in_features)
        covering = covering_group_size(num_labels, fan_in, in_features, group_size)
        if covering < group_size:
            log.warning("GroupedFanInHead: group_size %d lowered to %d, so that its %d labels' groups of fan-in %d "
                        "can still reach all %d inputs (xmc_dst.grouped.covering_group_size)", group_size, covering,
                        num_labels, fan_in, in_features)
            group_size = covering
        assignment = load_cluster_file(cluster_file, num_labels) if cluster_file else None
        super().__init__(in_features, num_labels, fan_in, group_size, impl=impl, generator=generator,
                         label_position=group_positions(num_labels, group_size, assignment))
        self.to(dtype)
        self.optimizer_settings = settings


class LexicalHead(nn.Module):
    """Label scores read straight off the document's TF-IDF vector, added to the main head's.

    The main head sees the lexical features only through the encoder's projection and the intermediate layer, a
    bottleneck where a rare label's identifying word (a package name, a file name) blurs with the rest. This head
    is the sparse linear model the tree-based peers learn: every label reads the terms of its training documents (at
    most ``max_terms``, and at most ``max_connections`` in all: :func:`xmc_dst.lexical.label_term_support`, set by
    the model from the DataModule before training) with its own weights, started at its centroid, plus a bias (the
    label's prior, started at the squared hinge's negative target -1). A frequent label reads hundreds of terms, a
    rare one a few: a fixed fan-in would starve the first or pad the second. Its topology comes from the data, so
    dynamic sparse training leaves it alone (it is no fixed fan-in layer). The batch's TF-IDF rows stay sparse: the
    cost is the number of connections the batch's terms feed, not ``batch * num_labels``.

    **Negative evidence** (``negative_fraction`` > 0): a label's own documents never show the terms that argue
    *against* it (the words of the documents it is wrongly ranked high for). The head keeps
    ``round(negative_fraction * support)`` spare weight slots; while collecting (:meth:`collect_negatives`, driven by
    :class:`callbacks.LexicalNegatives`) a hook on its output reads the loss gradient of every training batch and
    records, per document, the ``per_document`` labels the loss pushes down hardest with the document's terms, scored
    ``tfidf * dL/ds`` (the gradient of the missing connection, summed over the epoch); :meth:`grow_negatives` then
    connects the best-scored unconnected (term, label) pairs to the spare slots at weight zero. Spare slots are never
    read before, so their weights and optimizer state are still zero: nothing in the optimizer moves.

    The support is stored term-major: ``term_ptr`` [num_features + 1] row pointers, ``labels`` (int32) the label of
    each connection, ``slot`` (int32, empty without spare slots) its index into ``weight``; checkpoints carry them
    (loading adopts the saved sizes).
    """

    def __init__(self, num_features: int, num_labels: int, max_terms: int, max_connections: int | None = None,
                 negative_fraction: float = 0.0) -> None:
        super().__init__()
        if max_terms < 1 or (max_connections is not None and max_connections < 1) or negative_fraction < 0:
            raise ValueError(f"lexical_terms and lexical_connections must be at least 1 and lexical_negatives at "
                             f"least 0, got {max_terms}, {max_connections}, {negative_fraction}")
        self.num_features, self.num_labels, self.max_terms = int(num_features), int(num_labels), int(max_terms)
        self.max_connections, self.negative_fraction = max_connections, float(negative_fraction)
        self.weight = nn.Parameter(torch.zeros(0))
        self.bias = nn.Parameter(torch.full((num_labels,), -1.0))
        self.register_buffer("term_ptr", torch.zeros(num_features + 1, dtype=torch.int64))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("slot", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.per_document = 0  # > 0 while collecting negative evidence
        self._pending: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def set_support(self, term_ptr: Tensor, labels: Tensor, values: Tensor) -> None:
        """Connect term ``t`` to ``labels[term_ptr[t]:term_ptr[t + 1]]`` with weights ``values`` (term-major)."""
        nnz = labels.numel()
        if term_ptr.shape != (self.num_features + 1,) or values.shape != (nnz,) or labels.dim() != 1:
            raise ValueError(f"expected term_ptr of shape ({self.num_features + 1},) and labels, values of one equal "
                             f"length, got {tuple(term_ptr.shape)}, {tuple(labels.shape)}, {tuple(values.shape)}")
        if int(term_ptr[0]) != 0 or int(term_ptr[-1]) != nnz or bool((term_ptr.diff() < 0).any()):
            raise ValueError(f"term_ptr must rise from 0 to the {nnz} connections")
        if nnz and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
            raise ValueError(f"labels must lie in [0, {self.num_labels})")
        device, spare = self.bias.device, round(self.negative_fraction * nnz)
        values = values.to(device=device, dtype=self.bias.dtype)
        self.weight = nn.Parameter(torch.cat([values, values.new_zeros(spare)]))
        self.term_ptr = term_ptr.to(device=device, dtype=torch.int64).clone()
        self.labels = labels.to(device=device, dtype=torch.int32).clone()
        self.slot = torch.arange(nnz if spare else 0, dtype=torch.int32, device=device)
        self.initialised.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Adopt the saved support's sizes (the fresh module's support is empty until set)."""
        for name in ("weight", "labels", "slot"):
            saved, own = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != own.shape:
                fresh = own.new_zeros(saved.shape)
                setattr(self, name, nn.Parameter(fresh) if name == "weight" else fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        offsets, ids = batch["lexical_offsets"], batch["lexical_ids"].long()
        values = batch["lexical_values"].to(self.weight.dtype)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_features):
            raise ValueError(f"lexical ids must lie in [0, {self.num_features}), got {int(ids.min())}.."
                             f"{int(ids.max())}")
        scores = sparse_input_linear(self.weight, self.bias, offsets, ids, values, self.term_ptr, self.labels,
                                     self.num_labels, self.slot if self.slot.numel() else None)
        if self.per_document and scores.requires_grad:
            scores.register_hook(lambda grad: self._record(grad, offsets, ids, values))
        return scores

    @property
    def spare_slots(self) -> int:
        """Weight slots no connection reads yet (room for negative evidence)."""
        return self.weight.numel() - self.labels.numel()

    def collect_negatives(self, per_document: int) -> None:
        """Record negative evidence from every backward until :meth:`grow_negatives` (see the class docstring); a
        head without spare slots records nothing."""
        if per_document < 1:
            raise ValueError(f"per_document must be at least 1, got {per_document}")
        self.per_document = int(per_document) if self.spare_slots else 0

    @torch.no_grad()
    def _record(self, grad: Tensor, offsets: Tensor, ids: Tensor, values: Tensor) -> None:
        push, label = grad.detach().float().topk(min(self.per_document, self.num_labels), dim=1)
        row = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=ids.device), offsets.diff().long())
        key = (ids[:, None] * self.num_labels + label.index_select(0, row)).reshape(-1)
        score = (values.float()[:, None] * push.index_select(0, row)).reshape(-1)
        keep = score > 0  # the loss pushes these scores down: a negative weight on the term would help
        self._pending.append((key[keep], score[keep]))
        if sum(k.numel() for k, _ in self._pending) > max(8 * self.spare_slots, 1 << 22):
            self._pending = [self._best_unconnected(keep=max(4 * self.spare_slots, 1 << 21))]

    def _connection_keys(self) -> Tensor:
        terms = torch.repeat_interleave(torch.arange(self.num_features, device=self.labels.device),
                                        self.term_ptr.diff())
        return terms * self.num_labels + self.labels.long()

    def _best_unconnected(self, keep: int) -> tuple[Tensor, Tensor]:
        """The recorded (term, label) keys summed, the connected ones dropped, the ``keep`` best (ties: lower key)."""
        keys, scores = self.pending_negatives()
        keys, inverse = torch.unique(keys, return_inverse=True)
        scores = scores.new_zeros(keys.numel()).index_add_(0, inverse, scores)
        fresh = ~torch.isin(keys, self._connection_keys())
        keys, scores = keys[fresh], scores[fresh]
        if keys.numel() > keep:
            best = torch.sort(scores, descending=True, stable=True).indices[:keep].sort().values
            keys, scores = keys[best], scores[best]
        return keys, scores

    def pending_negatives(self) -> tuple[Tensor, Tensor]:
        """The evidence recorded so far, concatenated in arrival order (for checkpoints: exact on resume)."""
        if not self._pending:
            return self.labels.new_zeros(0).long(), self.weight.new_zeros(0).float()
        return torch.cat([k for k, _ in self._pending]), torch.cat([v for _, v in self._pending])

    def restore_pending(self, keys: Tensor, scores: Tensor) -> None:
        """Continue from :meth:`pending_negatives` of a checkpoint."""
        self._pending = [(keys.to(self.labels.device), scores.to(self.labels.device))] if keys.numel() else []

    @torch.no_grad()
    def grow_negatives(self, gather: Callable[[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]] | None = None,
                       ) -> int:
        """Stop collecting and connect the best recorded unconnected pairs to spare slots at weight zero; returns how
        many. ``gather`` (data parallel) returns every rank's recorded evidence, so all ranks grow the same pairs."""
        self.per_document = 0
        if gather is not None:
            self._pending = [(k.to(self.labels.device), v.to(self.labels.device))
                             for k, v in gather(self.pending_negatives())]
        keys, _ = self._best_unconnected(keep=self.spare_slots)
        self._pending = []
        if not keys.numel():
            return 0
        used = self.labels.numel()
        keys = torch.cat([self._connection_keys(), keys])
        slots = torch.cat([self.slot.long(), torch.arange(used, keys.numel(), device=keys.device)])  # new: the spares
        order = torch.argsort(keys)
        keys, slots = keys[order], slots[order]
        terms = keys // self.num_labels
        self.term_ptr = torch.cat([terms.new_zeros(1), torch.bincount(terms, minlength=self.num_features).cumsum(0)])
        self.labels = (keys % self.num_labels).to(torch.int32)
        self.slot = slots.to(torch.int32)
        self.weight[used:self.labels.numel()] = 0.0
        return self.labels.numel() - used

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_labels={self.num_labels}, max_terms={self.max_terms}, "
                f"connections={self.labels.numel()}, spare_slots={self.spare_slots}")


class DenseHead(nn.Linear):
    """The dense baseline: ``nn.Linear`` with ``N(0, 0.02)`` weights and zero bias (the authors' initialisation).

    Args:
        in_features, num_labels, generator: given by the model (the generator draws the weights).
        optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule: its optimizer settings
            (:class:`HeadOptimizer`).
    """

    def __init__(self, in_features: int, num_labels: int, generator: torch.Generator | None = None,
                 optimizer: Algorithm = "adamw", lr: float = 1e-2, weight_decay: float = 1e-4, momentum: float = 0.9,
                 warmup_steps: int | None = None, lr_schedule: Schedule | None = None) -> None:
        settings = HeadOptimizer(optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule)
        super().__init__(in_features, num_labels)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02, generator=generator)
            self.bias.zero_()
        self.optimizer_settings = settings

    @torch.no_grad()
    def start_from(self, embeddings: Tensor, first: int = 0) -> None:
        """Start labels ``first ..`` at their rows of ``embeddings`` ``[n, in_features]``, rescaled to the norm of
        their present weights (the sparse head's :meth:`~xmc_dst.sparse.FixedFanInLinear.start_from` without the
        choice of inputs); an all-zero row keeps its start."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.in_features:
            raise ValueError(f"embeddings must be [n, {self.in_features}], got {list(embeddings.shape)}")
        rows = slice(first, first + embeddings.shape[0])
        values = embeddings.float().to(self.weight.device)
        norms = values.norm(dim=1, keepdim=True)
        scaled = values * self.weight[rows].norm(dim=1, keepdim=True) / norms.clamp_min(1e-12)
        self.weight[rows] = torch.where(norms > 0, scaled, self.weight[rows])
