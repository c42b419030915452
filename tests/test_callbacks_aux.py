"""AuxiliaryObjective and label clustering, against independent references.

References: the authors' ``CosineDecay(alpha, T, eta_min=0)`` is torch's ``CosineAnnealingLR``; clusters are
checked against planted groups; label embeddings against the unprojected TF-IDF sums they approximate.
"""

from __future__ import annotations

import csv
import functools
import gc
import weakref

import lightning as L
import numpy as np
import pytest
import torch
from conftest import GROUPS, LABELS_PER_GROUP, OUT, VOCAB, planted_batches
from torch import nn
from torch.utils.data import DataLoader

from callbacks import AuxiliaryModule, AuxiliaryObjective
from xmc_dst.optim import drop_parameters
from xmc_dst.sparse import FixedFanInLinear

HIDDEN = 16


def loader(batches) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


class ToyAux(L.LightningModule):
    """A non-XMC module with the auxiliary protocol: aux_head, aux_alpha, remove_aux_head, set_label_clusters."""

    def __init__(self, num_clusters: int = GROUPS) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(VOCAB, HIDDEN)
        self.head = FixedFanInLinear(HIDDEN, OUT, 4, generator=torch.Generator().manual_seed(0))
        self.aux_head: nn.Linear | None = nn.Linear(HIDDEN, num_clusters)
        self.register_buffer("label_clusters", torch.arange(OUT) % num_clusters)
        self.aux_alpha = 0.0
        self.aux_forwards = 0
        self.losses: list[tuple[float, float, float, float]] = []  # (alpha, main, aux, total)

    def set_label_clusters(self, clusters: torch.Tensor) -> None:
        self.label_clusters = clusters.long()

    def remove_aux_head(self) -> None:
        drop_parameters(self.trainer.optimizers, self.aux_head.parameters())
        self.aux_head = None

    def training_step(self, batch, batch_idx):
        h = torch.relu(self.body(batch["x"]))
        main = nn.functional.binary_cross_entropy_with_logits(self.head(h), batch["y"])
        if self.aux_head is None or self.aux_alpha <= 0:
            self.losses.append((self.aux_alpha, float(main), float("nan"), float(main)))
            return main
        self.aux_forwards += 1
        onehot = nn.functional.one_hot(self.label_clusters, self.aux_head.out_features).float()
        targets = (batch["y"] @ onehot > 0).float()
        aux = nn.functional.binary_cross_entropy_with_logits(self.aux_head(h), targets)
        loss = (1 - self.aux_alpha) * main + self.aux_alpha * aux
        self.losses.append((self.aux_alpha, float(main), float(aux), float(loss)))
        return {"loss": loss, "aux_loss": aux.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def fit(model, callbacks, batches, **kwargs) -> L.Trainer:
    options = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1)
    options.update(kwargs)
    trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, loader(batches))
    return trainer


def authors_alpha(alpha: float, total: int, steps: int) -> float:
    """CosineDecay(alpha, total, eta_min=0) after ``steps`` optimizer steps (0 from the cutoff on)."""
    if steps >= total:
        return 0.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=alpha)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("cutoff", [{"cutoff_step": 7}, {"cutoff_epoch": 1}])
