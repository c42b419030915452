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
* :class:`DenseHead`: ``nn.Linear`` with the authors' ``N(0, 0.02)`` initialisation, the dense baseline.

The head classes are the layers themselves (subclasses), so a checkpoint holds ``head.weight``, ``head.indices``, ...
exactly as the layer names them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xmc_dst.optim import ALGORITHMS, SCHEDULES, Algorithm, Schedule
from xmc_dst.sparse import FixedFanInLinear, Impl

__all__ = ["DenseHead", "FixedFanInHead", "HeadFactory", "HeadOptimizer", "InputTooNarrow", "LexicalHead"]

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
    """

    algorithm: Algorithm = "adamw"
    lr: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int | None = None
    lr_schedule: Schedule | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"head optimizer must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise ValueError(f"head lr_schedule must be one of {SCHEDULES} or null, got {self.lr_schedule!r}")
        if min(self.lr, self.weight_decay, self.momentum, self.warmup_steps or 0) < 0:
            raise ValueError("head lr, weight_decay, momentum and warmup_steps must be non-negative")


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
        optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule: its optimizer settings
            (:class:`HeadOptimizer`).
    """

    def __init__(self, in_features: int, num_labels: int, generator: torch.Generator | None = None, fan_in: int = 64,
                 impl: Impl = "auto", optimizer: Algorithm = "adamw", lr: float = 1e-2, weight_decay: float = 1e-4,
                 momentum: float = 0.9, warmup_steps: int | None = None, lr_schedule: Schedule | None = None) -> None:
        settings = HeadOptimizer(optimizer, lr, weight_decay, momentum, warmup_steps, lr_schedule)
        if fan_in < 1:
            raise ValueError(f"fan_in must be at least 1, got {fan_in}")
        if fan_in > in_features:
            raise InputTooNarrow("fan_in", fan_in, in_features)
        super().__init__(in_features, num_labels, fan_in, impl=impl, generator=generator)
        self.optimizer_settings = settings


class LexicalHead(nn.Module):
    """Label scores read straight off the document's TF-IDF vector, added to the main head's.

    The main head sees the lexical features only through the encoder's projection and the intermediate layer, a
    bottleneck where a rare label's identifying word (a package name, a file name) blurs with the rest. This head
    is the sparse linear model the tree-based peers learn: every label reads ``fan_in`` of the lexical features with
    its own weights, a fixed fan-in layer whose connections start at the label's strongest terms over its training
    documents (:func:`xmc_dst.lexical.label_term_profiles`, set by the model from the DataModule before training)
    with those centroid values as weights. Its topology comes from the data, so dynamic sparse training leaves it
    alone (``static_topology``). The batch's TF-IDF rows are densified, ``[batch, num_features]`` floats, for the
    gather (the layer's cost is ``batch * num_labels * fan_in`` whatever the width).
    """

    def __init__(self, num_features: int, num_labels: int, fan_in: int, generator: torch.Generator | None = None,
                 impl: Impl = "auto") -> None:
        super().__init__()
        if not 1 <= fan_in <= num_features:
            raise ValueError(f"lexical_fan_in must be between 1 and the {num_features} lexical features, got {fan_in}")
        self.layer = FixedFanInLinear(num_features, num_labels, fan_in, bias=False, impl=impl, generator=generator)
        self.layer.static_topology = True
        nn.init.zeros_(self.layer.weight)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set_profiles(self, indices: Tensor, values: Tensor) -> None:
        """Start every label at ``indices`` [num_labels, fan_in] (sorted, distinct per row) with weights ``values``."""
        layer = self.layer
        if indices.shape != layer.indices.shape or values.shape != layer.weight.shape:
            raise ValueError(f"expected profiles of shape {tuple(layer.indices.shape)}, got {tuple(indices.shape)} "
                             f"and {tuple(values.shape)}")
        layer.indices.copy_(indices.to(layer.indices.dtype))
        layer.weight.copy_(values.to(layer.weight.dtype))
        layer.topology_version += 1
        self.initialised.fill_(True)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        offsets = batch["lexical_offsets"].long()
        rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())
        dense = torch.zeros(offsets.numel() - 1, self.layer.in_features, device=self.layer.weight.device)
        dense[rows, batch["lexical_ids"].long()] = batch["lexical_values"].float()
        return self.layer(dense)


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
