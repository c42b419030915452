"""OutOfMemoryAdvisor: an OOM in training is re-raised with the breakdown by part and the knob of the largest."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import OutOfMemoryAdvice, OutOfMemoryAdvisor
from callbacks.oom import KNOBS


class Toy(L.LightningModule):
    """A small encoder and a large dense head; the second step runs out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 16)
        self.head = nn.Linear(16, 50_000)  # 850,000 weights: the largest part by far

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.head(torch.relu(self.encoder(batch[0]))).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_oom_names_the_largest_part_with_hand_counted_bytes() -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    trainer = L.Trainer(max_epochs=1, callbacks=[OutOfMemoryAdvisor()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(OutOfMemoryAdvice) as caught:
        trainer.fit(Toy(), data)
    message = str(caught.value)
    head_bytes = (16 * 50_000 + 50_000) * 4  # params; grads the same; Adam: two states of the same size
    assert f"head: {4 * head_bytes / 1024**3:.2f} GiB (params {head_bytes / 1024**3:.2f}" in message
    assert f"The largest part is head: try {KNOBS['head']}" in message
    assert "Tried to allocate 2.00 GiB" in message and "estimate-memory" in message
    assert isinstance(caught.value, torch.OutOfMemoryError)  # existing OOM handlers still catch it


def test_other_errors_pass_through() -> None:
    class Broken(Toy):
        def training_step(self, batch, batch_idx):
            raise KeyError("not memory")

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 8)), batch_size=4)
    trainer = L.Trainer(max_epochs=1, callbacks=[OutOfMemoryAdvisor()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(KeyError, match="not memory"):
        trainer.fit(Broken(), data)


@pytest.mark.gpu
def test_real_cuda_oom_reports_activations_and_device() -> None:
    class Greedy(Toy):
        def training_step(self, batch, batch_idx):
            free, _ = torch.cuda.mem_get_info()
            torch.empty(2 * free, dtype=torch.uint8, device="cuda")  # more than the card has left
            return super().training_step(batch, 0)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 8)), batch_size=4)
    trainer = L.Trainer(max_epochs=1, callbacks=[OutOfMemoryAdvisor()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="gpu", devices=1)
    with pytest.raises(OutOfMemoryAdvice, match=r"(?s)activations \(peak .* GiB minus static\).*device .* GiB"):
        trainer.fit(Greedy(), data)
