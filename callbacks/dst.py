"""Dynamic sparse training (DST) of fixed fan-in layers as a Lightning callback.

Every ``interval`` optimizer steps the callback prunes weak connections of every fixed fan-in layer and regrows as
many elsewhere, so each label keeps exactly ``fan_in`` inputs while the set of inputs moves to where it helps
(SET/RigL; the SPARTEX paper rewires its classifier head this way).

The schedule is keyed on optimizer steps that were applied (``steps``), so gradient accumulation and data
parallelism give the same schedule, and it runs in ``on_train_batch_end`` once the step has advanced, i.e. after the
optimizer step, so pruning sees the updated weights. Updates happen at ``start + n * interval`` (n >= 1) while the
step is below ``end * estimated_stepping_batches`` (the authors stop at 0.66 of training). ``steps`` equals
``trainer.global_step`` except for steps that changed nothing: the ``16-mixed`` gradient scaler skips the optimizer
step on inf/NaN gradients (and :class:`~callbacks.guard.FiniteLossGuard` with ``action="skip"`` drops every
gradient), yet Lightning counts the step. Such a step neither advances the DST clock nor rewires (gradient regrowth
would rank inputs by inf gradients); the update that was due waits for the next applied step. Applied steps are
counted by a post-hook on every optimizer of the trainer, which runs only when ``optimizer.step`` ran (the scaler
does not call it on overflow) and counts it only if some parameter had a gradient and, for optimizers that take
the scaler's skip into their own step (``_step_supports_amp_scaling``, e.g. torch's fused AdamW), the scaler found
no inf. Loggers get ``trainer.global_step`` as the step of an update, ``history`` the DST step.

* Pruning, ``threshold`` (the authors'): drop ``|w| < tau(t)`` with ``tau`` cosine-annealed from ``threshold`` to
  ``threshold_floor`` over the rewiring period (their ``CosineDecay``: ``CosineAnnealingLR`` with
  ``eta_min=1e-4`` stepped once per optimizer step). ``fraction``: drop the ``round(f(t) * fan_in)`` weakest
  weights per row with ``f(t) = f1 + (f0 - f1) / 2 * (1 + cos(pi * t / T))``, from ``drop_fraction`` (f0) to
  ``drop_fraction_floor`` (f1): RigL's schedule with the default floor 0, a constant fraction with f1 = f0 (the
  SPARTEX authors' fraction pruning on LF data). ``t`` counts steps from ``start``, ``T`` is the length of the
  rewiring period.
* Regrowth, ``random`` (SET, the paper's): the layer's own ``rewire``. ``gradient`` (RigL): the same ``rewire``
  given :class:`xmc_dst.regrowth.GradientScores` of the update step's batch, so that it grows the unconnected inputs
  with the largest ``|dL/dW|``, computed in label blocks from the layer input and output gradient captured by hooks
  registered only for that step (see there for the cost). New weights start at zero; optimizer state follows the
  surviving connections and is zeroed at the regrown slots in every optimizer of the trainer.
* On a GPU an update never waits for the device: pruning, regrowth (from device generators seeded by the
  callback's CPU stream), the optimizer-state reset and the ITOP map stay there, and the logged metrics are copied
  back asynchronously and logged (with their step) at a later batch end once the device got there, or at the end
  of training; ``dst/update_seconds`` is then the device time between the update's start and end.
* DDP: all ranks draw from one random stream (seeded identically, the seed broadcast from rank 0) and the gradient
  variant gathers every rank's activations first, so each rank computes the same topology from identical weights;
  with ``verify_sync`` a checksum of indices and weights is compared across ranks after each update.

The layers are found by duck typing: any submodule with ``rewire``, ``reset_optimizer_state`` and ``indices``
(see :class:`xmc_dst.sparse.FixedFanInLinear` for the protocol: ``rewire(mode, amount, generator, init,
candidates=None)`` returns a result with ``regrown`` and ``num_pruned`` that ``reset_optimizer_state(optimizer,
result)`` takes; ``indices`` holds the rows the checksum and the ITOP map read); ``gradient`` also uses
``in_features``, ``out_features`` and a forward ``[..., in_features] -> [..., out_features]``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from callbacks.loggers import log_to_loggers
from xmc_dst.optim import cosine_decay
from xmc_dst.regrowth import GRADIENT_CHUNK_ELEMENTS, EverActive, GradientScores

log = logging.getLogger(__name__)

__all__ = ["DynamicSparseTraining", "find_sparse_layers"]


def find_sparse_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule offering the rewiring protocol (``rewire``, ``reset_optimizer_state``, ``indices``), except
    those whose topology is fixed on purpose (``static_topology = True``, e.g. connections chosen from the data)."""
    return [(name, m) for name, m in module.named_modules()
            if callable(getattr(m, "rewire", None)) and callable(getattr(m, "reset_optimizer_state", None))
            and isinstance(getattr(m, "indices", None), Tensor) and not getattr(m, "static_topology", False)]


