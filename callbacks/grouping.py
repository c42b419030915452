"""Group a grouped head's labels by clusters of the training data before training starts.

:class:`~xmc_dst.grouped.GroupedFanInLinear` shares one index row among ``G`` labels, so labels that want the same
inputs should share a group. This callback builds (or reads from its cache) the balanced label clusters of
:mod:`xmc_dst.clusters`, ``ceil(L / G)`` of them, from the label embeddings the auxiliary objective uses (the same
builder and cache, :meth:`callbacks.AuxiliaryObjective.clusters_for`), and hands each such layer the slots
:func:`~xmc_dst.grouped.group_positions` derives. Layers are found by duck typing (``set_label_position``,
``group_size``, ``num_groups``, ``out_features``). Rank 0 builds, every rank receives the same grouping. On a resume
the checkpoint's ``label_position`` buffer, restored after this hook, is what counts.
"""

from __future__ import annotations

import logging

import lightning as L
from torch import nn

from callbacks.auxiliary import AuxiliaryObjective
from xmc_dst.grouped import group_positions

log = logging.getLogger(__name__)

__all__ = ["LabelGrouping", "find_grouped_layers"]


def find_grouped_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule whose labels can be regrouped (``set_label_position``, ``group_size``, ``num_groups``)."""
    return [(name, m) for name, m in module.named_modules()
            if callable(getattr(m, "set_label_position", None)) and hasattr(m, "group_size")
            and hasattr(m, "num_groups")]


class LabelGrouping(L.Callback):
    """Place the labels of every grouped layer into groups of similar labels (balanced clusters of the data).

    Args:
        embedding_dim, kmeans_iterations, cache_dir, seed: as for :class:`callbacks.AuxiliaryObjective`'s cluster
            building (projection width, 2-means iterations per level, cache folder, seed).
    """

    def __init__(self, embedding_dim: int = 128, kmeans_iterations: int = 10, cache_dir: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.embedding_dim, self.kmeans_iterations, self.cache_dir, self.seed = (embedding_dim, kmeans_iterations,
                                                                                  cache_dir, seed)
        self.sources: dict[str, str | None] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = find_grouped_layers(pl_module)
        if not layers:
            raise ValueError("LabelGrouping found no grouped layer (set_label_position, group_size, num_groups)")
        for name, layer in layers:
            builder = AuxiliaryObjective(cutoff_step=1, num_clusters=int(layer.num_groups),
                                         embedding_dim=self.embedding_dim, kmeans_iterations=self.kmeans_iterations,
                                         cache_dir=self.cache_dir, seed=self.seed)
            assignment = builder.clusters_for(trainer, pl_module) if trainer.is_global_zero else None
            assignment = trainer.strategy.broadcast(assignment, src=0)
            layer.set_label_position(group_positions(int(layer.out_features), int(layer.group_size), assignment))
            self.sources[name] = builder.cluster_source
            log.info("LabelGrouping: %s grouped by %d clusters (%s)", name, layer.num_groups, builder.cluster_source)
