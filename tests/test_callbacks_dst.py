"""DynamicSparseTraining on a toy MLP with one fixed fan-in layer, against independent references.

References: the authors' schedule is torch's ``CosineAnnealingLR`` stepped once per optimizer step; the dense weight
and optimizer state scattered to ``[out, in]`` say where every connection's value must be after a rewire; the
dense gradient of a dense copy of the layer says which inputs RigL must grow.
"""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DynamicSparseTraining
from callbacks.dst import find_sparse_layers
from xmc_dst.regrowth import EverActive
from xmc_dst.sparse import FixedFanInLinear

IN, HIDDEN, OUT, FAN_IN = 12, 24, 30, 4


class ToyMLP(L.LightningModule):
    """A non-XMC module: dense body, one fixed fan-in output layer, BCE, Adam."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh())
        with torch.no_grad():
            for p in self.body.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.out = FixedFanInLinear(HIDDEN, OUT, FAN_IN, generator=generator)
        self.lr = lr

    def loss(self, batch, weight: torch.Tensor | None = None) -> torch.Tensor:
        x, y = batch
        h = self.body(x)
        logits = self.out(h) if weight is None else h @ weight.t() + self.out.bias
        return nn.functional.binary_cross_entropy_with_logits(logits, y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def toy_loader(batches: int = 8, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * batch_size, IN, generator=g)
    y = (torch.rand(batches * batch_size, OUT, generator=g) < 0.15).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(callbacks, tmp_path=None, **kwargs) -> L.Trainer:
    defaults = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
    defaults.update(kwargs)
    if tmp_path is not None:
        defaults.setdefault("default_root_dir", str(tmp_path))
    return L.Trainer(callbacks=callbacks, **defaults)


def authors_threshold(initial: float, floor: float, total: int, steps: int) -> float:
    """The authors' ``CosineDecay``: CosineAnnealingLR(T_max=total, eta_min=floor) stepped ``steps`` times."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=initial)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=floor)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


class Probe(L.Callback):
    """Snapshots the sparse layer and its Adam state around DST updates (placed before and after the callback)."""

    def __init__(self, store: list, dst: DynamicSparseTraining) -> None:
        self.store, self.dst = store, dst

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.dst.is_update_step(trainer.global_step):
            layer = pl_module.out
            state = trainer.optimizers[0].state[layer.weight]
            self.store.append({"step": trainer.global_step, "indices": layer.indices.cpu().clone(),
                               "weight": layer.weight.detach().cpu().clone(), "exp_avg": state["exp_avg"].cpu().clone(),
                               "exp_avg_sq": state["exp_avg_sq"].cpu().clone()})


def dense(indices: torch.Tensor, values: torch.Tensor, in_features: int = HIDDEN) -> torch.Tensor:
    return torch.zeros(indices.shape[0], in_features, dtype=values.dtype).scatter_(1, indices.long(), values)


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_values_match_authors_and_rigl_formulas(tmp_path):
    model = ToyMLP()
    dst = DynamicSparseTraining(interval=3, end=0.75, prune="threshold", threshold=0.3, threshold_floor=1e-4, seed=0)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer(callbacks=[dst], logger=logger).fit(model, toy_loader())
    assert dst.end_step == int(0.75 * 16) == 12
    assert [int(h["step"]) for h in dst.history] == [3, 6, 9]
    for h in dst.history:
        assert h["dst/threshold"] == pytest.approx(authors_threshold(0.3, 1e-4, 12, int(h["step"])), rel=1e-9)
    assert int(model.out.topology_version) == 3
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("dst/threshold")]
    assert [int(r["step"]) for r in rows] == [3, 6, 9]
    assert all(0 < float(r["dst/regrown_fraction"]) <= 1 and float(r["dst/itop_rate"]) > FAN_IN / HIDDEN
               for r in rows)

    rigl = DynamicSparseTraining(interval=5, start=10, end_step=110, prune="fraction", drop_fraction=0.3)
    for step in (15, 35, 60, 100):
        t, total = step - 10, 100
        assert rigl.amount_at(step) == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * t / total)))
    assert [s for s in range(0, 130) if rigl.is_update_step(s)] == list(range(15, 110, 5))
    floored = DynamicSparseTraining(interval=5, start=10, end_step=110, prune="fraction", drop_fraction=0.3,
                                    drop_fraction_floor=0.1)
    assert floored.amount_at(10) == pytest.approx(0.3) and floored.amount_at(110) == pytest.approx(0.1)
    assert floored.amount_at(60) == pytest.approx(0.2)  # half-way down the cosine
    constant = DynamicSparseTraining(prune="fraction", end_step=100, drop_fraction=0.15, drop_fraction_floor=0.15)
    assert [constant.amount_at(step) for step in (0, 33, 99)] == pytest.approx([0.15] * 3)
    with pytest.raises(ValueError, match="drop_fraction_floor"):
        DynamicSparseTraining(prune="fraction", drop_fraction=0.1, drop_fraction_floor=0.2)


