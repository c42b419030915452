"""TrainingBudget: epochs from the training set's size, counted against a trainer run to the end."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import TrainingBudget
from callbacks.budget import budget_epochs


class StepCounter(L.LightningModule):
    """A linear model whose schedule, as XMCModule's, is sized by ``estimated_stepping_batches``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.steps = 0
        self.planned: float | None = None

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        self.planned = self.trainer.estimated_stepping_batches
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(documents: int, batch_size: int, budget: TrainingBudget, **trainer_kwargs) -> tuple[L.Trainer, StepCounter]:
    data = TensorDataset(torch.randn(documents, 3), torch.randn(documents, 1))
    module = StepCounter()
    trainer = L.Trainer(callbacks=[budget], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, **{"max_epochs": -1,
                                                                                     **trainer_kwargs})
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return trainer, module


@pytest.mark.parametrize("documents, batch_size, accumulate", [(100, 10, 1), (1000, 10, 1), (95, 10, 3), (7, 10, 1)])
def test_epochs_follow_the_data_size_and_the_schedule_sees_them(documents, batch_size, accumulate):
    budget = TrainingBudget(steps=60, min_epochs=2, max_epochs=9)
    trainer, module = fit(documents, batch_size, budget, accumulate_grad_batches=accumulate)
    steps_per_epoch = math.ceil(math.ceil(documents / batch_size) / accumulate)
    expected = min(9, max(2, round(60 / steps_per_epoch)))  # the documented rule, written out
    assert budget.epochs == expected and trainer.current_epoch == expected
    assert module.planned == expected * steps_per_epoch == trainer.global_step
    assert module.steps == expected * math.ceil(documents / batch_size)


def test_an_explicit_max_epochs_is_kept():
    budget = TrainingBudget(steps=1000, min_epochs=5, max_epochs=30)
    trainer, module = fit(40, 10, budget, max_epochs=2)
    assert budget.epochs is None and trainer.current_epoch == 2 and module.planned == 8


def test_budget_arguments_and_rounding():
    assert budget_epochs(8000, 490, 5, 30) == 16 and budget_epochs(8000, 341, 5, 30) == 23
    assert budget_epochs(100, 490, 5, 30) == 5 and budget_epochs(10**6, 10, 5, 30) == 30
    with pytest.raises(ValueError, match="min_epochs"):
        TrainingBudget(steps=10, min_epochs=4, max_epochs=3)
