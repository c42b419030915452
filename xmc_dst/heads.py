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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from xmc_dst.optim import ALGORITHMS, SCHEDULES, Algorithm, Schedule
from xmc_dst.sparse import FixedFanInLinear, Impl

__all__ = ["DenseHead", "FixedFanInHead", "HeadFactory", "HeadOptimizer", "InputTooNarrow"]

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
