"""Two CPU processes (gloo): every rank ends each DST update with the same topology and weights (``ddp_spawn``), and
validation metrics reduced over two ranks equal a single-process evaluation of the same documents (``ddp_fork``).

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


# ---------------------------------------------------------------------------------------------- metrics under DDP
#
# XMCModule's XMCMetrics hold float64 sums with dist_reduce_fx="sum": each rank scores its share of the validation
# documents and compute() adds the sums of both ranks, so P@k/nDCG@k (ratios of sums over documents) and PSP@k (a
# ratio of two sums) are those of the whole set. One caveat comes from the sampler, not the metric: Lightning feeds
# validation through DistributedSampler, which pads the set to a multiple of the world size by repeating its first
# documents, so with N % world_size != 0 the duplicated documents count twice. The tests show both cases.

FEATURES, LABELS, KS = 30, 25, (1, 3, 5)


def bow_documents(num_docs: int, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random BoW documents (feature ids, values, distinct label ids); some without any label."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        features = torch.randperm(FEATURES, generator=g)[: int(torch.randint(1, 6, (1,), generator=g))]
        labels = torch.randperm(LABELS, generator=g)[: int(torch.randint(0, 4, (1,), generator=g))]
        docs.append((features, torch.rand(features.numel(), generator=g) + 0.1, labels))
    return docs


class BowDocs(torch.utils.data.Dataset):
    def __init__(self, docs) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int):
        return index, self.docs[index]


def collate_bow(items) -> dict[str, torch.Tensor]:
    """CSR batch as the BoW DataModule makes it: feature_*, label_* and doc_index."""
    def offsets(parts):
        return torch.tensor([0] + [p.numel() for p in parts]).cumsum(0)

    index = [i for i, _ in items]
    features, values, labels = zip(*(doc for _, doc in items), strict=True)
    return {"feature_ids": torch.cat(features), "feature_values": torch.cat(values),
            "feature_offsets": offsets(features), "label_ids": torch.cat(labels).long(),
            "label_offsets": offsets(labels), "doc_index": torch.tensor(index)}


class BowData(L.LightningDataModule):
    """What XMCModule.setup reads of a DataModule (label names, training counts for propensities) and a loader."""

    def __init__(self, docs, batch_size: int = 6) -> None:
        super().__init__()
        self.docs, self.batch_size = docs, batch_size
        self.label_names = [f"label{i}" for i in range(LABELS)]
        self.train_label_counts = torch.arange(LABELS) % 7 + 1
        self.num_train_docs = 200
        self.propensity_a, self.propensity_b = 0.55, 1.5

    def val_dataloader(self):
        return DataLoader(BowDocs(self.docs), batch_size=self.batch_size, collate_fn=collate_bow)


class RecordDocs(L.Callback):
    """Write the doc_index of every validation document this rank scored."""

    def __init__(self, directory: str) -> None:
        self.directory, self.seen = directory, []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += batch["doc_index"].tolist()

    def on_validation_end(self, trainer, pl_module):
        torch.save(self.seen, f"{self.directory}/docs{trainer.global_rank}.pt")


def xmc_module():
    import functools

    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.heads import FixedFanInHead
    from xmc_dst.model import XMCModule

    torch.manual_seed(0)  # the encoder's initial weights; the head has its own seed
    return XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=16, hidden_dim=12), num_labels=LABELS,
                     num_features=FEATURES, head=functools.partial(FixedFanInHead, fan_in=6), ks=KS, seed=0)


def reference_metrics(module, docs) -> dict[str, float]:
    """Single process, no Trainer: top-k of the whole set at once, scored by the functional metrics."""
    from xmc_dst.metrics import inverse_propensity, xmc_metrics
    from xmc_dst.model import top_k

    batch = collate_bow(list(enumerate(docs)))
    with torch.no_grad():
        ids = top_k(module.eval()(batch), max(KS))[1]
    data = BowData(docs)
    inv = inverse_propensity(data.train_label_counts, data.num_train_docs, 0.55, 1.5)
    return {f"val/{k}": float(v) for k, v in xmc_metrics(ids, batch["label_ids"], batch["label_offsets"], KS,
                                                         inv).items()}


def validate_on_two_ranks(tmp_path, docs) -> tuple[dict[str, float], list[list[int]]]:
    """``ddp_fork``: the ranks start from this process's imports in well under a second (``ddp_spawn`` re-imports
    torch and Lightning in each, 10-20 s here); same gloo process group, DistributedSampler and metric reduction."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordDocs(str(tmp_path))])
    (results,) = trainer.validate(xmc_module(), datamodule=BowData(docs), verbose=False)
    return results, [torch.load(tmp_path / f"docs{r}.pt") for r in range(2)]


@pytest.mark.parametrize("num_docs", [40, 41])
def test_validation_metrics_under_two_process_ddp_equal_one_process(tmp_path, num_docs):
    docs = bow_documents(num_docs)
    ddp, seen = validate_on_two_ranks(tmp_path, docs)
    expected = reference_metrics(xmc_module(), docs)
    assert set(ddp) == set(expected) and len(expected) == 4 * len(KS)
    assert expected["val/P@5"] > 0 and expected["val/PSP@5"] > 0  # equality below is not between zeros
    if num_docs % 2 == 0:
        # each rank scored a disjoint half (batches of 6: 20 = 6+6+6+2 per rank), together every document once
        assert sorted(seen[0] + seen[1]) == list(range(num_docs)) and not set(seen[0]) & set(seen[1])
    else:
        # DistributedSampler padded 41 to 42 with document 0: scored twice, so the sums hold 42 documents
        assert sorted(seen[0] + seen[1]) == [0, *range(num_docs)]
        expected = reference_metrics(xmc_module(), [*docs, docs[0]])
        assert reference_metrics(xmc_module(), docs) != pytest.approx(expected, rel=1e-6)  # the padding shows
    assert ddp == pytest.approx(expected, rel=1e-6)  # logged as float32
