"""AuxiliaryObjective and label clustering, against independent references.

References: the authors' ``CosineDecay(alpha, T, eta_min=0)`` is torch's ``CosineAnnealingLR``; clusters are
checked against planted groups; label embeddings against the unprojected TF-IDF sums they approximate.
"""

from __future__ import annotations

import csv
import functools
import gc
import math
import weakref

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks import AuxiliaryModule, AuxiliaryObjective
from xmc_dst.clusters import ClusterFileError, balanced_kmeans_tree, label_embeddings, load_cluster_file
from xmc_dst.optim import drop_parameters
from xmc_dst.sparse import FixedFanInLinear

GROUPS, LABELS_PER_GROUP, FEATURES_PER_GROUP = 4, 8, 10
OUT, VOCAB, HIDDEN = GROUPS * LABELS_PER_GROUP, GROUPS * FEATURES_PER_GROUP, 16


def planted_batches(num_docs: int = 96, batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Documents about one of GROUPS topics: 3 labels and 5 features of that topic, 1 random feature."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        topic = int(torch.randint(GROUPS, (1,), generator=g))
        labels = topic * LABELS_PER_GROUP + torch.randperm(LABELS_PER_GROUP, generator=g)[:3]
        features = topic * FEATURES_PER_GROUP + torch.randperm(FEATURES_PER_GROUP, generator=g)[:5]
        features = torch.unique(torch.cat([features, torch.randint(VOCAB, (1,), generator=g)]))
        docs.append((features, labels.sort().values))
    batches = []
    for start in range(0, num_docs, batch_size):
        chunk = docs[start:start + batch_size]
        x = torch.zeros(len(chunk), VOCAB)
        y = torch.zeros(len(chunk), OUT)
        for i, (f, lab) in enumerate(chunk):
            x[i, f], y[i, lab] = 1.0, 1.0
        batches.append({
            "x": x, "y": y,
            "feature_ids": torch.cat([f for f, _ in chunk]),
            "feature_values": torch.ones(sum(len(f) for f, _ in chunk)),
            "feature_offsets": torch.tensor([0] + [len(f) for f, _ in chunk]).cumsum(0),
            "label_ids": torch.cat([lab for _, lab in chunk]),
            "label_offsets": torch.tensor([0] + [len(lab) for _, lab in chunk]).cumsum(0),
        })
    return batches


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


@pytest.mark.parametrize("num_labels,num_clusters", [(103, 5), (64, 8), (10, 10)])
def test_balanced_tree_sizes_and_planted_groups(num_labels, num_clusters):
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(num_clusters, 32, generator=g), dim=1)
    truth = torch.randperm(num_labels, generator=g) % num_clusters
    emb = centers[truth] + 0.05 * torch.randn(num_labels, 32, generator=g)
    clusters = balanced_kmeans_tree(emb, num_clusters, seed=1)
    sizes = torch.bincount(clusters, minlength=num_clusters)
    assert sizes.sum() == num_labels and sizes.max() - sizes.min() <= math.ceil(math.log2(num_clusters))
    if num_labels % num_clusters == 0:  # equal planted groups are recovered exactly
        pairs_same = truth[:, None] == truth[None, :]
        assert torch.equal(clusters[:, None] == clusters[None, :], pairs_same)


def test_label_embeddings_approximate_the_tfidf_label_sums():
    batches = planted_batches(num_docs=64)
    emb = label_embeddings(lambda: iter(batches), OUT, dim=4096, seed=0)
    # Reference without projection: dense TF-IDF (binary tf, idf = log((1+N)/(1+df))), normalised documents.
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    idf = torch.log((1 + x.shape[0]) / (1 + (x > 0).sum(0).float()))
    docs = torch.nn.functional.normalize(x * idf, dim=1)
    reference = torch.nn.functional.normalize(y.t() @ docs, dim=1)
    assert (emb @ emb.t() - reference @ reference.t()).abs().max() < 0.1


