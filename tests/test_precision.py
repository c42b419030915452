"""Mixed precision: an fp16 overflow is skipped by loss scaling and training recovers; bf16 trains finite on CPU.

The overflow is the ordinary one of fp16 training: a loss scale too large for the half-precision backward (here an
initial scale of 2**40), so the unscaled gradients hold inf. The GradScaler must then skip the optimizer step (every
weight, the sparse head's indices and the optimizer state stay exactly as they were), halve its scale, and once the
scale fits, training must go on updating with a finite loss. The same run is checked on the CPU (``torch.amp.
GradScaler("cpu")`` and fp16 autocast on CPU through Lightning's ``MixedPrecision`` plugin) and, behind the ``gpu``
marker, on CUDA. The module is the real :class:`XMCModule` (bag-of-words encoder, sparse head)
with :class:`FiniteLossGuard`, which under ``16-mixed`` leaves overflow steps to the scaler and counts them.
Dynamic sparse training counts only the steps the scaler applied: it neither rewires on a skipped step nor lets one
advance its schedule, also across a checkpoint resume.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from callbacks import DynamicSparseTraining, FiniteLossGuard, RestoreLoaderPosition
from datamodules.base import ResumableDataLoader
from xmc_dst.encoders import BagOfWordsEncoder
from xmc_dst.heads import FixedFanInHead
from xmc_dst.model import XMCModule

FEATURES, LABELS = 30, 25


def documents(num_docs: int = 96, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Single-document CSR batches (feature ids/values, label ids) for ``collate``."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        features = torch.randperm(FEATURES, generator=g)[: int(torch.randint(1, 6, (1,), generator=g))]
        labels = torch.randperm(LABELS, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]
        docs.append({"feature_ids": features, "feature_values": torch.rand(features.numel(), generator=g) + 0.1,
                     "label_ids": labels})
    return docs


def collate(docs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    def offsets(key: str) -> torch.Tensor:
        return torch.tensor([0] + [d[key].numel() for d in docs]).cumsum(0)

    return {"feature_ids": torch.cat([d["feature_ids"] for d in docs]),
            "feature_values": torch.cat([d["feature_values"] for d in docs]), "feature_offsets": offsets("feature_ids"),
            "label_ids": torch.cat([d["label_ids"] for d in docs]), "label_offsets": offsets("label_ids"),
            "doc_index": torch.arange(len(docs))}


class StepProbe(L.Callback):
    """Per training step: loss scale before and after, whether the module's state (weights, biases, sparse indices)
    moved, how many parameters the optimizer holds state for, and the loss."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self._scale = trainer.precision_plugin.scaler.get_scale()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = pl_module.state_dict()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append({
            "scale_before": self._scale, "scale_after": trainer.precision_plugin.scaler.get_scale(),
            "unchanged": all(torch.equal(after[k], v) for k, v in self._before.items()),
            "indices": pl_module.head.indices.clone(), "optimizer_state": len(trainer.optimizers[0].state),
            "loss": float(loss),
        })


def overflow_run(device: str, max_steps: int = 40, dst: DynamicSparseTraining | None = None,
                 extra: list[L.Callback] | None = None, ckpt_path: str | None = None,
                 loader: type[DataLoader] = DataLoader) -> tuple[XMCModule, StepProbe, FiniteLossGuard]:
    torch.manual_seed(0)
    module = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=16, hidden_dim=12),
                       num_labels=LABELS, num_features=FEATURES, head=functools.partial(FixedFanInHead, fan_in=6,
                                                                                         lr=1e-2),
                       intermediate_dim=16, seed=0, warmup_steps=0, lr_schedule="constant", encoder_lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 40, growth_interval=10_000)  # far too large for fp16
    probe, guard = StepProbe(), FiniteLossGuard(action="stop", max_consecutive=max_steps)
    callbacks = [guard, *([dst] if dst is not None else []), *(extra or []), probe]  # the probe last: sees every change
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=max_steps,
                        plugins=[MixedPrecision("16-mixed", device, scaler)], callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    assert trainer.precision == "16-mixed"
    trainer.fit(module, loader(documents(), batch_size=8, collate_fn=collate), ckpt_path=ckpt_path)
    return module, probe, guard


def check_overflow_skipped_then_recovered(module: XMCModule, probe: StepProbe, guard: FiniteLossGuard) -> None:
    steps = probe.steps
    skipped = [i for i, s in enumerate(steps) if s["scale_after"] < s["scale_before"]]
    assert skipped, "the initial scale of 2**40 must overflow"
    first_update = len(skipped)
    assert skipped == list(range(first_update))  # overflow from the start until the scale fits, then never again
    for s in steps[:first_update]:
        assert s["unchanged"]  # weights, biases, sparse indices: all as before the step
        assert s["scale_after"] == s["scale_before"] / 2  # GradScaler's backoff factor
        assert s["optimizer_state"] == 0  # no optimizer step ever ran: not even Adam's state was created
        assert math.isfinite(s["loss"])  # the loss is finite; the fp16 backward of the scaled loss is not
    recovered = steps[first_update:]
    assert len(recovered) >= 5, f"the scale kept falling for {first_update} of {len(steps)} steps"
    assert all(not s["unchanged"] and s["scale_after"] == steps[first_update]["scale_before"] for s in recovered)
    assert all(math.isfinite(s["loss"]) for s in recovered) and recovered[-1]["optimizer_state"] > 0
    assert guard.skipped == first_update and guard.consecutive == 0  # the guard saw the same steps, and let go
    for p in module.parameters():
        assert torch.isfinite(p).all()


def test_fp16_overflow_is_skipped_and_training_recovers_on_cpu() -> None:
    module, probe, guard = overflow_run("cpu")
    check_overflow_skipped_then_recovered(module, probe, guard)


