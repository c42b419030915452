"""What an exact resume needs beyond Lightning's own checkpoint: the global random states and a periodic,
atomically written ``last.ckpt``.

Lightning checkpoints the model, optimizers, schedulers, loops and callback states, and (through
``state_dict``/``load_state_dict`` of the training DataLoader, see :class:`datamodules.base.ResumableDataLoader`)
the position inside an epoch. It does not checkpoint the global random generators (python ``random``, numpy,
torch CPU and CUDA), so a resumed run would draw other dropout masks than an uninterrupted one:
:class:`RandomStateCheckpoint` adds them. Lightning 2.x hands the loader its state only while it builds the
training loader after the checkpoint was read, which never happens when ``configure_optimizers`` asked for
``trainer.estimated_stepping_batches`` (that builds the loader first; every module with a step schedule does):
:class:`RestoreLoaderPosition` hands it over at ``on_train_start``. :class:`LastCheckpoint` writes ``last.ckpt``
every ``N`` optimizer steps (mid-epoch) for ``fit --ckpt_path last``, through a temporary file in the same
directory and an atomic rename, so a process killed while writing leaves the previous ``last.ckpt`` whole.

A resumed run keeps the history of the run it continues. Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it
reopens a version folder; :class:`LastCheckpoint` flushes the loggers before each save and records how many rows
``metrics.csv`` then held, and :func:`keep_log_history` (called by ``xmc-dst fit --ckpt_path``) puts back those
rows, and the later ones of steps before the checkpoint's (logged after the save, never replayed), before the
resumed run appends; rows the interrupted run logged at or after the checkpoint's step are replayed and dropped.
Other files of a run (``config.yaml``, ``memory.json``) are never overwritten: :func:`beside` names the resumed
run's copy.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)

__all__ = ["LastCheckpoint", "RandomStateCheckpoint", "RestoreLoaderPosition", "beside", "collect_random_states",
           "keep_log_history", "set_random_states"]

DEFAULT_EVERY_N_TRAIN_STEPS = 500


def collect_random_states() -> dict[str, Any]:
    """This process's global random states as plain data (loadable with ``torch.load(weights_only=True)``)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_random_states` returned (CUDA states only where as many devices are visible)."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("RandomStateCheckpoint: the checkpoint has %d CUDA random states, %d devices are visible; "
                        "CUDA random states not restored", len(cuda), torch.cuda.device_count())