def test_token_batches_count_terms_and_ignore_padding():
    batch = {"input_ids": torch.tensor([[2, 7, 7, 9, 0], [2, 8, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
             "label_ids": torch.tensor([0, 1]), "label_offsets": torch.tensor([0, 1, 2])}
    emb = label_embeddings(lambda: [batch], 2, dim=2048, seed=0)
    # Token 2 is in every document (idf 0); doc 0 = {7: 1 + log 2, 9: 1}, doc 1 = {8: 1, 3: 1}: disjoint terms.
    assert abs(float(emb[0] @ emb[1])) < 0.1


def test_cluster_files_in_every_accepted_form(tmp_path):
    groups = np.empty(3, dtype=object)
    groups[:] = [np.array([0, 4]), np.array([1, 2, 5]), np.array([3])]
    np.save(tmp_path / "label_group0.npy", groups, allow_pickle=True)
    expected = torch.tensor([0, 1, 1, 2, 0, 1])
    assert torch.equal(load_cluster_file(tmp_path / "label_group0.npy", 6), expected)
    np.save(tmp_path / "rows.npy", np.array([[0, 4, -1], [1, 2, 5], [3, -1, -1]]))
    assert torch.equal(load_cluster_file(tmp_path / "rows.npy", 6), expected)
    np.save(tmp_path / "assignment.npy", expected.numpy())
    assert torch.equal(load_cluster_file(tmp_path / "assignment.npy", 6), expected)
    named = np.empty(3, dtype=object)
    named[:] = [np.array(["a", "e"]), np.array(["b", "c", "f"]), np.array(["d"])]
    np.save(tmp_path / "named.npy", named, allow_pickle=True)
    assert torch.equal(load_cluster_file(tmp_path / "named.npy", 6, list("abcdef")), expected)
    named[:] = [np.array(["a", "e", "zz"]), np.array(["b", "c", "f"]), np.array(["d"])]  # "zz": not a training label
    np.save(tmp_path / "extra.npy", named, allow_pickle=True)
    assert torch.equal(load_cluster_file(tmp_path / "extra.npy", 6, list("abcdef")), expected)  # "zz" skipped
    with pytest.raises(ValueError, match="label names"):
        load_cluster_file(tmp_path / "named.npy", 6)


@pytest.mark.parametrize(("content", "message"), [
    (np.array([[0, 4, -1], [1, 2, -1], [3, -1, -1]]),
     r"covers 5 of the data's 6 labels; labels in no cluster: 1, e\.g\. label 5 \('f'\)"),
    (np.array([[0, 1], [1, 2]]), "a label of cluster 1 already belongs to another cluster"),
    (np.array([[0, 1], [2, 9]]), r"cluster 1 names label ids outside \[0, 6\) \(the data has 6 labels\): 9"),
    (np.array([0, 1, 1, 2, 0]), "5 ids for the data's 6 labels"),
    (np.array([0, 1, -1, 2, 0, 1]), r"labels with a negative cluster id: 1, e\.g\. label 2 \('c'\)"),
    (np.array([0.0, 1.0, 1.0, 2.0, 0.0, 1.0]), "expected integer cluster ids or label ids, got a float64 array"),
    (np.zeros((0, 3), dtype=np.int64), "holds no clusters"),
])
def test_cluster_files_that_do_not_cover_every_label_fail_with_the_fix(tmp_path, content, message):
    """Strict: a stale or foreign file fails before training with what is wrong and the fix, never spread by id."""
    np.save(tmp_path / "clusters.npy", content)
    with pytest.raises(ClusterFileError, match=message) as info:
        load_cluster_file(tmp_path / "clusters.npy", 6, list("abcdef"))
    assert str(tmp_path / "clusters.npy") in str(info.value) and "build_clusters: true" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"cluster file .*nowhere\.npy does not exist.*build_clusters"):
        load_cluster_file(tmp_path / "nowhere.npy", 6)


def test_empty_clusters_are_allowed_and_logged(tmp_path, caplog):
    np.save(tmp_path / "gap.npy", np.array([0, 0, 2, 2]))  # cluster 1 has no label: its meta-label is never positive
    assert load_cluster_file(tmp_path / "gap.npy", 4).tolist() == [0, 0, 2, 2]
    assert "1 of 3 clusters have no label" in caplog.text


# ---------------------------------------------------------------------------------------------- XMCModule


def test_drives_the_xmc_module_with_a_cluster_file(tmp_path):
    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.heads import FixedFanInHead
    from xmc_dst.model import XMCModule

    batches = planted_batches()
    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=16, hidden_dim=0),
                      num_labels=OUT, num_features=VOCAB, head=functools.partial(FixedFanInHead, fan_in=4, lr=0.05),
                      aux_clusters=GROUPS, warmup_steps=0, encoder_lr=0.01)
    file = tmp_path / "label_group0.npy"
    groups = np.empty(GROUPS, dtype=object)
    groups[:] = [np.arange(c * LABELS_PER_GROUP, (c + 1) * LABELS_PER_GROUP) for c in range(GROUPS)]
    np.save(file, groups, allow_pickle=True)
    callback = AuxiliaryObjective(alpha=0.4, cutoff_step=5, cluster_file=str(file))
    trainer = fit(model, [callback], batches, max_steps=8)
    assert torch.equal(model.label_clusters, torch.arange(OUT) // LABELS_PER_GROUP)
    assert model.aux_head is None and callback.removed_at_step == 5
    names = [g.get("name") for g in trainer.optimizers[0].param_groups]
    aux_group = trainer.optimizers[0].param_groups[names.index("aux")]
    assert aux_group["params"] == []