def test_gradient_accumulation_keeps_the_optimizer_step_schedule():
    model = ToyMLP()
    dst = DynamicSparseTraining(interval=2, end=1.0, threshold=0.3, seed=0)
    trainer(callbacks=[dst], accumulate_grad_batches=2).fit(model, toy_loader())  # 16 batches -> 8 steps
    assert [int(h["step"]) for h in dst.history] == [2, 4, 6]
    assert int(model.out.topology_version) == 3


# ---------------------------------------------------------------------------------------------- rewiring


CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("prune", ["threshold", "fraction"])
def test_rewire_moves_connections_keeps_fan_in_and_resets_state_at_regrown_slots(prune, device):
    model = ToyMLP()
    dst = DynamicSparseTraining(interval=2, end=1.0, prune=prune, threshold=0.35, drop_fraction=0.5, seed=0)
    before, after = [], []
    trainer(callbacks=[Probe(before, dst), dst, Probe(after, dst)], accelerator=device).fit(model, toy_loader())
    assert len(before) == len(after) == len(dst.history) == 7
    union = dense(before[0]["indices"], torch.ones(OUT, FAN_IN, dtype=torch.bool))
    moved = 0
    for old, new, h in zip(before, after, dst.history, strict=True):
        idx = new["indices"]
        assert idx.shape == (OUT, FAN_IN) and idx.dtype == torch.int32
        assert bool((idx[:, 1:] > idx[:, :-1]).all())  # sorted and unique: the fan-in is exactly FAN_IN
        # Pruned: the reference rule on the post-step weights (threshold, or the k weakest per row).
        magnitude = old["weight"].abs()
        if prune == "threshold":
            drop = magnitude < h["dst/threshold"]
        else:
            k = round(h["dst/drop_fraction"] * FAN_IN)
            drop = torch.zeros_like(magnitude, dtype=torch.bool)
            if k:
                drop.scatter_(1, magnitude.topk(k, dim=1, largest=False).indices, True)
        kept_old = dense(old["indices"], ~drop)
        new_set = dense(idx, torch.ones_like(idx, dtype=torch.bool))
        old_set = dense(old["indices"], torch.ones_like(idx, dtype=torch.bool))
        assert torch.equal(new_set & old_set, kept_old)  # survivors kept, pruned gone
        assert torch.equal((new_set & ~old_set).sum(1), drop.sum(1))  # as many new inputs as pruned
        assert h["dst/regrown_fraction"] == pytest.approx(drop.sum().item() / drop.numel())
        moved += int(drop.sum())
        # Weights and Adam moments follow their input; regrown slots are zero (absent from the old dense map).
        for key in ("weight", "exp_avg", "exp_avg_sq"):
            expected = dense(old["indices"], old[key]).gather(1, idx.long())
            assert torch.equal(new[key], expected), key
        regrown = dense(idx, torch.ones_like(idx, dtype=torch.bool)) & ~old_set
        assert bool((dense(idx, new["exp_avg_sq"])[regrown] == 0).all())
        union |= new_set
        tracker = dst.ever_active["out"]
    assert moved > 0
    assert torch.equal(tracker.dense().cpu(), union)  # ITOP map: every connection ever active
    assert dst.history[-1]["dst/itop_rate"] == pytest.approx(union.sum().item() / (OUT * HIDDEN))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_gradient_regrowth_grows_the_largest_dense_gradients(device):
    model = ToyMLP()
    dst = DynamicSparseTraining(interval=3, end=1.0, threshold=0.3, regrow="gradient", seed=0)

    class DenseGradient(L.Callback):
        """Reference: the gradient of the loss w.r.t. a dense copy of the layer, on the update step's batch."""

        grads: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_after_backward(self, trainer, pl_module):
            if dst.is_update_step(trainer.global_step + 1):
                with torch.enable_grad():
                    weight = pl_module.out.dense_weight().requires_grad_(True)
                    pl_module.loss(self.batch, weight).backward(inputs=[weight])
                self.grads[trainer.global_step + 1] = weight.grad.cpu().clone()

    reference = DenseGradient()
    before, after = [], []
    trainer(callbacks=[reference, Probe(before, dst), dst, Probe(after, dst)], accelerator=device).fit(
        model, toy_loader())
    assert sorted(reference.grads) == [3, 6, 9, 12, 15] == [int(h["step"]) for h in dst.history]
    assert not dst._captures and not model.out._forward_hooks  # hooks only around update steps
    grew = 0
    for old, new in zip(before, after, strict=True):
        grad = reference.grads[old["step"]].abs()
        old_set = dense(old["indices"], torch.ones(OUT, FAN_IN, dtype=torch.bool))
        new_set = dense(new["indices"], torch.ones(OUT, FAN_IN, dtype=torch.bool))
        grown = new_set & ~old_set
        for row in range(OUT):
            n = int(grown[row].sum())
            if n:
                candidates = grad[row].masked_fill(old_set[row], -1.0)
                assert set(candidates.topk(n).indices.tolist()) == set(grown[row].nonzero().squeeze(1).tolist())
                grew += n
        assert bool((new["weight"][grown.gather(1, new["indices"].long())] == 0).all())  # new weights start at 0
    assert grew > 0


