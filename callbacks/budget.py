"""A training budget that scales with the data: the number of epochs chosen from the size of the training set.

One recipe for every dataset cannot fix its epoch count: 20 epochs of a 5K-document set are a few hundred optimizer
steps, of a 500K-document set a day of CPU time. :class:`TrainingBudget` fixes the number of optimizer steps
instead (what the learning-rate schedules and the rewiring period are measured in) and turns it into whole epochs
once the training loader exists, before the optimizers and their schedules are built:

    epochs = clamp(round(steps / steps_per_epoch), min_epochs, max_epochs)

so that small sets still see every document ``min_epochs`` times and large ones stop after ``max_epochs`` passes.
It acts only when the trainer's ``max_epochs`` is ``-1`` (the configs' "chosen from the data"): an explicit
``--trainer.max_epochs N`` keeps its ``N``.
"""

from __future__ import annotations

import logging
import math

import lightning as L

log = logging.getLogger(__name__)

__all__ = ["TrainingBudget", "budget_epochs"]


def budget_epochs(steps: int, steps_per_epoch: int, min_epochs: int, max_epochs: int) -> int:
    """``clamp(round(steps / steps_per_epoch), min_epochs, max_epochs)``; at least one epoch."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return max(1, min(max_epochs, max(min_epochs, round(steps / steps_per_epoch))))


class TrainingBudget(L.Callback):
    """Set ``max_epochs`` from the training set's size (see the module docstring).

    Args:
        steps: optimizer steps the budget aims at.
        min_epochs: fewest epochs (small data).
        max_epochs: most epochs (large data).
    """

    def __init__(self, steps: int = 8000, min_epochs: int = 5, max_epochs: int = 30) -> None:
        if steps < 1 or min_epochs < 1 or max_epochs < min_epochs:
            raise ValueError(f"TrainingBudget needs steps >= 1 and 1 <= min_epochs <= max_epochs; got steps={steps}, "
                             f"min_epochs={min_epochs}, max_epochs={max_epochs}")
        self.steps, self.min_epochs, self.max_epochs = int(steps), int(min_epochs), int(max_epochs)
        self.epochs: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fit_loop.max_epochs != -1:
            return
        batches = self._training_batches(trainer)
        steps_per_epoch = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
        self.epochs = budget_epochs(self.steps, steps_per_epoch, self.min_epochs, self.max_epochs)
        trainer.fit_loop.max_epochs = self.epochs
        log.info("TrainingBudget: %d optimizer steps an epoch, %d epochs (%d steps; budget %d, %d-%d epochs)",
                 steps_per_epoch, self.epochs, self.epochs * steps_per_epoch, self.steps, self.min_epochs,
                 self.max_epochs)

    @staticmethod
    def _training_batches(trainer: L.Trainer) -> int:
        """Batches per epoch of this process, as Lightning counts them (distributed sampler, limit_train_batches):
        the training loader is built now, as ``trainer.estimated_stepping_batches`` would build it."""
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("TrainingBudget needs a training loader with a length; set trainer.max_epochs instead")
        return int(batches)