@pytest.mark.gpu
def test_fp16_overflow_is_skipped_and_training_recovers_on_cuda() -> None:
    module, probe, guard = overflow_run("cuda")
    check_overflow_skipped_then_recovered(module, probe, guard)


def test_dst_does_not_rewire_on_a_step_the_scaler_skipped() -> None:
    dst = DynamicSparseTraining(interval=2, start=0, end=1.0, threshold=0.05, seed=0)
    _, probe, _ = overflow_run("cpu", max_steps=8, dst=dst)
    assert probe.steps[1]["scale_after"] < probe.steps[1]["scale_before"]  # step 2 overflowed and was skipped ...
    assert dst.num_updates == 0 and probe.steps[1]["unchanged"]  # ... so the update due at step 2 must wait


def test_bf16_mixed_on_cpu_trains_the_shipped_bibtex_with_finite_loss(tmp_path) -> None:
    """Shipped data, real module under bf16 autocast on the CPU: every loss finite, the weights move, and the
    trained model's bf16-autocast logits are fp32 and match its fp32 logits to bf16 accuracy."""
    from datamodules import Bibtex

    data = Bibtex(batch_size=128, eval_batch_size=256)
    torch.manual_seed(0)
    module = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=64, hidden_dim=0),
                       num_labels=data.num_labels, num_features=data.num_features,
                       head=functools.partial(FixedFanInHead, fan_in=16, lr=1e-2), seed=0, warmup_steps=0,
                       encoder_lr=1e-2)
    initial = module.head.weight.detach().clone()
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=8, limit_val_batches=2,
                        val_check_interval=8, callbacks=[Losses()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(module.head.weight.detach(), initial)
    assert all(math.isfinite(float(v)) for k, v in trainer.callback_metrics.items() if k.startswith("val/"))
    batch = next(iter(data.test_dataloader()))
    module.eval()
    with torch.no_grad():
        full = module(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = module(batch)
    assert full.dtype == mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, full, rtol=0.05, atol=0.05)


def topology_changes(probe: StepProbe, first_step: int = 1) -> list[int]:
    """Global steps (1-based, counted from ``first_step``) after which the sparse head's indices differ."""
    indices = [s["indices"] for s in probe.steps]
    return [first_step + i for i in range(1, len(indices)) if not torch.equal(indices[i], indices[i - 1])]


def test_dst_schedule_counts_only_applied_steps_and_regrows_from_the_applied_steps_batch(monkeypatch) -> None:
    """The first ``skipped`` steps overflow; DST steps then run 1, 2, ... from the first applied step, so the updates
    due every 3 DST steps land at global steps ``skipped + 3n``. Gradient regrowth must rank inputs by the update
    step's own batch (8 finite rows), not by rows left from the skipped steps' inf gradients."""
    import callbacks.dst as dst_module

    seen: list[tuple[int, bool]] = []
    real = dst_module.GradientScores

    def spy(x, dy, *args, **kwargs):
        seen.append((x.shape[0], bool(torch.isfinite(dy).all() and torch.isfinite(x).all())))
        return real(x, dy, *args, **kwargs)

    monkeypatch.setattr(dst_module, "GradientScores", spy)
    dst = DynamicSparseTraining(interval=3, start=0, end_step=40, threshold=0.05, seed=0, regrow="gradient")
    module, probe, guard = overflow_run("cpu", max_steps=40, dst=dst)
    skipped = guard.skipped
    assert 3 <= skipped <= 30 and dst.steps == 40 - skipped  # the overflow steps did not advance the DST clock
    due = list(range(3, dst.steps + 1, 3))  # end_step=40 is beyond the last DST step
    assert [int(h["step"]) for h in dst.history] == due and dst.num_updates == len(due) > 0
    assert topology_changes(probe) == [skipped + d for d in due]
    assert seen == [(8, True)] * len(due)  # one batch of 8 documents per update, all finite
    assert torch.isfinite(module.head.weight).all()


def test_dst_clock_resumes_from_the_checkpoint_under_fp16(tmp_path) -> None:
    """A checkpoint written mid-epoch at global step 30 (most steps so far skipped by the scaler) and resumed: the
    DST clock comes from the checkpoint, not from the global step, so the resumed run rewires at the same DST and
    global steps and ends with the same topology and weights as the uninterrupted run that wrote the checkpoint."""
    path = tmp_path / "step30.ckpt"

    class SaveAtStep30(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 30:
                trainer.save_checkpoint(path)

    def run(*extra: L.Callback, ckpt_path: str | None = None):
        dst = DynamicSparseTraining(interval=3, start=0, end_step=40, threshold=0.05, seed=0)
        return dst, *overflow_run("cpu", max_steps=40, dst=dst, extra=[RestoreLoaderPosition(), *extra],
                                  ckpt_path=ckpt_path, loader=ResumableDataLoader)

    straight_dst, straight, straight_probe, guard = run(SaveAtStep30())
    assert 3 <= 30 - guard.skipped < straight_dst.steps  # the checkpoint holds a DST clock behind the global step
    resumed_dst, resumed, resumed_probe, _ = run(ckpt_path=str(path))
    assert resumed_dst.steps == straight_dst.steps
    before = [h for h in straight_dst.history if h["step"] <= 30 - guard.skipped]
    assert [h["step"] for h in before + resumed_dst.history] == [h["step"] for h in straight_dst.history]
    assert topology_changes(resumed_probe, first_step=31) == [s for s in topology_changes(straight_probe) if s > 31]
    assert resumed_dst.ever_active["head"].count == straight_dst.ever_active["head"].count
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
