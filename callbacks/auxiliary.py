"""The auxiliary objective of SPARTEX: a meta-classifier over label clusters that steadies early sparse training.

The loss is ``(1 - alpha) * main + alpha * aux`` with ``alpha`` cosine-annealed from its initial value (the paper:
0.4) to 0 at a cutoff step; there the auxiliary head is removed for good (parameters and optimizer state freed, no
more compute). This callback owns the schedule and the clusters; the module owns the head and the loss, through a
small protocol (:class:`AuxiliaryModule`), which :class:`xmc_dst.model.XMCModule` implements.

Schedule (the authors' ``CosineDecay(alpha, T, eta_min=0)`` stepped after every optimizer step): the training step
that produces optimizer step ``t + 1`` uses ``alpha(t) = alpha0 / 2 * (1 + cos(pi * t / T))`` for ``t < T``;
``T`` is ``cutoff_step`` or ``cutoff_epoch`` epochs of optimizer steps. At ``t >= T`` the head is removed.

Clusters come from ``cluster_file`` (see :func:`xmc_dst.clusters.load_cluster_file`) or are built from the
training data by :mod:`xmc_dst.clusters` and cached as an int64 ``.npy`` assignment beside the data.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from xmc_dst.clusters import CLUSTER_FIX, balanced_kmeans_tree, label_embeddings, load_cluster_file, save_assignment

log = logging.getLogger(__name__)

__all__ = ["AuxiliaryModule", "AuxiliaryObjective"]

CLUSTER_FORMAT_VERSION = 1


@runtime_checkable
class AuxiliaryModule(Protocol):
    """What a LightningModule offers to :class:`AuxiliaryObjective`.

    * ``aux_head``: the meta-classifier module, ``None`` once removed;
    * ``aux_alpha``: float weight of the auxiliary loss, read by ``training_step`` to form
      ``(1 - aux_alpha) * main + aux_alpha * aux`` (a module may skip the auxiliary forward at 0;
      ``XMCModule`` keeps it while the head exists, so that DDP sees a gradient for every parameter);
    * ``remove_aux_head()``: drop the head, its parameters from every optimizer (state included);
    * ``set_label_clusters(assignment)``: install a label -> cluster int64 assignment [num_labels]
      (needed only when the callback reads or builds clusters); ``label_clusters``, the current assignment.

    Optionally ``training_step`` returns ``{"loss": ..., "aux_loss": ...}``; otherwise the callback reads the
    logged ``train/aux_loss``.
    """

    aux_head: nn.Module | None
    aux_alpha: float

    def remove_aux_head(self) -> None: ...


class AuxiliaryObjective(L.Callback):
    """Cosine-anneal the auxiliary loss weight to 0 at a cutoff, then remove the auxiliary head.

    Args:
        alpha: initial weight of the auxiliary loss (the paper: 0.4).
        cutoff_epoch: epoch at whose start the head is removed (the authors: 5-15); or
        cutoff_step: optimizer step at which it is removed (exactly one of the two).
        cluster_file: label clusters (``label_group*.npy`` form, a 2-D array or an assignment).
        build_clusters: without ``cluster_file``, build clusters from the training data (unless the module was
            configured with its own ``aux_cluster_file``); False keeps the module's assignment.
        num_clusters: number of clusters to build (default: the auxiliary head's outputs).
        embedding_dim: dimension of the projected label embeddings used for clustering.
        kmeans_iterations: maximum 2-means iterations per tree level.
        cache_dir: where built clusters are cached (default: beside the data, see :meth:`cache_directory`).
        seed: seed of the projection and of the 2-means initialisation.
    """

    def __init__(self, alpha: float = 0.4, cutoff_epoch: int | None = None, cutoff_step: int | None = None,
                 cluster_file: str | None = None, build_clusters: bool = True, num_clusters: int | None = None,
                 embedding_dim: int = 128, kmeans_iterations: int = 10, cache_dir: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if (cutoff_epoch is None) == (cutoff_step is None):
            raise ValueError("set exactly one of cutoff_epoch and cutoff_step")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if cluster_file and not Path(cluster_file).expanduser().is_file():  # fail when the config is read
            raise FileNotFoundError(f"AuxiliaryObjective: cluster_file {cluster_file} does not exist; {CLUSTER_FIX}")
        self.alpha, self.cutoff_epoch, self.cutoff_step = alpha, cutoff_epoch, cutoff_step
        self.cluster_file, self.build_clusters, self.num_clusters = cluster_file, build_clusters, num_clusters
        self.embedding_dim, self.kmeans_iterations, self.cache_dir, self.seed = (embedding_dim, kmeans_iterations,
                                                                                  cache_dir, seed)
        self.total_steps: int | None = cutoff_step
        self.removed_at_step: int | None = None
        self.current_alpha = alpha
        self.cluster_source: str | None = None
        self.build_seconds: float | None = None
        self._step = 0
        self._aux_values: list[float] = []

    # ------------------------------------------------------------------------------------------ schedule

    def alpha_at(self, step: int) -> float:
        """Weight of the auxiliary loss in the training step that produces optimizer step ``step + 1``."""
        if self.total_steps is None:
            raise RuntimeError("the cutoff step is known once training starts (or pass cutoff_step)")
        if step >= self.total_steps:
            return 0.0
        return self.alpha * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))

    # ------------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        missing = [name for name in ("aux_head", "aux_alpha", "remove_aux_head") if not hasattr(pl_module, name)]
        if missing:
            raise TypeError(f"AuxiliaryObjective needs a module with {', '.join(missing)} (see AuxiliaryModule)")
        if getattr(pl_module, "aux_head", None) is None:
            log.warning("AuxiliaryObjective: the module has no auxiliary head; nothing to schedule")
            return
        assignment = None
        if self.cluster_file:
            assignment = load_cluster_file(self.cluster_file, _num_labels(trainer, pl_module),
                                           getattr(trainer.datamodule, "label_names", None))
            self.cluster_source = self.cluster_file
        elif self.build_clusters and not _module_has_cluster_file(pl_module):
            assignment = self._clusters_on_rank_zero(trainer, pl_module)
        if assignment is not None:
            if not callable(getattr(pl_module, "set_label_clusters", None)):
                raise TypeError("AuxiliaryObjective needs set_label_clusters() on the module to install clusters")
            pl_module.set_label_clusters(assignment)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cutoff_step is None:
            steps_per_epoch = math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
            self.total_steps = max(1, int(self.cutoff_epoch * steps_per_epoch))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = self._step = trainer.global_step
        self.current_alpha = self.alpha_at(step)
        if self.current_alpha <= 0.0 or getattr(pl_module, "aux_head", None) is None:
            self.current_alpha = 0.0
            if getattr(pl_module, "aux_head", None) is not None:
                self._remove(trainer, pl_module, step)
        pl_module.aux_alpha = self.current_alpha

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.current_alpha > 0.0:
            aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
            if aux is None:
                aux = trainer.callback_metrics.get("train/aux_loss")
            if aux is not None:
                self._aux_values.append(float(aux))
        if trainer.global_step > self._step:  # last micro-batch of the optimizer step
            if self._step % max(1, trainer.log_every_n_steps) == 0:
                metrics = {"aux/alpha": self.current_alpha}
                if self._aux_values:
                    metrics["aux/loss"] = sum(self._aux_values) / len(self._aux_values)
                _log(trainer, metrics, self._step)
            self._aux_values = []

    def _remove(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        pl_module.remove_aux_head()
        _rewrap_ddp(trainer)
        self.removed_at_step = step
        log.info("AuxiliaryObjective: auxiliary head removed at step %d", step)

    def state_dict(self) -> dict[str, Any]:
        return {"removed_at_step": self.removed_at_step, "cluster_source": self.cluster_source}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.removed_at_step = state_dict.get("removed_at_step")
        self.cluster_source = state_dict.get("cluster_source")

    # ------------------------------------------------------------------------------------------ clusters

    def cache_directory(self, trainer: L.Trainer) -> Path:
        """``cache_dir``; else the text DataModule's token cache, a writable ``data_dir`` (never the data shipped
        inside the package: a checkout would collect cache files), or ``~/.cache``."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        import datamodules

        shipped = Path(datamodules.__file__).resolve().parent
        dm = trainer.datamodule
        for attr in ("cache_path", "data_dir"):
            try:
                place = getattr(dm, attr, None)
            except Exception:  # noqa: BLE001 - a property that cannot resolve here simply is not a candidate
                place = None
            if place is None or shipped in Path(place).resolve().parents:
                continue
            if Path(place).is_dir() and os.access(place, os.W_OK):
                return Path(place)
        from datamodules.cache import default_cache_root

        return default_cache_root() / "label_clusters"

    def _cache_file(self, trainer: L.Trainer, num_labels: int, num_clusters: int) -> Path | None:
        dm = trainer.datamodule
        counts = getattr(dm, "train_label_counts", None)
        if counts is None:
            return None  # no cheap identity of the training labels: build every time
        digest = hashlib.sha256()
        digest.update(repr((CLUSTER_FORMAT_VERSION, type(dm).__name__, getattr(dm, "num_train_docs", None),
                            num_labels, num_clusters, self.embedding_dim, self.kmeans_iterations,
                            self.seed)).encode())
        digest.update(torch.as_tensor(counts).long().numpy().tobytes())
        return self.cache_directory(trainer) / f"label_clusters-{num_clusters}-{digest.hexdigest()[:16]}.npy"

    def _clusters_on_rank_zero(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        assignment = None
        if trainer.is_global_zero:
            assignment = self.clusters_for(trainer, pl_module)
        return trainer.strategy.broadcast(assignment, src=0)

    def clusters_for(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """Read the cached clusters of this data, or build (and cache) them."""
        num_labels = _num_labels(trainer, pl_module)
        num_clusters = self.num_clusters or int(pl_module.aux_head.out_features)
        path = self._cache_file(trainer, num_labels, num_clusters)
        if path is not None and path.is_file():
            self.cluster_source = str(path)
            return load_cluster_file(path, num_labels)
        began = time.perf_counter()
        dm = trainer.datamodule
        if dm is not None:
            batches = dm.train_dataloader
        else:
            batches = trainer.fit_loop._data_source.dataloader  # dataloaders passed to fit()
        embeddings = label_embeddings(batches, num_labels, self.embedding_dim, self.seed)
        assignment = balanced_kmeans_tree(embeddings, num_clusters, self.kmeans_iterations, self.seed)
        self.build_seconds = time.perf_counter() - began
        log.info("AuxiliaryObjective: built %d clusters of %d labels in %.1f s", num_clusters, num_labels,
                 self.build_seconds)
        if path is not None:
            save_assignment(assignment, path)
            self.cluster_source = str(path)
        else:
            self.cluster_source = "built"
        return assignment


@rank_zero_only
def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Straight to the loggers, at the step whose training batch used these values (as Lightning labels them):
    a value logged through ``LightningModule.log`` would be repeated until the end of the epoch after the cutoff."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _num_labels(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    clusters = getattr(pl_module, "label_clusters", None)
    if isinstance(clusters, Tensor):
        return int(clusters.numel())
    num = getattr(trainer.datamodule, "num_labels", None)
    if num is None:
        raise ValueError("cannot tell the number of labels: give the module `label_clusters` or the data num_labels")
    return int(num)


def _module_has_cluster_file(pl_module: L.LightningModule) -> bool:
    hparams = getattr(pl_module, "hparams", None)
    return bool(hparams.get("aux_cluster_file")) if hparams is not None and hasattr(hparams, "get") else False


def _rewrap_ddp(trainer: L.Trainer) -> None:
    """After parameters left the module, wrap it in a new DistributedDataParallel so that its reducer neither
    waits for their gradients (which would fail without ``find_unused_parameters``) nor keeps them alive."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy._setup_model(strategy.lightning_module)
        strategy._register_ddp_hooks()