# ---------------------------------------------------------------------------------------------- state


def test_resumed_run_rewires_exactly_like_an_uninterrupted_one(tmp_path):
    def callback():
        return DynamicSparseTraining(interval=3, end=0.9, threshold=0.3, seed=None)

    torch.manual_seed(123)  # seed=None: the random stream is drawn from torch's global generator once
    straight, dst_straight = ToyMLP(), callback()
    trainer(callbacks=[dst_straight]).fit(straight, toy_loader())

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    torch.manual_seed(123)
    first, dst_first = ToyMLP(), callback()
    run = trainer(callbacks=[dst_first, StopAfterFirstEpoch()])
    run.fit(first, toy_loader())
    assert run.global_step == 8
    path = tmp_path / "half.ckpt"
    run.save_checkpoint(path)

    torch.manual_seed(999)  # a different global state: the resumed stream must come from the checkpoint
    resumed, dst_resumed = ToyMLP(), callback()
    trainer(callbacks=[dst_resumed]).fit(resumed, toy_loader(), ckpt_path=path)
    assert [int(h["step"]) for h in dst_resumed.history] == [9, 12]  # rewires after the resume point
    assert [h["step"] for h in dst_first.history + dst_resumed.history] == [h["step"] for h in dst_straight.history]
    assert torch.equal(resumed.out.indices, straight.out.indices)
    assert torch.equal(resumed.out.weight, straight.out.weight)
    assert torch.equal(resumed.body[0].weight, straight.body[0].weight)
    assert dst_resumed.ever_active["out"].count == dst_straight.ever_active["out"].count
    assert dst_resumed.history[-1]["dst/itop_rate"] == dst_straight.history[-1]["dst/itop_rate"]


