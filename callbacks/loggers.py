"""Metrics a callback sends straight to the trainer's loggers, on rank 0, at a step of its choosing.

``LightningModule.log`` ties a value to the current batch and to ``log_every_n_steps``; the callbacks' values are
sparse events (a DST update, an auxiliary-weight change, the memory report at the end of fit) that it could skip
or repeat, so they go to the loggers directly.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["log_to_loggers"]


@rank_zero_only
def log_to_loggers(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """``metrics`` to every logger of ``trainer`` at ``step`` (rank 0 only)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