class _Capture:
    """Forward/backward hooks that keep a layer's inputs and output gradients for one optimizer step."""

    def __init__(self, layer: nn.Module) -> None:
        self.records: list[list[Tensor | None]] = []
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return
        record: list[Tensor | None] = [inputs[0].detach().reshape(-1, inputs[0].shape[-1]), None]
        self.records.append(record)

        def keep(grad: Tensor) -> None:
            record[1] = grad.detach().reshape(-1, grad.shape[-1])

        output.register_hook(keep)

    def tensors(self) -> tuple[Tensor, Tensor] | None:
        pairs = [(x, dy) for x, dy in self.records if dy is not None]
        if not pairs:
            return None
        return torch.cat([x for x, _ in pairs]), torch.cat([dy for _, dy in pairs])

    def remove(self) -> None:
        self.handle.remove()
        self.records.clear()


def _all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate ``t`` [n_r, d] of every rank in rank order (``n_r`` may differ between ranks)."""
    world = dist.get_world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class DynamicSparseTraining(L.Callback):
    """Prune and regrow the connections of every fixed fan-in layer on a step schedule.

    Args:
        interval: optimizer steps between updates (the authors: 300-800 depending on the dataset).
        start: first step of the rewiring period; updates at ``start + n * interval``, ``n >= 1``.
        end: end of the rewiring period as a fraction of ``trainer.estimated_stepping_batches`` (exclusive).
        end_step: end as an absolute optimizer step (overrides ``end``; needed when training length is unknown).
        prune: ``threshold`` (cosine-decayed magnitude threshold) or ``fraction`` (cosine-decayed drop fraction).
        threshold: initial threshold of ``threshold`` pruning (the authors: 0.01).
        threshold_floor: value the threshold decays to at the end of the period (the authors: 1e-4).
        drop_fraction: initial drop fraction of ``fraction`` pruning (RigL: 0.3) ...
        drop_fraction_floor: ... cosine-decayed to this at the end of the period (RigL: 0; ``drop_fraction``:
            constant).
        regrow: ``random`` (SET) or ``gradient`` (RigL, from the dense gradient of the update step's batch).
        gradient_chunk_elements: size of one block of the dense gradient in the ``gradient`` variant.
        seed: seed of the regrowth random stream (None: drawn from torch's global generator on rank 0).
        track_itop: keep the bit-packed ever-active map and log the in-time over-parameterisation rate.
        itop_rows: track at most this many rows (a fixed random sample; the rate is then an estimate, see
            :class:`~xmc_dst.regrowth.EverActive`); None tracks every row (670K x 768: a 64 MB map).
        verify_sync: under DDP, check after every update that all ranks hold the same indices and weights.
    """

    def __init__(self, interval: int = 800, start: int = 0, end: float = 0.66, end_step: int | None = None,
                 prune: Literal["threshold", "fraction"] = "threshold", threshold: float = 0.01,
                 threshold_floor: float = 1e-4, drop_fraction: float = 0.3, drop_fraction_floor: float = 0.0,
                 regrow: Literal["random", "gradient"] = "random",
                 gradient_chunk_elements: int = GRADIENT_CHUNK_ELEMENTS, seed: int | None = None,
                 track_itop: bool = True, itop_rows: int | None = 65_536, verify_sync: bool = True) -> None:
        super().__init__()
        if interval < 1 or start < 0:
            raise ValueError("interval must be >= 1 and start >= 0")
        if prune not in ("threshold", "fraction"):
            raise ValueError(f"prune must be 'threshold' or 'fraction', got {prune!r}")
        if regrow not in ("random", "gradient"):
            raise ValueError(f"regrow must be 'random' or 'gradient', got {regrow!r}")
        if not 0.0 < end <= 1.0:
            raise ValueError(f"end must be a fraction of training in (0, 1], got {end}")
        if not 0.0 <= drop_fraction_floor <= drop_fraction <= 1.0 or threshold < 0 or threshold_floor < 0:
            raise ValueError("need 0 <= drop_fraction_floor <= drop_fraction <= 1 and non-negative thresholds, got "
                             f"drop_fraction={drop_fraction}, drop_fraction_floor={drop_fraction_floor}, "
                             f"threshold={threshold}, threshold_floor={threshold_floor}")
        self.interval, self.start, self.end = interval, start, end
        self._fixed_end = end_step
        self.end_step: int | None = end_step  # resolved at the start of training when given as a fraction
        self.prune, self.regrow = prune, regrow
        self.threshold, self.threshold_floor, self.drop_fraction = threshold, threshold_floor, drop_fraction
        self.drop_fraction_floor = drop_fraction_floor
        self.gradient_chunk_elements, self.seed = gradient_chunk_elements, seed
        self.track_itop, self.itop_rows, self.verify_sync = track_itop, itop_rows, verify_sync
        self.layers: list[tuple[str, nn.Module]] = []
        self.generator: torch.Generator | None = None
        self.ever_active: dict[str, EverActive] = {}
        self.num_updates = 0
        self.last_update_step = -1
        self.steps = 0  # applied optimizer steps: the DST clock (checkpointed)
        self._steps_restored = False
        self._seen_global_step = 0
        self._step_hooks: list[Any] = []
        self.history: list[dict[str, float]] = []  # one entry per update on this process (not checkpointed)
        self._unlogged: list[_PendingMetrics] = []  # updates whose metrics are still on their way from the device
        self._captures: dict[str, _Capture] = {}
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ schedule

    @property
    def metric_name(self) -> str:
        return "dst/threshold" if self.prune == "threshold" else "dst/drop_fraction"

    def _period(self) -> int:
        if self.end_step is None:
            raise RuntimeError("the end of the rewiring period is known once training starts (or pass end_step)")
        return max(1, self.end_step - self.start)

    def amount_at(self, step: int) -> float:
        """Threshold or drop fraction used by an update at optimizer step ``step``."""
        t, total = step - self.start, self._period()
        if self.prune == "threshold":
            return cosine_decay(self.threshold, self.threshold_floor, t, total)
        return cosine_decay(self.drop_fraction, self.drop_fraction_floor, t, total)

    def is_update_step(self, step: int) -> bool:
        """Whether the topology is updated right after optimizer step ``step``."""
        return (step > self.start and (step - self.start) % self.interval == 0
                and self.end_step is not None and step < self.end_step)

    # ------------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.layers = find_sparse_layers(pl_module)
        if not self.layers:
            raise ValueError("DynamicSparseTraining found no layer with rewire/reset_optimizer_state/indices")
        if self.regrow == "gradient":
            for name, layer in self.layers:
                if not (hasattr(layer, "in_features") and hasattr(layer, "out_features")):
                    raise ValueError(f"regrow='gradient' needs `in_features` and `out_features` on layer {name!r}")
        seed = self.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        seed = int(trainer.strategy.broadcast(seed, src=0))  # one random stream on every rank
        self.generator = torch.Generator().manual_seed(seed)
        if self._pending is not None:
            self._apply_state(self._pending)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._steps_restored:  # a fresh run, or a checkpoint saved before the DST clock existed
            self.steps = trainer.global_step
        self._seen_global_step = trainer.global_step
        self._remove_step_hooks()
        self._step_hooks = [optimizer.register_step_post_hook(self._count_step) for optimizer in trainer.optimizers]
        if self._fixed_end is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("the length of training is unknown (max_steps=-1, no max_epochs); set end_step")
            self.end_step = int(self.end * total)
        if self.track_itop:
            for name, layer in self.layers:
                if name not in self.ever_active:
                    self.ever_active[name] = EverActive.sampled(layer.indices, _in_features(layer), self.itop_rows)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The batch feeds DST step steps + 1 (if applied): capture it only when that step is an update step.
        if self.regrow == "gradient" and not self._captures and self.is_update_step(self.steps + 1):
            self._captures = {name: _Capture(layer) for name, layer in self.layers}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._seen_global_step:
            return  # no optimizer step yet (gradient accumulation)
        self._seen_global_step = trainer.global_step
        self.log_finished_updates(trainer)
        step = self.steps
        if step > self.last_update_step and self.is_update_step(step):
            self.update(trainer, step)
        self._drop_captures()  # a skipped step's capture holds inf gradients: capture again for the next step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_finished_updates(trainer, wait=True)
        self._drop_captures()
        self._remove_step_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.log_finished_updates(trainer)
        self._drop_captures()
        self._remove_step_hooks()

    def _count_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer post-step hook: advance the DST clock if the step changed something (see the module doc)."""
        if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            return  # every gradient dropped (FiniteLossGuard's skip): the weights did not move
        found_inf = getattr(optimizer, "found_inf", None)
        if getattr(optimizer, "_step_supports_amp_scaling", False) and isinstance(found_inf, Tensor):
            if bool(found_inf.any()):  # the optimizer skipped the update inside its own step
                return
        self.steps += 1

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # ------------------------------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, trainer: L.Trainer, step: int) -> None:
        """Prune and regrow every layer now with the schedule's value at ``step``.

        Its metrics reach ``history`` and the loggers at once on CPU; on a GPU once the device has done the work
        (:meth:`log_finished_updates`), so that the update itself never waits for the device.
        """
        pending = _PendingMetrics(step, trainer.global_step, self.layers[0][1].indices.device)
        amount = self.amount_at(step)
        counts: dict[str, Tensor] = {}
        regrown_total: Tensor | int = 0
        ever_total: Tensor | int = 0
        slots_total = possible_total = 0
        for name, layer in self.layers:
            result = self._rewire(trainer, name, layer, amount)
            for optimizer in trainer.optimizers:
                layer.reset_optimizer_state(optimizer, result)
            regrown = result.regrown.sum().double()
            regrown_total = regrown_total + regrown
            slots_total += result.regrown.numel()
            if len(self.layers) > 1:
                counts[f"dst/{name}/regrown_fraction"] = regrown / max(1, result.regrown.numel())
            if self.track_itop:
                tracker = self.ever_active[name]
                tracker.add(layer.indices, only=result.regrown)
                ever_total = ever_total + tracker.count.double()
                possible_total += tracker.possible
                if len(self.layers) > 1:
                    counts[f"dst/{name}/itop_rate"] = tracker.count.double() / max(1, tracker.possible)
        self._drop_captures()
        if self.verify_sync:
            self._check_ranks_agree(trainer)
        self.num_updates += 1
        self.last_update_step = step
        counts["dst/regrown_fraction"] = regrown_total / max(1, slots_total)
        if self.track_itop:
            counts["dst/itop_rate"] = ever_total / max(1, possible_total)
        self._unlogged.append(pending.finish({self.metric_name: amount}, counts))
        if pending.device.type == "cpu":
            self.log_finished_updates(trainer, wait=True)

    def log_finished_updates(self, trainer: L.Trainer, wait: bool = False) -> None:
        """Append to ``history`` and log the metrics of every update whose device work has finished (all with
        ``wait``), in update order."""
        while self._unlogged and (wait or self._unlogged[0].ready()):
            pending = self._unlogged.pop(0)
            metrics = pending.values()
            self.history.append({"step": float(pending.step), **metrics})
            log_to_loggers(trainer, metrics, pending.global_step)

    def _rewire(self, trainer: L.Trainer, name: str, layer: nn.Module, amount: float):
        candidates = self._gradient_scores(trainer, name, layer) if self.regrow == "gradient" else None
        return layer.rewire(self.prune, amount, generator=self.generator, init="zero", candidates=candidates)

    def _gradient_scores(self, trainer: L.Trainer, name: str, layer: nn.Module) -> GradientScores | None:
        """The update step's gradient scores (every rank's rows under DDP); None without a captured batch."""
        captured = self._captures[name].tensors() if name in self._captures else None
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if captured is None and not distributed:
            log.warning("DST: no gradient captured for %s at this update; regrowing at random", name)
            return None
        x, dy = captured if captured is not None else (None, None)
        if distributed:
            if x is None:  # keep the collectives matched: a rank without a batch contributes no rows
                x = layer.weight.new_zeros(0, int(layer.in_features))
                dy = layer.weight.new_zeros(0, int(layer.out_features))
            x, dy = _all_gather_rows(x), _all_gather_rows(dy)
        return GradientScores(x, dy, self.gradient_chunk_elements)

    def _drop_captures(self) -> None:
        for capture in self._captures.values():
            capture.remove()
        self._captures = {}

    def _check_ranks_agree(self, trainer: L.Trainer) -> None:
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        sums = []
        for _, layer in self.layers:  # per-row sums weighted by the row number: O(rows) temporaries
            rows = torch.arange(1, layer.indices.shape[0] + 1, device=layer.indices.device, dtype=torch.float64)
            idx_rows = layer.indices.double().sum(1)
            w_rows = layer.weight.detach().double().reshape(layer.indices.shape[0], -1).sum(1)  # a row's weights
            sums += [idx_rows.sum(), (idx_rows * rows).sum(), (w_rows * rows).sum()]
        local = torch.stack(sums)
        gathered = trainer.strategy.all_gather(local)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError("DynamicSparseTraining: ranks disagree on the sparse topology or weights after an "
                               "update (non-deterministic kernels or a different random stream on some rank)")

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state() if self.generator is not None else None,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "steps": self.steps,
            "end_step": self.end_step,
            "ever_active": {name: tracker.state_dict() for name, tracker in self.ever_active.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.generator is None:  # restored before setup: apply once the generator exists
            self._pending = state_dict
            self.num_updates = int(state_dict["num_updates"])
            self.last_update_step = int(state_dict["last_update_step"])
            self._restore_steps(state_dict)
            return
        self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self.num_updates = int(state["num_updates"])
        self.last_update_step = int(state["last_update_step"])
        self._restore_steps(state)
        self.ever_active = {name: EverActive.from_state_dict(s) for name, s in state.get("ever_active", {}).items()}
        self._pending = None

    def _restore_steps(self, state: dict[str, Any]) -> None:
        """Older checkpoints have no DST clock: on_train_start then takes it from the restored global step."""
        if "steps" in state:
            self.steps, self._steps_restored = int(state["steps"]), True


class _PendingMetrics:
    """One update's metrics: host values, and device counts copied back to the host without waiting.

    On CUDA the counts go into pinned host memory with a non-blocking copy behind an event, and the update's device
    time is measured between two events; elsewhere they are read when asked for (on CPU that costs nothing).
    """

    def __init__(self, step: int, global_step: int, device: torch.device) -> None:
        self.step, self.global_step, self.device = step, global_step, device
        self.began = time.perf_counter()
        self.host: dict[str, float] = {}
        self.names: list[str] = []
        self.counts: Tensor | None = None
        self.start_event = self.end_event = None
        if device.type == "cuda":
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()

    def finish(self, host: dict[str, float], counts: dict[str, Tensor]) -> _PendingMetrics:
        self.host, self.names = host, list(counts)
        values = torch.stack([v.reshape(()).double() for v in counts.values()])
        if self.end_event is not None:
            self.counts = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.counts.copy_(values, non_blocking=True)
            self.end_event.record()
        else:
            self.counts = values
            self.seconds = time.perf_counter() - self.began
        return self

    def ready(self) -> bool:
        return self.end_event is None or self.end_event.query()

    def values(self) -> dict[str, float]:
        if self.end_event is not None:
            self.end_event.synchronize()  # at once when ready(); only a waiting flush (end of training) blocks
            self.seconds = self.start_event.elapsed_time(self.end_event) / 1000.0
        counts = dict(zip(self.names, self.counts.tolist(), strict=True))
        return {**self.host, **counts, "dst/update_seconds": self.seconds}


def _in_features(layer: nn.Module) -> int:
    if hasattr(layer, "in_features"):
        return int(layer.in_features)
    raise ValueError(f"{type(layer).__name__} has no in_features")

