"""Training memory as the model's tensors hold it: bytes per part, and the process's resident set (torch only).

The static part of training memory is exact arithmetic over live tensors: parameters, their gradients, the
optimizers' per-element state and buffers such as the sparse head's int32 indices (:func:`static_breakdown`, which
:class:`callbacks.MemoryProfiler` logs and :class:`callbacks.OutOfMemoryAdvisor` reports); the peak is the
process's (``/proc`` probes, :func:`peak_rss_bytes`) or CUDA's. :mod:`xmc_dst.estimate` predicts the same from a
config before training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["GIB", "MIB", "PartBytes", "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "static_breakdown"]

MIB = 1 << 20
GIB = 1 << 30


@dataclass
class PartBytes:
    """Bytes held for one part of the model."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    buffers: int = 0
    activations: int = 0

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def total(self) -> int:
        return self.static + self.activations



def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def static_breakdown(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, PartBytes]:
    """Bytes per top-level submodule (``other`` for tensors owned by the module itself).

    ``grads`` counts one gradient per trainable parameter (what exists between backward and the optimizer step,
    whether or not ``.grad`` is set right now); ``optimizer`` the tensors of every optimizer's state of the part's
    parameters. Parameters shared by two parts are counted in the first.
    """
    optimizers = list(optimizers)
    parts: dict[str, PartBytes] = {}
    seen: set[int] = set()

    def owner_of(name: str) -> str:
        head, _, rest = name.partition(".")
        return head if rest else "other"

    for name, param in module.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        part = parts.setdefault(owner_of(name), PartBytes())
        part.params += _tensor_bytes(param)
        if param.requires_grad:
            part.grads += _tensor_bytes(param)
        for optimizer in optimizers:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor):
                    part.optimizer += _tensor_bytes(value)
    for name, buffer in module.named_buffers():
        if buffer is not None and id(buffer) not in seen:
            seen.add(id(buffer))
            parts.setdefault(owner_of(name), PartBytes()).buffers += _tensor_bytes(buffer)
    return {name: part for name, part in parts.items() if part.static > 0}


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size (``VmHWM``), None where ``/proc`` is absent."""
    return _proc_status("VmHWM")


def rss_bytes() -> int | None:
    """The process's current resident set size (``VmRSS``)."""
    return _proc_status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return None
