"""Turn a CUDA out-of-memory error into advice: which part of training holds the memory, and which knob to turn.

PyTorch's message says how much it tried to allocate; the user needs to know whether the label head, the encoder's
activations or the optimizer states fill the card, since each has its own remedy. On an OOM the callback counts the
static bytes per top-level submodule (parameters, gradients, optimizer states: :func:`xmc_dst.memory.static_breakdown`),
estimates the activations as the peak allocation minus that, names the largest part with its knob, and re-raises as
:class:`OutOfMemoryAdvice` (a ``torch.OutOfMemoryError``, so existing handlers still catch it).
"""

from __future__ import annotations

import lightning as L
import torch

from xmc_dst.memory import GIB, static_breakdown

__all__ = ["OutOfMemoryAdvice", "OutOfMemoryAdvisor"]

KNOBS = {
    "head": "a sparse head (model.head: xmc_dst.heads.FixedFanInHead) or a lower fan_in; AdamW keeps two states per "
            "weight, SGD with momentum one",
    "encoder": "freeze encoder layers (trainable_layers), gradient_checkpointing: true, or a smaller encoder",
    "intermediate": "a lower intermediate_dim",
    "aux_head": "fewer aux_clusters or an earlier auxiliary cutoff",
    "activations": "a smaller batch_size or max_length, precision bf16-mixed or 16-mixed, gradient_checkpointing: true",
}


class OutOfMemoryAdvice(torch.OutOfMemoryError):
    """An out-of-memory error with the memory breakdown and the knob to turn."""


class OutOfMemoryAdvisor(L.Callback):
    """Re-raise out-of-memory errors during training with the breakdown and advice (see the module docstring)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError) or isinstance(exception, OutOfMemoryAdvice):
            return
        raise OutOfMemoryAdvice(advice(pl_module, trainer.optimizers, str(exception))) from exception


def advice(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], original: str = "") -> str:
    """The explanation: static bytes per part, estimated activations, and the knob of the largest part."""
    parts = static_breakdown(module, optimizers)
    sizes = {name: part.static for name, part in parts.items() if part.static}
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    lines = [f"  {name}: {part.static / GIB:.2f} GiB (params {part.params / GIB:.2f}, grads {part.grads / GIB:.2f}, "
             f"optimizer {part.optimizer / GIB:.2f})" for name, part in parts.items() if part.static]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        sizes["activations"] = max(0, peak - sum(p.static for p in parts.values()))
        total = torch.cuda.get_device_properties(device).total_memory
        lines.append(f"  activations (peak {peak / GIB:.2f} GiB minus static): {sizes['activations'] / GIB:.2f} GiB; "
                     f"device {total / GIB:.1f} GiB")
    largest = max(sizes, key=sizes.get) if sizes else "activations"
    knob = KNOBS.get(largest, KNOBS["activations"])
    return ("out of memory during training. Memory by part:\n" + "\n".join(lines) +
            f"\nThe largest part is {largest}: try {knob}. Check a configuration before running with "
            f"`xmc-dst estimate-memory --config <yaml> --budget-gib <GiB>`.\nOriginal error: {original.strip()}")
