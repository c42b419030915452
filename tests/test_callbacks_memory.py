"""MemoryProfiler against hand counts and known allocations."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks import MemoryProfiler
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
