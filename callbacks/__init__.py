"""Reusable Lightning callbacks: dynamic sparse training, auxiliary-objective schedule, memory profiling, exact
resume (random states, periodic atomic ``last.ckpt``).

They work on any LightningModule: :class:`DynamicSparseTraining` rewires every submodule with the fixed fan-in
rewiring protocol (``rewire``, ``reset_optimizer_state``, ``indices``), :class:`AuxiliaryObjective` drives a module
with the small auxiliary protocol of :class:`callbacks.auxiliary.AuxiliaryModule`, :class:`MemoryProfiler` needs
nothing; :class:`LexicalNegatives` grows the negative evidence of lexical heads (``collect_negatives``,
``grow_negatives``); :class:`TrainingBudget` chooses the number of epochs from the training set's size. In a
LightningCLI yaml: ``trainer.callbacks: [{class_path: callbacks.DynamicSparseTraining, ...}]``.
"""

from callbacks.auxiliary import AuxiliaryModule, AuxiliaryObjective
from callbacks.budget import TrainingBudget
from callbacks.dst import DynamicSparseTraining
from callbacks.grouping import LabelGrouping
from callbacks.guard import FiniteLossGuard, NonFiniteLossError
from callbacks.lexical import LexicalNegatives
from callbacks.memory import MemoryProfiler
from callbacks.oom import OutOfMemoryAdvice, OutOfMemoryAdvisor
from callbacks.resume import LastCheckpoint, RandomStateCheckpoint, RestoreLoaderPosition

__all__ = [
    "AuxiliaryModule",
    "AuxiliaryObjective",
    "DynamicSparseTraining",
    "FiniteLossGuard",
    "LabelGrouping",
    "LastCheckpoint",
    "LexicalNegatives",
    "MemoryProfiler",
    "NonFiniteLossError",
    "OutOfMemoryAdvice",
    "OutOfMemoryAdvisor",
    "RandomStateCheckpoint",
    "RestoreLoaderPosition",
    "TrainingBudget",
]
