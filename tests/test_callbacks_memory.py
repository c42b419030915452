"""MemoryProfiler and the training-memory estimate, against hand counts and known allocations."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks import AuxiliaryObjective, MemoryProfiler
from xmc_dst.memory import estimate_memory, estimate_memory_parts, static_breakdown
from xmc_dst.sparse import FixedFanInLinear


class Toy(L.LightningModule):
    """A non-XMC module: frozen embedding, a trainable body, a fixed fan-in head; Adam."""

    def __init__(self, allocate_mib: int = 0) -> None:
        super().__init__()
        self.frozen = nn.Linear(10, 10)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(10, 20)
        self.head = FixedFanInLinear(20, 50, 5)
        self.allocate_mib = allocate_mib

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(self.frozen(x))), y)
        if self.allocate_mib:  # an activation of known size, kept for backward
            big = torch.ones(self.allocate_mib * (1 << 18), device=x.device, requires_grad=True)
            loss = loss + (big * 2.0).sum() * 0.0
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)


HEADS = {"sparse": "xmc_dst.heads.FixedFanInHead", "dense": "xmc_dst.heads.DenseHead"}


def toy_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 10, generator=g), torch.randn(4, 50, generator=g)) for _ in range(3)]
    return DataLoader(data, batch_size=None)


def test_static_bytes_match_a_hand_count_and_the_report_is_written(tmp_path, capsys):
    profiler = MemoryProfiler()
    trainer = L.Trainer(callbacks=[profiler], max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Toy(), toy_loader())
    fp32, step = 4, 4  # torch Adam keeps a float32 `step` tensor per parameter
    body = 10 * 20 + 20
    head = 50 * 5 + 50
    expected = {
        "frozen": {"params": 110 * fp32, "grads": 0, "optimizer": 0, "buffers": 0},
        "body": {"params": body * fp32, "grads": body * fp32, "optimizer": 2 * body * fp32 + 2 * step,
                 "buffers": 0},
        "head": {"params": head * fp32, "grads": head * fp32, "optimizer": 2 * head * fp32 + 2 * step,
                 "buffers": 50 * 5 * 4 + 8},  # int32 indices + int64 topology_version
    }
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report == profiler.report
    for name, counts in expected.items():
        got = report["parts"][name]
        assert {k: got[k] for k in counts} == counts, name
    assert report["static_bytes"] == sum(sum(c.values()) for c in expected.values())
    assert report["peak_bytes"] > 0 and report["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "peak M_tr" in printed and "head" in printed


def test_peak_includes_a_known_activation(tmp_path):
    profiler = MemoryProfiler(print_table=False)
    trainer = L.Trainer(callbacks=[profiler], max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Toy(allocate_mib=96), toy_loader())  # 96 MiB input + 96 MiB product kept for backward
    report = profiler.report
    assert report["peak_bytes"] - report["fit_start_rss_bytes"] >= 150 * (1 << 20)
    assert report["activations_bytes_estimate"] >= 150 * (1 << 20)


def bow_batches(num_features: int, num_labels: int, count: int = 4, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(num_features, (batch * 6,), generator=g)
        labels = torch.randint(num_labels, (batch * 2,), generator=g)
        out.append({"feature_ids": ids, "feature_values": torch.rand(ids.numel(), generator=g),
                    "feature_offsets": torch.arange(0, ids.numel() + 1, 6),
                    "label_ids": labels, "label_offsets": torch.arange(0, labels.numel() + 1, 2)})
    return out


@pytest.mark.parametrize("head", ["sparse", "dense"])
def test_estimate_of_the_static_part_matches_the_profiler(head, tmp_path):
    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.model import XMCModule

    encoder = {"class_path": "xmc_dst.encoders.BagOfWordsEncoder", "init_args": {"embedding_dim": 48,
                                                                                  "hidden_dim": 40}}
    spec = {"class_path": HEADS[head], "init_args": {"optimizer": "sgd", **({"fan_in": 8} if head == "sparse" else {})}}
    hparams = dict(num_labels=700, num_features=300, head=spec, intermediate_dim=24, aux_clusters=16, warmup_steps=0)
    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=48, hidden_dim=40), **hparams)
    profiler = MemoryProfiler(print_table=False)
    aux = AuxiliaryObjective(cutoff_step=100, build_clusters=False)  # the auxiliary head trains (has state)
    L.Trainer(callbacks=[aux, profiler], max_steps=2, default_root_dir=tmp_path, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              ).fit(model, DataLoader(bow_batches(300, 700), batch_size=None))
    measured = profiler.report["parts"]
    estimate = estimate_memory({"model": {"encoder": encoder, **hparams}}, batch_size=8)
    parts = estimate.parts[head]
    for name in ("encoder", "intermediate", "aux_head", "head"):
        got = measured[name]["static"] + (measured["other"]["static"] if name == "aux_head" else 0)
        assert parts[name].static == pytest.approx(got, rel=0.15), name
    predicted = sum(p.static for n, p in parts.items() if n != "dst")
    assert predicted == pytest.approx(profiler.report["static_bytes"], rel=0.15)


@pytest.mark.parametrize("head", ["dense", "sparse"])
def test_optimizer_step_temporary_is_measured_as_estimated(head):
    """The peak RSS of one GroupwiseOptimizer step over the live tensors (state already created) is the estimate's
    "optimizer step temporaries": the largest group's size (dense: the 51 MB head; sparse: the 36 MB embedding),
    not the groups' sum. Every tensor is over glibc's 32 MiB mmap ceiling, so a freed temporary leaves RSS and each
    step's peak is its own."""
    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from xmc_dst.model import XMCModule

    spec = {"class_path": HEADS[head], "init_args": {"fan_in": 8} if head == "sparse" else {}}
    hparams = dict(num_labels=100_000, num_features=70_000, head=spec, warmup_steps=0)
    torch.manual_seed(0)
    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=128, hidden_dim=0), **hparams)
    optimizer = model.configure_optimizers()["optimizer"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # creates the moments: the step measured below only makes temporaries
    if not reset_peak_rss() or rss_bytes() is None:
        pytest.skip("no resettable peak RSS (/proc/self/clear_refs) here")
    before = rss_bytes()
    optimizer.step()
    measured = peak_rss_bytes() - before
    encoder = {"class_path": "xmc_dst.encoders.BagOfWordsEncoder", "init_args": {"embedding_dim": 128,
                                                                                  "hidden_dim": 0}}
    estimate = estimate_memory({"model": {"encoder": encoder, **hparams}}, batch_size=8)
    expected = estimate.parts[head]["optimizer step temporaries"].activations
    largest = max(sum(p.numel() for p in group["params"]) for group in optimizer.param_groups) * 4
    assert expected == largest  # the estimate's count, from the config alone, is the live model's largest group
    assert expected == (100_000 * 129 if head == "dense" else 70_000 * 128) * 4
    assert measured == pytest.approx(expected, abs=4 << 20)  # all groups at once would be 36-51 MB more


def test_estimate_counts_a_transformer_exactly_and_compares_heads_at_670k(tiny_encoder_dir):
    from xmc_dst.encoders import EncoderInputs, TransformerEncoder

    config = {"model": {"class_path": "xmc_dst.model.XMCModule", "init_args": {
        "encoder": {"class_path": "xmc_dst.encoders.TransformerEncoder", "init_args": {"trainable_layers": 1}},
        "tokenizer": str(tiny_encoder_dir),
        "head": {"class_path": "xmc_dst.heads.FixedFanInHead", "init_args": {"fan_in": 32}}}},
        "trainer": {"precision": "16-mixed", "callbacks": [
            {"class_path": "callbacks.DynamicSparseTraining", "init_args": {"interval": 100}}]}}
    estimate = estimate_memory(config, num_labels=670_091, batch_size=4, max_length=16, budget_gib=1.0)
    real = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=1)
    total = sum(p.numel() for p in real.parameters())
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    encoder = estimate.parts["sparse"]["encoder"]
    assert encoder.params == 4 * total and encoder.grads == 4 * trainable and encoder.optimizer == 8 * trainable
    labels, width = 670_091, 32  # the tiny BERT's hidden size is the head's input
    dense, sparse = estimate.parts["dense"]["head"], estimate.parts["sparse"]["head"]
    assert dense.static == labels * (width + 1) * 4 * 4  # weights, grads, two AdamW moments
    assert sparse.static == labels * (min(32, width) + 1) * 4 * 4 + labels * 32 * 4 + 8
    assert estimate.parts["sparse"]["dst"].buffers == 65_536 * 1 * 8  # sampled ever-active map: ceil(32/64) words
    assert dense.activations == sparse.activations == 2 * 4 * labels * 4
    assert estimate.fits("sparse") is (estimate.total("sparse") <= 1 << 30)
    assert estimate.to_dict()["heads"]["dense"]["total"] == estimate.total("dense")