def test_alpha_decays_to_zero_then_the_head_and_its_state_are_gone(cutoff):
    batches = planted_batches()  # 12 batches per epoch, 2 epochs
    model = ToyAux()
    assert isinstance(model, AuxiliaryModule)
    aux_params = [weakref.ref(p) for p in model.aux_head.parameters()]
    callback = AuxiliaryObjective(alpha=0.4, build_clusters=False, **cutoff)
    trainer = fit(model, [callback], batches, accumulate_grad_batches=2)  # 6 optimizer steps per epoch
    total = cutoff.get("cutoff_step") or 6 * cutoff["cutoff_epoch"]
    assert callback.total_steps == total
    # Two micro-batches per optimizer step share its alpha; the loss is (1 - alpha) * main + alpha * aux.
    for i, (alpha, main, aux, loss) in enumerate(model.losses):
        assert alpha == pytest.approx(authors_alpha(0.4, total, i // 2), abs=1e-12)
        if alpha > 0:
            assert loss == pytest.approx((1 - alpha) * main + alpha * aux, rel=1e-6)
    assert model.aux_forwards == 2 * total  # no auxiliary compute after the cutoff
    assert callback.removed_at_step == total and model.aux_head is None and model.aux_alpha == 0.0
    optimizer = trainer.optimizers[0]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())
    del optimizer, trainer
    gc.collect()
    assert all(ref() is None for ref in aux_params)  # parameters (and their Adam moments) were freed


def test_logs_alpha_and_aux_loss(tmp_path):
    model = ToyAux()
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="aux")
    fit(model, [AuxiliaryObjective(alpha=0.4, cutoff_step=10, build_clusters=False)], planted_batches(),
        logger=logger, log_every_n_steps=1)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    alphas = {int(r["step"]): float(r["aux/alpha"]) for r in rows if r.get("aux/alpha")}
    losses = {int(r["step"]): float(r["aux/loss"]) for r in rows if r.get("aux/loss")}
    # Logged at the step count before the batch, as Lightning labels training_step logs: step s used alpha(s).
    assert set(alphas) == set(range(24))
    for step, value in alphas.items():
        assert value == pytest.approx(authors_alpha(0.4, 10, step), abs=1e-6)
    assert set(losses) == set(range(10))  # no auxiliary loss after the cutoff
    for step, value in losses.items():
        assert value == pytest.approx(model.losses[step][2], rel=1e-5)


# ---------------------------------------------------------------------------------------------- clusters


def test_built_clusters_recover_planted_topics_and_are_cached(tmp_path):
    batches = planted_batches(num_docs=160)
    model = ToyAux()
    callback = AuxiliaryObjective(cutoff_step=3, cache_dir=str(tmp_path), embedding_dim=64)

    class Data(L.LightningDataModule):
        num_labels, num_train_docs = OUT, 160
        train_label_counts = torch.bincount(torch.cat([b["label_ids"] for b in batches]), minlength=OUT)

        def train_dataloader(self):
            return loader(batches)

    trainer = L.Trainer(callbacks=[callback], max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=Data())
    topic = torch.arange(OUT) // LABELS_PER_GROUP
    clusters = model.label_clusters
    assert torch.bincount(clusters).tolist() == [LABELS_PER_GROUP] * GROUPS
    for c in range(GROUPS):  # each cluster is exactly one topic
        assert topic[clusters == c].unique().numel() == 1
    cached = list(tmp_path.glob("label_clusters-4-*.npy"))
    assert len(cached) == 1 and callback.cluster_source == str(cached[0]) and callback.build_seconds is not None
    np.testing.assert_array_equal(np.load(cached[0]), clusters.numpy())

    again = AuxiliaryObjective(cutoff_step=3, cache_dir=str(tmp_path), embedding_dim=64)
    model2 = ToyAux()
    L.Trainer(callbacks=[again], max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model2, datamodule=Data())
    assert again.build_seconds is None and again.cluster_source == str(cached[0])
    assert torch.equal(model2.label_clusters, clusters)


# ---------------------------------------------------------------------------------------------- XMCModule


def test_drives_the_xmc_module_with_a_cluster_file(tmp_path):
    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.heads import FixedFanInHead
    from xmc_dst.model import XMCModule

    batches = planted_batches()
    file = tmp_path / "label_group0.npy"
    groups = np.empty(GROUPS, dtype=object)
    groups[:] = [np.arange(c * LABELS_PER_GROUP, (c + 1) * LABELS_PER_GROUP) for c in range(GROUPS)]
    np.save(file, groups, allow_pickle=True)
    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=16, hidden_dim=0),
                      num_labels=OUT, num_features=VOCAB, head=functools.partial(FixedFanInHead, fan_in=4, lr=0.05),
                      aux_cluster_file=str(file), warmup_steps=0, encoder_lr=0.01)
    callback = AuxiliaryObjective(alpha=0.4, cutoff_step=5)  # builds nothing: the module reads its own file
    trainer = fit(model, [callback], batches, max_steps=8)
    assert torch.equal(model.label_clusters, torch.arange(OUT) // LABELS_PER_GROUP)
    assert callback.cluster_source == str(file) and callback.build_seconds is None
    assert model.aux_head is None and callback.removed_at_step == 5
    names = [g.get("name") for g in trainer.optimizers[0].param_groups]
    aux_group = trainer.optimizers[0].param_groups[names.index("aux")]
    assert aux_group["params"] == []
