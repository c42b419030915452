"""LexicalNegatives: a lexical head trained by Lightning grows, at the end of the chosen epoch, exactly the negative
evidence a brute-force oracle picks from that epoch's output gradients; its recorded evidence survives a checkpoint."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader

from callbacks import LexicalNegatives
from tests.test_heads import _lexical_batch, _negative_oracle, _random_support
from xmc_dst.heads import LexicalHead

FEATURES, LABELS, DOCS, BATCH = 40, 12, 48, 8


class LexicalOnly(L.LightningModule):
    """A lexical head alone, squared loss towards random targets; records epoch 1's batches and output gradients."""

    def __init__(self, batches: list[dict], targets: list[torch.Tensor], support: tuple) -> None:
        super().__init__()
        self.head = LexicalHead(FEATURES, LABELS, max_terms=5, negative_fraction=0.5)
        self.head.set_support(*support)
        self.batches, self.targets = batches, targets
        self.seen: list[tuple[dict, torch.Tensor]] = []

    def training_step(self, index, batch_idx):
        batch, target = self.batches[int(index)], self.targets[int(index)]
        scores = self.head(batch)
        if self.current_epoch == 1:
            scores.register_hook(lambda grad: self.seen.append((batch, grad.clone())))
        return ((scores - target) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Probe(L.Callback):
    def __init__(self, callback: LexicalNegatives) -> None:
        self.callback, self.sizes, self.state = callback, [], None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sizes.append(pl_module.head.labels.numel())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            self.state = copy.deepcopy(self.callback.state_dict())


def test_lexical_negatives_grow_what_the_oracle_picks_and_survive_a_checkpoint():
    g = torch.Generator().manual_seed(5)
    support = _random_support(FEATURES, LABELS, g)
    batches = [_lexical_batch(FEATURES, BATCH, g) for _ in range(DOCS // BATCH)]
    targets = [torch.randn(BATCH, LABELS, generator=g) for _ in batches]
    module = LexicalOnly(batches, targets, support[:3])
    callback = LexicalNegatives(epoch=1, per_document=3)
    probe = Probe(callback)
    trainer = L.Trainer(max_epochs=3, callbacks=[callback, probe], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader(list(range(len(batches))), batch_size=None, shuffle=False))

    before = support[1].numel()
    grown = callback.grown["head"]
    assert probe.sizes == [before, before, before + grown] and 0 < grown <= round(0.5 * before)
    expected = _negative_oracle([b for b, _ in module.seen], [gr for _, gr in module.seen], 3, support[3] != 0,
                                round(0.5 * before))
    assert grown == len(expected) and len(module.seen) == len(batches)
    terms = torch.repeat_interleave(torch.arange(FEATURES), module.head.term_ptr.diff())
    pairs = set(zip(terms.tolist(), module.head.labels.tolist(), strict=True))
    old = {(int(t), int(label)) for label, t in zip(*torch.nonzero(support[3] != 0, as_tuple=True), strict=True)}
    assert pairs == old | expected

    # the state saved mid-epoch 1 carries what the head had recorded; a resumed run's head continues from it
    keys, scores = probe.state["pending"]["head"]
    assert keys.numel() > 0 and "head" not in callback.state_dict()["pending"]  # nothing pending after growth
    fresh = LexicalOnly(batches, targets, support[:3])
    resumed = LexicalNegatives(epoch=1, per_document=3)
    resumed.load_state_dict(probe.state)
    resumed.on_train_start(SimpleNamespace(max_epochs=3, current_epoch=1), fresh)
    restored = fresh.head.pending_negatives()
    assert torch.equal(restored[0], keys) and torch.equal(restored[1], scores)
