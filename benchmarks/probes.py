"""Lightning callbacks that the benchmark children attach to the runs they measure (imported in the child only).

* :class:`Timing`, :class:`SharedFeatureCache`: ``quality.py`` (epoch and test times, the validation curve; a frozen
  encoder's exact feature cache shared between the grid's runs through a file);
* :class:`StepTimer`: ``scale.py`` (the end of every training step, the machine's CPU use while timed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from xmc_dst.memory import rss_bytes, static_breakdown

__all__ = ["SharedFeatureCache", "StepTimer", "Timing", "cpu_times"]


class Timing(L.Callback):
    """Seconds of each training epoch (its validation pass included), test seconds, val P@1 after each epoch."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.curve: list[dict[str, float]] = []
        self.test_s = 0.0
        self.test_docs = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the epoch's validation has run and the module has logged its metrics by now (a callback's
        # on_validation_epoch_end runs before the module's, so it would see the previous epoch's)
        self.epochs.append(time.perf_counter() - self._start)
        metrics = trainer.callback_metrics
        if "val/P@1" in metrics:
            point = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
            point.update({k.removeprefix("val/"): float(metrics[k]) for k in ("val/P@1", "val/PSP@1")
                          if k in metrics})
            self.curve.append(point)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.test_docs += int(batch["label_offsets"].numel() - 1) if "label_offsets" in batch else 0

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_s = time.perf_counter() - self._test_start

class SharedFeatureCache(L.Callback):
    """Share a frozen encoder's pooled-vector cache between the grid's runs through a file: the vectors are a
    pure function of the tokens (exact), and the encoder pass is most of a frozen-encoder run's time. Timings
    of runs that found the file exclude that pass (the table says which)."""

    def __init__(self, path: Path) -> None:
        self.path, self.loaded = path, 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cache = getattr(pl_module.encoder, "cache", None)
        if cache is not None and self.path.exists():
            cache.update(torch.load(self.path, weights_only=False))
            self.loaded = len(cache)

    def _save(self, pl_module: L.LightningModule) -> None:
        cache = getattr(pl_module.encoder, "cache", None)
        if cache is not None and len(cache) > self.loaded:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            torch.save(dict(cache), partial)
            partial.replace(self.path)
            self.loaded = len(cache)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(pl_module)


class StepTimer(L.Callback):
    """Wall-clock end of every training batch (after its optimizer step) and the CPU use while timed."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.ends: list[float] = []
        self.docs: list[int] = []
        self.losses: list[float] = []
        self.cpu: list[tuple[float, float, float]] = []
        self.static: dict[str, Any] = {}
        self.fit_start_rss: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.fit_start_rss = rss_bytes()
        self.begin = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.docs.append(int(batch["input_ids"].shape[0]))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if len(self.ends) in (self.warmup, self.warmup + self.steps):
            self.cpu.append(cpu_times())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.static = static_breakdown(pl_module, trainer.optimizers)


def cpu_times() -> tuple[float, float, float]:
    """(busy seconds of the whole machine, of this process, steal seconds) from /proc (0s where absent)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        steal = fields[7] if len(fields) > 7 else 0
        busy = sum(fields[:8]) - idle - steal
        own = [int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:15]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0, 0.0
    return busy / tick, sum(own) / tick, steal / tick  # utime, stime, cutime, cstime of this process
