"""Two CPU processes (gloo, ``ddp_spawn``): every rank ends each DST update with the same topology and weights.

Each rank sees different batches (DistributedSampler) and starts from a different global random state, so equal
results come only from the callback's shared random stream (random regrowth) or from gathering every rank's
activations (gradient regrowth). The auxiliary head is removed mid-training under plain ``ddp`` settings (no
``find_unused_parameters``), which only works if the model is re-wrapped. Each rank writes what it holds after every
update; the test compares the files.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import AuxiliaryObjective, DynamicSparseTraining
from xmc_dst.optim import drop_parameters
from xmc_dst.sparse import FixedFanInLinear

IN, HIDDEN, OUT, CLUSTERS = 10, 24, 40, 4


class DDPToy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Linear(IN, HIDDEN)
        with torch.no_grad():
            for p in self.body.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.head = FixedFanInLinear(HIDDEN, OUT, 5, generator=g)
        self.aux_head: nn.Linear | None = nn.Linear(HIDDEN, CLUSTERS)
        self.register_buffer("label_clusters", torch.arange(OUT) % CLUSTERS)
        self.aux_alpha = 0.0

    def remove_aux_head(self) -> None:
        drop_parameters(self.trainer.optimizers, self.aux_head.parameters())
        self.aux_head = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.body(x))
        loss = nn.functional.binary_cross_entropy_with_logits(self.head(h), y)
        if self.aux_head is not None and self.aux_alpha > 0:
            targets = (y @ nn.functional.one_hot(self.label_clusters, CLUSTERS).float() > 0).float()
            aux = nn.functional.binary_cross_entropy_with_logits(self.aux_head(h), targets)
            loss = (1 - self.aux_alpha) * loss + self.aux_alpha * aux
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class RankSeed(L.Callback):
    """Different global random state on every rank (before DST draws its seed)."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


class Record(L.Callback):
    """After every DST update, keep this rank's indices and weights; save them at the end of fit."""

    def __init__(self, dst: DynamicSparseTraining, directory: str) -> None:
        self.dst, self.directory, self.snapshots = dst, directory, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.dst.last_update_step == trainer.global_step:
            self.snapshots.append((trainer.global_step, pl_module.head.indices.clone(),
                                   pl_module.head.weight.detach().clone()))

    def on_fit_end(self, trainer, pl_module):
        torch.save({"snapshots": self.snapshots, "aux_head": pl_module.aux_head is None,
                    "history": self.dst.history}, f"{self.directory}/rank{trainer.global_rank}.pt")


def run(tmp_path, regrow: str) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, IN, generator=g)
    y = (torch.rand(128, OUT, generator=g) < 0.15).float()
    dst = DynamicSparseTraining(interval=2, end=1.0, threshold=0.3, regrow=regrow, seed=None,
                                verify_sync=False)  # the test compares the ranks itself
    callbacks = [RankSeed(), dst, AuxiliaryObjective(alpha=0.4, cutoff_step=3, build_clusters=False),
                 Record(dst, str(tmp_path))]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(DDPToy(), DataLoader(TensorDataset(x, y), batch_size=8))  # 8 batches per rank and epoch
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_ranks_hold_identical_topology_and_weights_after_every_update(tmp_path, regrow):
    rank0, rank1 = run(tmp_path, regrow)
    steps = [s for s, _, _ in rank0["snapshots"]]
    assert steps == [2, 4, 6, 8, 10, 12, 14] == [s for s, _, _ in rank1["snapshots"]]
    initial = FixedFanInLinear(HIDDEN, OUT, 5, generator=torch.Generator().manual_seed(0)).indices
    changed = False
    for (_, idx0, w0), (_, idx1, w1) in zip(rank0["snapshots"], rank1["snapshots"], strict=True):
        assert torch.equal(idx0, idx1) and torch.equal(w0, w1)
        changed |= not torch.equal(idx0, initial)
    assert changed
    assert [h["dst/regrown_fraction"] for h in rank0["history"]] == [h["dst/regrown_fraction"]
                                                                    for h in rank1["history"]]
    assert rank0["aux_head"] and rank1["aux_head"]  # removed on both ranks, and training went on afterwards