class RandomStateCheckpoint(L.Callback):
    """Checkpoint the global random states of every rank; restore them right before the first training batch after
    a resume, so that dropout and any other draw from the global generators continue as in an uninterrupted run.

    Restoring at the first ``on_train_batch_start`` rather than at load time skips whatever the resumed process
    draws while it sets up (building the model, sanity validation, creating data loader iterators), which the
    uninterrupted run drew before the checkpoint was written. Every rank gets its own state back when the world
    size is unchanged; otherwise every rank takes rank 0's (with a warning).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": [collect_random_states()]}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Every rank dumps the checkpoint (rank 0 writes it): gather each rank's states into it.
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, collect_random_states())
            checkpoint.setdefault("callbacks", {})[self.state_key] = {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict.get("ranks") or []) or None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        rank = trainer.global_rank
        if len(ranks) != trainer.world_size:
            log.warning("RandomStateCheckpoint: the checkpoint holds %d ranks' random states, this run has %d; "
                        "every rank takes rank 0's", len(ranks), trainer.world_size)
            rank = 0
        set_random_states(ranks[rank])


class RestoreLoaderPosition(L.Callback):
    """Give the training loaders the states the checkpoint holds for them when Lightning did not.

    Lightning 2.x loads the checkpointed loader states (``fit_loop`` state ``combined_loader``) only in
    ``FitLoop.setup_data``, and only if that builds the loaders after the checkpoint was read; when
    ``configure_optimizers`` calls ``trainer.estimated_stepping_batches`` the loaders were built before, the states
    stay unused and the resumed epoch starts over with a new order. At ``on_train_start`` (after the restore, before
    the first batch) this loads them and re-creates the loader iterators, so that a stateful loader (such as
    :class:`datamodules.base.ResumableDataLoader`) serves the rest of the interrupted epoch.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        combined = getattr(fit_loop, "_combined_loader", None)
        fetcher = getattr(fit_loop, "_data_fetcher", None)
        if not states or combined is None:
            return  # nothing pending: Lightning loaded them itself, or there were none
        if fetcher is None:
            log.warning("RestoreLoaderPosition: this Lightning version's fit loop has no data fetcher; the training "
                        "loaders' states are not restored")
            return
        from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

        progress = fit_loop.epoch_loop.batch_progress.current
        if progress.ready >= trainer.num_training_batches:  # saved at an epoch end (limit_train_batches: early)
            states = [{**state, "batches": state["length"]} if {"batches", "length"} <= set(state) else state
                      for state in states]
        combined._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []
        for loader in combined.flattened:  # the iterators were made before the states: make them again
            _shutdown_workers_and_reset_iterator(loader)
        iter(fetcher)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` only (no top-k), every ``every_n_train_steps`` optimizer steps, also mid-epoch, and at the end
    of training; found by ``trainer.fit(ckpt_path="last")`` / ``xmc-dst fit --ckpt_path last``.

    On a local file system the checkpoint is written to ``last.ckpt.partial`` in the same directory and renamed
    over ``last.ckpt`` (``os.replace``, atomic on POSIX): Lightning's own atomic save writes through the system
    temporary directory and falls back to a plain copy, which is not atomic, when that lies on another file system
    than the logs.

    Args:
        every_n_train_steps: optimizer steps between two saves (default 500).
        dirpath: where to write (default: the logger's ``<save_dir>/<name>/<version>/checkpoints``).
    """

    def __init__(self, every_n_train_steps: int = DEFAULT_EVERY_N_TRAIN_STEPS, dirpath: str | None = None) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, monitor=None, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)
        self._log_rows: list[int | None] = []
        self._flush_pending = self._finished = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_rows": self._log_rows, "finished": self._finished}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Lightning logs a batch's metrics after its on_train_batch_end, i.e. after a save there: write them too,
        # so that a process killed later has them on disk.
        if self._flush_pending:
            self._flush_pending = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state, marked finished (Lightning's own save-last here only runs when nothing was saved at
        all, so ``last.ckpt`` lagged behind the end of a finished run). Never under
        ``fast_dev_run`` ("checkpointing is suppressed"; with its dummy logger last.ckpt would land in the working
        directory)."""
        if not trainer.fast_dev_run:
            self._finished = True  # what the run logs from now on (tests, reports) is never replayed by a resume
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._log_rows, self._flush_pending = flush_loggers(trainer), True
        if not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)  # on rank 0, with a barrier
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


# ---------------------------------------------------------------------------------------------- run history


def beside(path: str | Path) -> Path:
    """``path`` if it is free, else ``<stem>.resumed-<n><suffix>`` beside it with the first free ``n``: a resumed
    run writes its own copy and keeps the file of the run it continues."""
    path = Path(path)
    if not path.exists():
        return path
    n = 1
    while (candidate := path.with_name(f"{path.stem}.resumed-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def flush_loggers(trainer: L.Trainer) -> list[int | None]:
    """Write every logger's buffered metrics to disk; per logger, the data rows of its ``metrics.csv`` after the
    flush (None for other loggers, or where there is no file yet)."""
    rows: list[int | None] = []
    for logger in trainer.loggers:
        logger.save()  # rank 0 only (rank_zero_only in Lightning's loggers)
        path = Path(logger.experiment.metrics_file_path) if isinstance(logger, CSVLogger) and trainer.is_global_zero \
            else None
        rows.append(len(_read_csv(path)[1]) if path is not None and path.is_file() else None)
    return rows


def _last_checkpoint_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(LastCheckpoint.__name__) and isinstance(state, Mapping):
            return state
    return {}


def keep_log_history(trainer: L.Trainer, checkpoint: Mapping[str, Any]) -> list[Path]:
    """Before ``trainer.fit(ckpt_path=...)`` opens its loggers: keep in each ``CSVLogger``'s ``metrics.csv`` the
    rows the interrupted run wrote before ``checkpoint`` was saved (as many as it recorded), and those of earlier
    steps than the checkpoint's ``global_step`` logged after it; drop the rest, which the resumed run logs again.
    Every row is kept after a checkpoint saved at the end of training (nothing after it is replayed). Returns the
    files kept (rank 0; nothing elsewhere)."""
    if not trainer.is_global_zero:
        return []
    state = _last_checkpoint_state(checkpoint)
    step = float("inf") if state.get("finished") else int(checkpoint.get("global_step", 0))
    recorded = list(state.get("log_rows") or [])
    kept: list[Path] = []
    for index, logger in enumerate(trainer.loggers):
        path = Path(logger.log_dir, "metrics.csv") if isinstance(logger, CSVLogger) else None
        if path is None or not path.is_file():
            continue
        fields, rows = _read_csv(path)
        before = recorded[index] if index < len(recorded) and recorded[index] is not None else 0
        rows = rows[:before] + [row for row in rows[before:] if _step(row) < step]
        experiment = logger.experiment  # Lightning deletes the old metrics.csv here
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        experiment.metrics_keys = sorted(fields)  # new rows append; a new column rewrites the file with them
        log.info("resuming: kept %d rows of %s (steps before %s)", len(rows), path, step)
        kept.append(path)
    return kept


def _step(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")