def test_finds_any_module_with_the_rewiring_protocol():
    class Duck(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("indices", torch.zeros(2, 1, dtype=torch.int32))

        def rewire(self, *args, **kwargs): ...

        def reset_optimizer_state(self, *args): ...

    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(Duck(), FixedFanInLinear(4, 5, 2)))
    assert [name for name, _ in find_sparse_layers(model)] == ["1.0", "1.1"]
    with pytest.raises(ValueError, match="no layer"):
        DynamicSparseTraining().setup(trainer([]), L.LightningModule(), "fit")


def test_all_callbacks_configure_from_a_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from callbacks import AuxiliaryObjective, MemoryProfiler

    config = tmp_path / "config.yaml"
    config.write_text("""
trainer:
  max_epochs: 1
  callbacks:
    - class_path: callbacks.DynamicSparseTraining
      init_args: {interval: 3, end: 0.5, prune: fraction, drop_fraction: 0.2, regrow: gradient, itop_rows: null}
    - class_path: callbacks.AuxiliaryObjective
      init_args: {alpha: 0.3, cutoff_epoch: 2, num_clusters: 8, build_clusters: false}
    - class_path: callbacks.MemoryProfiler
      init_args: {filename: mem.json, print_table: false}
""")
    cli = LightningCLI(ToyMLP, args=["--config", str(config)], run=False, save_config_callback=None)
    dst, aux, mem = cli.trainer.callbacks[:3]
    assert isinstance(dst, DynamicSparseTraining) and (dst.interval, dst.end, dst.prune, dst.regrow) == (
        3, 0.5, "fraction", "gradient") and dst.drop_fraction == 0.2 and dst.itop_rows is None
    assert isinstance(aux, AuxiliaryObjective) and (aux.alpha, aux.cutoff_epoch, aux.num_clusters) == (0.3, 2, 8)
    assert isinstance(mem, MemoryProfiler) and mem.filename == "mem.json" and not mem.print_table


@pytest.mark.parametrize("fused", [False, True])
def test_dst_clock_counts_only_optimizer_steps_that_changed_the_weights(fused):
    """The DST clock's post-step hook, outside Lightning: a GradScaler step on inf gradients (skipped by the scaler,
    or for torch's fused AdamW inside the optimizer's own step) and a step without gradients do not count; finite
    steps do. The weights are the reference: the clock advances exactly when they moved."""
    dst = DynamicSparseTraining(interval=1, seed=0)
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == fused
    optimizer.register_step_post_hook(dst._count_step)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    moved = []
    for grad in (torch.ones(3), torch.tensor([1.0, float("inf"), 1.0]), None, torch.ones(3)):
        before = weight.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        if grad is None:  # what FiniteLossGuard(action="skip") leaves: no gradient at all
            optimizer.step()
        else:
            scaler.scale((weight * grad).sum()).backward()  # d/dw = grad (times the scale)
            scaler.step(optimizer)
            scaler.update()
        moved.append(not torch.equal(weight.detach(), before))
    assert moved == [True, False, False, True]
    assert dst.steps == sum(moved) == 2


def test_update_never_reads_device_values():
    """An update on a 'meta'-device layer (every read of a tensor's values fails there, see test_sparse) runs to the
    end: on a GPU it queues its work without waiting; its metrics stay pending until the device got there."""
    from types import SimpleNamespace

    layer = FixedFanInLinear(HIDDEN, OUT, FAN_IN, device="meta")
    optimizer = torch.optim.Adam(layer.parameters())
    optimizer.state[layer.weight] = {"exp_avg": torch.zeros_like(layer.weight)}
    dst = DynamicSparseTraining(interval=1, end_step=10, prune="fraction", seed=0)
    dst.layers = find_sparse_layers(nn.ModuleDict({"out": layer}))
    dst.generator = torch.Generator().manual_seed(0)
    dst.ever_active = {"out": EverActive.sampled(layer.indices, HIDDEN, max_rows=None)}
    fake = SimpleNamespace(optimizers=[optimizer], world_size=1, global_step=3, loggers=[])
    dst.update(fake, 3)
    assert dst.num_updates == 1 and dst.history == [] and len(dst._unlogged) == 1
