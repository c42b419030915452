"""FiniteLossGuard: a NaN batch stops the run with a clear message, or its step is skipped with no update."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import FiniteLossGuard, NonFiniteLossError
from xmc_dst.sparse import FixedFanInLinear

BAD_BATCH = 3


class Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.head = FixedFanInLinear(16, 30, 4, generator=torch.Generator().manual_seed(0))
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state = self.trainer.optimizers[0].state.get(self.head.weight, {})
        snapshot.update({f"adam.{k}": v.clone() for k, v in state.items() if torch.is_tensor(v)})
        self.snapshots.append(snapshot)
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self.head(torch.relu(self.body(x))), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6 * 4, 8, generator=g)
    x[BAD_BATCH * 4 + 1, 2] = float("nan")  # one poisoned document in batch 3
    y = (torch.rand(6 * 4, 30, generator=g) < 0.1).float()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def trainer(guard: FiniteLossGuard) -> L.Trainer:
    return L.Trainer(max_epochs=1, callbacks=[guard], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")


def test_stop_names_the_step_and_the_causes() -> None:
    model = Toy()
    with pytest.raises(NonFiniteLossError, match=rf"global step {BAD_BATCH}, epoch 0.*learning rate.*fp16"):
        trainer(FiniteLossGuard()).fit(model, loader())
    # the bad update was refused: the weights after the failure are those before the bad batch
    assert torch.isfinite(model.head.weight).all() and torch.isfinite(model.body.weight).all()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, model.snapshots[BAD_BATCH][key], rtol=0, atol=0)


def test_skip_leaves_weights_and_optimizer_untouched_and_carries_on() -> None:
    model = Toy()
    guard = FiniteLossGuard(action="skip")
    fit = trainer(guard)
    fit.fit(model, loader())
    assert guard.skipped == 1 and fit.global_step == 6
    before, after = model.snapshots[BAD_BATCH], model.snapshots[BAD_BATCH + 1]
    assert {"adam.exp_avg", "adam.exp_avg_sq", "adam.step"} <= set(before)
    for key in before:  # the skipped step changed nothing: weights, topology, Adam moments and step count
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    # the other steps did train, and everything stays finite
    assert not torch.equal(model.snapshots[1]["head.weight"], model.snapshots[0]["head.weight"])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert guard.state_dict() == {"skipped": 1, "consecutive": 0}


def test_too_many_bad_steps_in_a_row_stop_even_when_skipping() -> None:
    x = torch.full((16, 8), float("nan"))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16, 30)), batch_size=4)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer(FiniteLossGuard(action="skip", max_consecutive=2)).fit(Toy(), data)


def test_bad_action() -> None:
    with pytest.raises(ValueError, match="action"):
        FiniteLossGuard(action="ignore")
