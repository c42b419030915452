"""Exact resume: a run killed mid-epoch and resumed from ``last.ckpt`` ends bit-identical to an uninterrupted one.

The reference is the uninterrupted run itself (same seed, same code, CPU fp32): after the resumed run, every weight
and buffer (the sparse head's indices included), the optimizer and scheduler states, the DST schedule and the
validation metrics must be *equal* (``torch.equal``), not close. The run is a real ``XMCModule`` with the tiny
random BERT (dropout on, so the global random stream matters), a sparse head under ``DynamicSparseTraining``
(``seed=None``: its stream is drawn from the global generator) and an auxiliary head under ``AuxiliaryObjective``.

The comparison can fail: the negative controls resume without ``RandomStateCheckpoint`` (other dropout masks) and
without ``RestoreLoaderPosition`` (Lightning then never hands the loader its state, because ``configure_optimizers``
built the loader before the restore, and the resumed epoch starts over in a new order); both end with other weights.
Verified by hand as well: with ``ResumableDataLoader.load_state_dict`` a no-op, or the loader's batch count off by
one, the weights differ.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import write_topic_dataset

from callbacks import (
    AuxiliaryObjective,
    DynamicSparseTraining,
    LastCheckpoint,
    RandomStateCheckpoint,
    RestoreLoaderPosition,
)
from datamodules.base import EpochRandomSampler, ResumableDataLoader
from xmc_dst.encoders import TransformerEncoder
from xmc_dst.heads import FixedFanInHead, GroupedFanInHead
from xmc_dst.model import XMCModule

BATCHES_PER_EPOCH, EPOCHS = 10, 2  # 40 training documents, batch 4: 20 optimizer steps
RESUME_STEP = 13  # mid-epoch (epoch 1, batch 3); DST rewires at 4, 8, 12 before and 16 after it
AUX_CUTOFF = 16  # the auxiliary head exists when the checkpoint is written and is removed after the resume


def write_dataset(directory: Path, train: int = 40, test: int = 12, seed: int = 0) -> Path:
    return write_topic_dataset(directory, train, test, seed)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("resume_data"))


class Crash(RuntimeError):
    """Stands in for the process dying."""


class CrashAfter(L.Callback):
    """Dies at the start of the batch after optimizer step ``step`` (after ``last.ckpt`` of that step is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


class Record(L.Callback):
    """Validation metrics of every epoch and the step at which the auxiliary head was gone."""

    def __init__(self) -> None:
        self.val: list[dict[str, torch.Tensor]] = []
        self.aux_gone_at: int | None = None

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append({k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.aux_head is None and self.aux_gone_at is None:
            self.aux_gone_at = trainer.global_step


def make_run(data_dir: Path, encoder_dir: Path, root: Path, *extra: L.Callback, random_states: bool = True,
             loader_position: bool = True, head=None):
    from datamodules import RawTextXMCDataModule

    data = RawTextXMCDataModule(data_dir, tokenizer=str(encoder_dir), max_length=12, batch_size=4,
                                cache_dir=data_dir.parent / "token_cache")  # tokenised once
    data.prepare_data()
    data.setup("fit")
    model = XMCModule(encoder=functools.partial(TransformerEncoder, pooling="mean", dropout=0.2),
                      num_labels=data.num_labels, tokenizer=str(encoder_dir),
                      head=head or functools.partial(FixedFanInHead, fan_in=4, lr=3e-2), intermediate_dim=8,
                      aux_clusters=2, encoder_lr=3e-3, aux_lr=3e-2, warmup_steps=3, loss="bce",
                      loss_reduction="batch_mean")
    dst = DynamicSparseTraining(interval=4, end=1.0, threshold=0.05, seed=None)
    aux = AuxiliaryObjective(alpha=0.4, cutoff_step=AUX_CUTOFF, build_clusters=False)
    record = Record()
    callbacks = [dst, aux, record, LastCheckpoint(every_n_train_steps=RESUME_STEP, dirpath=str(root)), *extra]
    if random_states:
        callbacks.append(RandomStateCheckpoint())
    if loader_position:
        callbacks.append(RestoreLoaderPosition())
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                        default_root_dir=str(root), deterministic=True)
    return trainer, model, data, dst, record


def scramble_global_random_state(seed: int) -> None:
    """A fresh process: every global generator somewhere else than where the checkpointed run left it."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def assert_same_training_state(resumed: L.Trainer, straight: L.Trainer) -> None:
    a, b = resumed.lightning_module.state_dict(), straight.lightning_module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    oa, ob = resumed.optimizers[0].state_dict(), straight.optimizers[0].state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        for name, value in state.items():
            other = ob["state"][index][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, name)
    assert resumed.lr_scheduler_configs[0].scheduler.state_dict()["_last_lr"] == \
        straight.lr_scheduler_configs[0].scheduler.state_dict()["_last_lr"]


@dataclass
class Reference:
    """The uninterrupted run and the checkpoint of the run that died at ``RESUME_STEP`` (same seed)."""

    straight: L.Trainer
    dst: DynamicSparseTraining
    record: Record
    first_dst: DynamicSparseTraining
    first_record: Record
    checkpoint_dir: Path


@pytest.fixture(scope="module")
def reference(tiny_text: Path, tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("resume_runs")
    scramble_global_random_state(7)
    straight, model, data, dst, record = make_run(tiny_text, tiny_encoder_dir, root / "straight")
    straight.fit(model, datamodule=data)
    assert straight.global_step == BATCHES_PER_EPOCH * EPOCHS
    scramble_global_random_state(7)
    first, model, data, first_dst, first_record = make_run(tiny_text, tiny_encoder_dir, root / "killed",
                                                           CrashAfter(RESUME_STEP))
    with pytest.raises(Crash):
        first.fit(model, datamodule=data)
    return Reference(straight, dst, record, first_dst, first_record, root / "killed")


def resume(reference: Reference, tiny_text: Path, tiny_encoder_dir: Path, tmp_path: Path, **kwargs: bool):
    """A fresh process's resume: new module, data, trainer and callbacks, other global random states."""
    checkpoint_dir = tmp_path / "killed"
    shutil.copytree(reference.checkpoint_dir, checkpoint_dir)
    scramble_global_random_state(12345)
    trainer, model, data, dst, record = make_run(tiny_text, tiny_encoder_dir, checkpoint_dir, **kwargs)
    trainer.fit(model, datamodule=data, ckpt_path="last")  # found in LastCheckpoint's directory
    assert trainer.global_step == reference.straight.global_step
    return trainer, model, dst, record


def test_killed_mid_epoch_run_resumes_bit_identically(reference, tiny_text, tiny_encoder_dir, tmp_path):
    checkpoint = torch.load(reference.checkpoint_dir / "last.ckpt", weights_only=True)  # plain data only
    assert checkpoint["global_step"] == RESUME_STEP and checkpoint["epoch"] == 1  # mid-epoch
    assert "aux_head.weight" in checkpoint["state_dict"]  # the auxiliary head is still there
    assert [int(h["step"]) for h in reference.first_dst.history] == [4, 8, 12]
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["batches"] == RESUME_STEP - BATCHES_PER_EPOCH and loader_state["epoch"] == 1

    resumed, model, dst, record = resume(reference, tiny_text, tiny_encoder_dir, tmp_path)
    assert [int(h["step"]) for h in dst.history] == [16]  # rewired after the resume point
    without_time = [{k: v for k, v in h.items() if k != "dst/update_seconds"} for h in
                    reference.first_dst.history + dst.history]
    assert without_time == [{k: v for k, v in h.items() if k != "dst/update_seconds"} for h in reference.dst.history]
    # Removed across the resume: at the start of the batch after optimizer step AUX_CUTOFF.
    assert record.aux_gone_at == reference.record.aux_gone_at == AUX_CUTOFF + 1
    assert model.aux_head is None
    assert_same_training_state(resumed, reference.straight)
    assert int(model.head.topology_version) == 4
    assert dst.ever_active["head"].count == reference.dst.ever_active["head"].count
    # Validation after the first epoch ran before the crash; the second epoch's in the resumed process.
    assert len(reference.first_record.val) == 1 and len(record.val) == 1 and len(reference.record.val) == 2
    for got, expected in ((reference.first_record.val[0], reference.record.val[0]),
                          (record.val[0], reference.record.val[1])):
        assert got.keys() == expected.keys() and "val/P@1" in got
        for key in got:
            assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("missing", ["random_states", "loader_position"])
def test_without_random_states_or_loader_position_the_resumed_run_differs(missing, reference, tiny_text,
                                                                          tiny_encoder_dir, tmp_path):
    """Negative controls: the comparison above sees the dropout masks and the order of the resumed epoch."""
    resumed, *_ = resume(reference, tiny_text, tiny_encoder_dir, tmp_path, **{missing: False})
    with pytest.raises(AssertionError):
        assert_same_training_state(resumed, reference.straight)


def test_grouped_bf16_head_with_stochastic_rounding_resumes_bit_identically(tiny_text, tiny_encoder_dir, tmp_path):
    """The grouped head with bf16 weights, SGD with bf16 momentum and stochastic rounding (the generator state in
    the optimizer state, fp32/bf16/uint8 state dtypes kept by the load), and its per-group rewiring."""
    head = functools.partial(GroupedFanInHead, fan_in=4, group_size=2, weight_dtype="bfloat16", optimizer="sgd",
                             lr=0.3, state_dtype="bfloat16", rounding_seed=3)
    scramble_global_random_state(7)
    straight, model, data, _, _ = make_run(tiny_text, tiny_encoder_dir, tmp_path / "straight", head=head)
    straight.fit(model, datamodule=data)
    scramble_global_random_state(7)
    first, model, data, _, _ = make_run(tiny_text, tiny_encoder_dir, tmp_path / "killed", CrashAfter(RESUME_STEP),
                                        head=head)
    with pytest.raises(Crash):
        first.fit(model, datamodule=data)
    scramble_global_random_state(12345)
    resumed, model, data, _, _ = make_run(tiny_text, tiny_encoder_dir, tmp_path / "killed", head=head)
    resumed.fit(model, datamodule=data, ckpt_path="last")
    assert model.head.weight.dtype == torch.bfloat16 and int(model.head.topology_version) == 4
    state = resumed.optimizers[0].state[model.head.weight]
    assert state["momentum_buffer"].dtype == torch.bfloat16 and state["rounding_state"].dtype == torch.uint8
    assert_same_training_state(resumed, straight)


def test_loader_resumes_mid_epoch_and_at_epoch_boundaries():
    """The loader alone: the rest of the interrupted epoch in the same order, then the next epochs unchanged."""
    dataset = list(range(23))
    reference = ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=3)
    assert isinstance(reference.sampler, EpochRandomSampler)
    epochs = [[b.tolist() for b in reference] for _ in range(3)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[0], [])) == dataset
    for consumed in range(0, len(reference) + 1):
        scramble_global_random_state(consumed)
        loader = ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=3)
        iterator = iter(loader)
        seen = [next(iterator).tolist() for _ in range(consumed)]
        state = loader.state_dict()
        assert state["batches"] == consumed and state["length"] == len(reference) == 6
        fresh = ResumableDataLoader(dataset, batch_size=4, shuffle=True)  # another seed until the state is loaded
        fresh.load_state_dict(state)
        rest = [b.tolist() for b in fresh]
        if consumed < len(reference):
            assert seen + rest == epochs[0]
            assert [b.tolist() for b in fresh] == epochs[1]
        else:  # saved at the end of the pass: the next epoch
            assert rest == epochs[1]
    with pytest.raises(ValueError, match="batches"):
        ResumableDataLoader(dataset, batch_size=5, shuffle=True).load_state_dict(state)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_replaced_atomically_every_n_steps_mid_epoch(tmp_path):
    """Every save goes to ``last.ckpt.partial`` and is renamed over ``last.ckpt``: while it is written, the previous
    ``last.ckpt`` is whole (the reference: the checkpoint of the previous save, loaded again)."""
    saves: list[tuple[str, int | None]] = []
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LastCheckpoint(every_n_train_steps=3,
                                                                              dirpath=str(tmp_path))])
    save = trainer.save_checkpoint
    last = tmp_path / "last.ckpt"

    def recording_save(path, *args, **kwargs):
        previous = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
        saves.append((Path(path).name, previous))
        return save(path, *args, **kwargs)

    trainer.save_checkpoint = recording_save
    trainer.fit(Tiny(), ResumableDataLoader(torch.randn(20, 3), batch_size=4, shuffle=True, seed=0))  # 5 per epoch
    # every 3 steps mid-epoch, never at an epoch end; then the final state at the end of training (step 10)
    assert saves == [("last.ckpt.partial", None), ("last.ckpt.partial", 3), ("last.ckpt.partial", 6),
                     ("last.ckpt.partial", 9)]
    assert torch.load(last, weights_only=True)["global_step"] == 10
    assert not (tmp_path / "last.ckpt.partial").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt"]
    with pytest.raises(ValueError, match=">= 1"):
        LastCheckpoint(every_n_train_steps=0)


