"""Peak training memory and its static breakdown per part of the model, like the paper's M_tr columns.

* Peak: ``torch.cuda.max_memory_allocated`` on CUDA (reset at the start of fit); on CPU the process's peak RSS
  (``VmHWM``, reset at the start of fit through ``/proc/self/clear_refs`` where Linux allows it).
* Static, per top-level submodule (encoder, intermediate, head, aux_head, ...): parameter, gradient,
  optimizer-state and buffer bytes counted from the tensors (:func:`xmc_dst.memory.static_breakdown`), taken
  after the first optimizer step (optimizer state exists) and at the end of fit (e.g. after the auxiliary head left).
* Activations are estimated as the rest: on CUDA ``peak - static``; on CPU ``peak RSS - RSS at fit start -
  (gradients + optimizer state)``, since parameters and buffers were already resident at fit start and RSS also
  holds the interpreter and libraries.

Logs ``memory/peak_mib``, ``memory/static_mib``, ``memory/activations_mib`` and ``memory/<part>_mib``; writes
``memory.json`` in the run's log directory (``memory.resumed-<n>.json`` beside it when the run continues one that
wrote it); prints a rich table at the end of fit (rank 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.loggers import log_to_loggers
from callbacks.resume import beside
from xmc_dst.memory import MIB, PartBytes, peak_rss_bytes, reset_peak_rss, rss_bytes, static_breakdown

__all__ = ["MemoryProfiler"]


class MemoryProfiler(L.Callback):
    """Measure peak training memory and the static bytes per part; log, save ``memory.json``, print a table.

    Args:
        filename: name of the JSON report in the run's log directory.
        print_table: print the rich table at the end of fit.
    """

    def __init__(self, filename: str = "memory.json", print_table: bool = True) -> None:
        super().__init__()
        self.filename, self.print_table = filename, print_table
        self.device_kind = "cpu"
        self.start_rss: int | None = None
        self.static_first: dict[str, PartBytes] = {}
        self.static_end: dict[str, PartBytes] = {}
        self.report: dict[str, Any] = {}
        self.path: Path | None = None
        self._device = torch.device("cpu")
        self._first_step_seen = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = self._device = pl_module.device  # kept: the model is back on the CPU by on_fit_end
        self.device_kind = device.type
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
            self.start_rss = rss_bytes()
        self._first_step_seen = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._first_step_seen and trainer.global_step >= 1:
            self._first_step_seen = True
            self.static_first = static_breakdown(pl_module, trainer.optimizers)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = self._peak(pl_module)
        if peak is not None:
            pl_module.log("memory/peak_mib", peak / MIB, on_step=False, on_epoch=True, rank_zero_only=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.static_end = static_breakdown(pl_module, trainer.optimizers)
        static = self.static_first or self.static_end
        peak = self._peak(pl_module)
        static_total = sum(p.static for p in static.values())
        if self.device_kind == "cuda":
            activations = None if peak is None else peak - static_total
        else:
            grown = sum(p.grads + p.optimizer for p in static.values())
            activations = None if peak is None or self.start_rss is None else peak - self.start_rss - grown
        self.report = {
            "device": self.device_kind,
            "peak_bytes": peak,
            "peak_kind": "cuda_max_memory_allocated" if self.device_kind == "cuda" else "peak_rss",
            "fit_start_rss_bytes": self.start_rss,
            "static_bytes": static_total,
            "activations_bytes_estimate": activations,
            "parts": {name: _part_dict(p) for name, p in static.items()},
            "parts_at_end": {name: _part_dict(p) for name, p in self.static_end.items()},
            "global_step": trainer.global_step,
        }
        metrics = {"memory/static_mib": static_total / MIB}
        if peak is not None:
            metrics["memory/peak_mib"] = peak / MIB
        if activations is not None:
            metrics["memory/activations_mib"] = activations / MIB
        for name, part in static.items():
            metrics[f"memory/{name}_mib"] = part.static / MIB
        self._publish(trainer, metrics)

    def _peak(self, pl_module: L.LightningModule) -> int | None:
        if self.device_kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self._device))
        return peak_rss_bytes()

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        log_to_loggers(trainer, metrics, trainer.global_step)
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = beside(directory / self.filename)  # a resumed run keeps the interrupted run's report
        self.path.write_text(json.dumps(self.report, indent=2), encoding="utf-8")
        if self.print_table:
            from rich.console import Console

            Console().print(self.table())

    def table(self) -> Any:
        """The report as a rich table (MiB)."""
        from rich.table import Table

        r = self.report
        table = Table(title=f"Training memory ({r.get('device')}, peak = {r.get('peak_kind')})")
        for column in ("part", "params", "grads", "optimizer", "buffers", "static"):
            table.add_column(column, justify="left" if column == "part" else "right")
        for name, part in r.get("parts", {}).items():
            table.add_row(name, *(f"{part[k] / MIB:,.1f}" for k in ("params", "grads", "optimizer", "buffers",
                                                                     "static")))
        table.add_row("static total", "", "", "", "", f"{r['static_bytes'] / MIB:,.1f}", style="bold")
        if r.get("activations_bytes_estimate") is not None:
            table.add_row("activations (est.)", "", "", "", "", f"{r['activations_bytes_estimate'] / MIB:,.1f}")
        if r.get("peak_bytes") is not None:
            table.add_row("peak M_tr", "", "", "", "", f"{r['peak_bytes'] / MIB:,.1f}", style="bold")
        return table


def _part_dict(part: PartBytes) -> dict[str, int]:
    return {"params": part.params, "grads": part.grads, "optimizer": part.optimizer, "buffers": part.buffers,
            "static": part.static}
