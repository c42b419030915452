"""Stop (or skip) a training step whose loss or gradients are not finite, instead of training on garbage.

One NaN in a gradient reaches every weight through Adam's moments within a step, and the run then continues for
hours producing nothing. The guard looks at the gradients after backward and before the optimizer step (the last
moment the update can still be refused) and at the loss after the step.

* ``action="stop"`` raises :class:`NonFiniteLossError` naming the global step, the epoch, the batch and the likely
  causes (learning rate, fp16 overflow, bad input).
* ``action="skip"`` sets the gradients to ``None`` so that the optimizer leaves every parameter and its state alone
  for that step (torch optimizers skip parameters without a gradient; zeroing them would still move Adam's weights
  through the decayed momentum), logs ``guard/skipped_steps`` and stops after ``max_consecutive`` bad steps in a row.

Under ``16-mixed`` precision non-finite gradients are expected now and then: the gradient scaler skips those steps
and lowers its scale by itself, so the guard only counts them and stops after ``max_consecutive`` in a row.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Refuse optimizer steps with non-finite gradients or loss (see the module docstring).

    Args:
        action: ``stop`` (raise at the first bad step) or ``skip`` (drop the step and carry on).
        max_consecutive: bad steps in a row after which even ``skip`` (and fp16 loss scaling) stops the run.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive: int = 20) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def _message(self, trainer: L.Trainer, what: str, batch_idx: int | None = None) -> str:
        lrs = sorted({f"{group['lr']:.3g}" for opt in trainer.optimizers for group in opt.param_groups
                      if "lr" in group})
        where = f"global step {trainer.global_step}, epoch {trainer.current_epoch}"
        if batch_idx is not None:
            where += f", batch {batch_idx}"
        return (f"{what} at {where}. Likely causes: a learning rate too high (current: {', '.join(lrs) or '?'}); "
                f"fp16 overflow (precision {trainer.precision}: try bf16-mixed or gradient clipping); NaN or inf in "
                "the input batch. To drop such steps and carry on, use FiniteLossGuard(action='skip').")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(self._message(trainer, f"gradients not finite for {self.consecutive} steps "
                                                             "in a row"))
        if str(trainer.precision).startswith("16"):
            return  # the gradient scaler skips this step and lowers its scale
        if self.action == "stop":
            raise NonFiniteLossError(self._message(trainer, "gradients became NaN or infinite"))
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        pl_module.log("guard/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.action == "stop" and isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError(self._message(trainer, f"the loss became {float(loss)}", batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