class TinyWithDropout(Tiny):
    """Dropout (per-rank random streams) and a step schedule's ``estimated_stepping_batches`` (which builds the
    training loader before the checkpoint is read, the case ``RestoreLoaderPosition`` exists for)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def training_step(self, batch, batch_idx):
        return self.layer(self.drop(batch)).pow(2).mean()

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Batches(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = batch.clone()


@pytest.mark.parametrize(("every", "limit"), [(3, 1.0), (5, 1.0), (4, 4), (10, 1.0)],
                         ids=["mid-epoch", "last-batch", "limited-epoch-end", "end-of-epoch-1"])
def test_resume_at_and_between_epoch_ends_sees_the_uninterrupted_batches(every, limit, tmp_path):
    """20 documents, batch 4: 5 batches per epoch (or ``limit``), 3 epochs; killed right after the save at step
    ``every``. The resumed run must see the very batches of the uninterrupted one from there on, and end equal."""

    def run(root: Path, crash: bool = False, ckpt_path: str | None = None) -> tuple[torch.Tensor, Batches]:
        scramble_global_random_state(99 if ckpt_path else 0)
        batches = Batches()
        callbacks = [LastCheckpoint(every_n_train_steps=every, dirpath=str(root)), RestoreLoaderPosition(),
                     RandomStateCheckpoint(), batches, *([CrashAfter(every)] if crash else [])]
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks, limit_train_batches=limit)
        model = TinyWithDropout()
        loader = ResumableDataLoader(torch.arange(60.0).reshape(20, 3) / 60, batch_size=4, shuffle=True)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model.layer.weight.detach().clone(), batches

    os.environ.pop("PL_GLOBAL_SEED", None)  # the shuffle seed must come from the checkpoint
    straight, seen = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "killed", crash=True)
    resumed, resumed_seen = run(tmp_path / "killed", ckpt_path="last")
    assert sorted(resumed_seen.seen) == [step for step in sorted(seen.seen) if step >= every]
    for step, batch in resumed_seen.seen.items():
        assert torch.equal(batch, seen.seen[step]), step
    assert torch.equal(resumed, straight)


@pytest.mark.slow  # multi-process: run by .ci/run, not in the fast tier
def test_two_process_ddp_run_resumes_bit_identically(tmp_path):
    """Under DDP Lightning swaps in its DistributedSampler (the loader state then carries its epoch) and every rank
    gets its own random state back. 32 documents, 2 ranks, batch 4: 4 steps per epoch, killed at step 6."""

    def run(root: Path, seed: int, crash: bool = False, ckpt_path: str | None = None) -> torch.Tensor:
        torch.manual_seed(seed)
        callbacks = [LastCheckpoint(every_n_train_steps=6, dirpath=str(root)), RestoreLoaderPosition(),
                     RandomStateCheckpoint()]  # verified by hand: without it the resumed weights differ
        callbacks += [CrashAfter(6)] if crash else []
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        model = TinyWithDropout()
        loader = ResumableDataLoader(torch.arange(96.0).reshape(32, 3) / 96, batch_size=4, shuffle=True, seed=1)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model.layer.weight.detach().clone()  # rank 0's, copied back to this process

    straight = run(tmp_path / "straight", seed=0)
    with pytest.raises(Exception, match="killed at step 6"):
        run(tmp_path / "killed", seed=0, crash=True)
    checkpoint = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 2  # mid-epoch 1
    assert len(checkpoint["callbacks"]["RandomStateCheckpoint"]["ranks"]) == 2
    assert torch.equal(run(tmp_path / "killed", seed=99, ckpt_path="last"), straight)