def test_parts_formula_reports_the_budget_verdict():
    estimate = estimate_memory_parts(num_labels=670_091, head_in=768, fan_in=32, batch_size=32,
                                     encoder_params=110_000_000, budget_bytes=8 << 30)
    dense_head = estimate.parts["dense"]["head"].static
    sparse_head = estimate.parts["sparse"]["head"].static
    assert dense_head / sparse_head > 15  # the paper's point: a sparse head's training state is ~19x smaller
    assert estimate.fits("sparse") and not estimate.fits("dense")


def test_static_breakdown_counts_shared_parameters_once():
    shared = nn.Linear(3, 3)
    model = nn.Module()
    model.a, model.b = shared, shared
    parts = static_breakdown(model)
    assert list(parts) == ["a"] and parts["a"].params == 12 * 4


def test_estimate_memory_command_prints_json_and_fails_over_budget(tmp_path, capsys):
    from xmc_dst.memory import estimate_memory_main

    config = tmp_path / "c.yaml"
    config.write_text("""
model:
  encoder: {class_path: xmc_dst.encoders.BagOfWordsEncoder, init_args: {embedding_dim: 32, hidden_dim: 0}}
  num_labels: 100000
  num_features: 5000
  head: {class_path: xmc_dst.heads.FixedFanInHead, init_args: {fan_in: 16}}
""")
    assert estimate_memory_main(["--config", str(config), "--json", "--batch-size", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    dense, sparse = report["heads"]["dense"], report["heads"]["sparse"]
    assert dense["parts"]["head"]["params"] == 100_000 * 33 * 4
    assert sparse["parts"]["head"]["params"] == 100_000 * 17 * 4
    assert report["batch_size"] == 16 and dense["fits"] is None
    assert estimate_memory_main(["--config", str(config), "--budget-gib", "0.001"]) == 1  # the sparse head won't fit
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_peak_counts_static_bytes_and_a_known_activation(tmp_path):
    profiler = MemoryProfiler(print_table=False)
    trainer = L.Trainer(callbacks=[profiler], max_epochs=1, accelerator="gpu", devices=1, default_root_dir=tmp_path,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Toy(allocate_mib=64), toy_loader())
    report = profiler.report
    assert report["device"] == "cuda" and report["peak_kind"] == "cuda_max_memory_allocated"
    body, head = 10 * 20 + 20, 50 * 5 + 50
    assert report["parts"]["head"]["buffers"] == 50 * 5 * 4 + 8
    assert report["parts"]["body"]["optimizer"] == 2 * body * 4 + 2 * 4  # Adam keeps `step` on the CPU: 4 bytes
    assert report["parts"]["head"]["params"] == head * 4
    # 64 MiB input and its 64 MiB product are alive together in the step: the peak holds both and the static part.
    assert report["peak_bytes"] >= report["static_bytes"] + 128 * (1 << 20)
    assert report["activations_bytes_estimate"] == report["peak_bytes"] - report["static_bytes"]
