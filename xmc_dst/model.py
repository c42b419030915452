"""The LightningModule: encoder -> dropout -> optional intermediate layer -> fixed fan-in (or dense) label head.

Pieces and where they come from:

* the encoder is built from a factory (see :mod:`xmc_dst.encoders`) with what the data provides (tokenizer or number
  of features), so a config names the encoder once and the DataModule's tokenizer reaches it by an argument link;
* the head is built from a factory too (see :mod:`xmc_dst.heads`: the fixed fan-in sparse head, the dense baseline),
  given the width of the layer below, the label count and the seeded generator; it carries its own optimizer
  settings; dynamic sparse training rewires ``self.head`` from a callback;
* an optional auxiliary head (a meta-classifier over label clusters) adds ``alpha * aux`` to ``(1 - alpha) * main``;
  a callback sets :attr:`XMCModule.aux_alpha` and finally calls :meth:`XMCModule.remove_aux_head`;
* losses come from :mod:`xmc_dst.losses` (sparse positives, no dense targets), optimisation from
  :mod:`xmc_dst.optim` (one optimizer, a parameter group per part, each with its own algorithm and schedule);
* validation/test log ``val/P@k``, ``val/nDCG@k``, ``val/PSP@k``, ``val/PSnDCG@k`` (and ``test/...``);
* checkpoints carry the hyperparameters, the label names and the tokenizer location, which is all
  :mod:`xmc_dst.inference` needs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from xmc_dst.clusters import ClusterNamesNeeded, count_clusters, load_cluster_file
from xmc_dst.components import factory_spec, resolve_factory
from xmc_dst.encoders import Activation, EncoderFactory, EncoderInputs, activation, encode_texts
from xmc_dst.heads import FixedFanInHead, HeadFactory, HeadOptimizer, InputTooNarrow, LexicalHead
from xmc_dst.losses import LossName, Reduction, bce_with_logits, rows_of, xmc_loss
from xmc_dst.metrics import XMCMetrics, inverse_propensity, mask_reciprocal_logits
from xmc_dst.optim import Algorithm, GroupwiseOptimizer, Schedule, drop_parameters, schedule_lambda, split_no_decay

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "XMCModule", "check_checkpoint", "check_k", "migrate_hparams", "saved_hparams", "top_k"]

CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def check_k(k: Any, what: str = "k") -> None:
    """``k`` (labels per document) must be a positive integer: ``k=0`` would return no label without a word."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{what} must be an integer >= 1 (labels per document), got {k!r}")


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Best ``k`` (scores, label ids) per row; with fewer than ``k`` labels the rest is padded (-inf, -1)."""
    check_k(k)
    kk = min(k, logits.shape[1])
    scores, ids = torch.topk(logits, kk, dim=1)
    if kk < k:
        pad = k - kk
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
    return scores, ids


def _narrow_input_message(error: InputTooNarrow, intermediate_dim: int) -> str:
    """A head that cannot read its input width (e.g. ``fan_in`` above it): name the width's source and both fixes,
    rather than silently shrinking the configured head."""
    needed, width, argument = error.needed, error.available, error.argument
    source = f"intermediate_dim={intermediate_dim}" if intermediate_dim > 0 else "the encoder's output width"
    widen = (f"raise model.intermediate_dim to at least {needed}" if intermediate_dim > 0 else
             f"add an intermediate layer with model.intermediate_dim >= {needed}")
    return (f"model.head {argument}={needed} is larger than the {width} inputs of the head ({source}): set "
            f"model.head.init_args.{argument} <= {width}, or {widen}")


# Hyperparameters of checkpoints written before the head was a component (``head: sparse|dense`` and these keys).
LEGACY_HEAD_KEYS = {"fan_in": "fan_in", "head_impl": "impl", "head_optimizer": "optimizer", "head_lr": "lr",
                    "head_weight_decay": "weight_decay", "head_warmup_steps": "warmup_steps",
                    "head_lr_schedule": "lr_schedule"}
LEGACY_HEADS = {"sparse": "xmc_dst.heads.FixedFanInHead", "dense": "xmc_dst.heads.DenseHead"}


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters in today's form: the old ``head: sparse|dense`` with flat ``fan_in``,
    ``head_*`` keys (and the shared ``momentum``) become the head's ``class_path``/``init_args``, with the values the
    old code used for missing keys. Today's hyperparameters come back unchanged."""
    kind = hparams.get("head")
    if not isinstance(kind, str) and not any(key in hparams for key in LEGACY_HEAD_KEYS):
        return dict(hparams)
    kind = kind or "sparse"
    if kind not in LEGACY_HEADS:
        raise ValueError(f"the checkpoint's head {kind!r} is neither 'sparse' nor 'dense': pass the head to build "
                         "(head={'class_path': 'xmc_dst.heads.FixedFanInHead', 'init_args': {...}})")
    old = {"head_optimizer": "adamw", "head_lr": 1e-2, "head_weight_decay": 1e-4, "fan_in": 64, "head_impl": "auto",
           **{key: hparams[key] for key in LEGACY_HEAD_KEYS if key in hparams}}
    init_args = {new: old[key] for key, new in LEGACY_HEAD_KEYS.items() if key in old}
    init_args["momentum"] = hparams.get("momentum", 0.9)
    if kind == "dense":
        del init_args["fan_in"], init_args["impl"]
    migrated = {key: value for key, value in hparams.items() if key not in LEGACY_HEAD_KEYS}
    migrated["head"] = {"class_path": LEGACY_HEADS[kind], "init_args": init_args}
    return migrated


_REINIT_HINT = ("; to train this data's labels starting from the checkpoint's encoder, run fit with --ckpt_path "
                "CKPT --reinit_head true (a new run; the head is initialised afresh)")


def label_set_difference(saved: Sequence[str], current: Sequence[str]) -> str:
    """What differs between a checkpoint's label names and the data's: the counts, the first differing label id
    and names, how many of the checkpoint's names the data lacks."""
    first = next((i for i, (a, b) in enumerate(zip(saved, current, strict=False)) if a != b),
                 min(len(saved), len(current)))
    missing = [name for name in saved if name not in set(current)]
    at = (f"label id {first} is {saved[first]!r} in the checkpoint and {current[first]!r} in the data"
          if first < min(len(saved), len(current)) else f"labels from id {first} on exist in one of them only")
    kind = (f"{len(missing)} of the checkpoint's names are not the data's, e.g. {missing[0]!r}" if missing else
            "the same names in another order")
    return (f"the checkpoint was trained on another label set: {len(saved)} labels in the checkpoint, "
            f"{len(current)} in the data; {at}; {kind}")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, cannot be read (truncated, corrupt) or is not one of this project's."""


# ``--ckpt_path`` values that Lightning resolves itself; any other value is a file.
CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when it is not a readable checkpoint of :class:`XMCModule`:
    missing, a folder, truncated or corrupt (``torch.load`` fails), or a PyTorch file without the module's
    ``state_dict`` and hyperparameters. A checkpoint that pickles Python objects cannot be inspected safely
    (``weights_only``) and is left to the loader."""
    import pickle

    path = Path(path)
    fix = "pass a checkpoint written by xmc-dst fit (<log dir>/checkpoints/best-*.ckpt or last.ckpt)"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: {fix}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file: {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error) and "invalid load key" not in str(error):
            return  # pickled objects (e.g. hyperparameters of an old layout): the loader decides
        raise CheckpointError(f"checkpoint {path} cannot be read ({path.stat().st_size:,} bytes; it is corrupt: "
                              f"{_first_line(error)}): {fix}") from None
    except Exception as error:  # noqa: BLE001 - torch reports a damaged file with several kinds
        raise CheckpointError(f"checkpoint {path} cannot be read ({path.stat().st_size:,} bytes; it is truncated, "
                              f"corrupt or not a PyTorch file: {_first_line(error)}): {fix}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping) or not (
            isinstance(hparams, Mapping) and {"encoder", "num_labels"} <= set(hparams)):
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of xmc-dst (it lacks the state_dict "
                              f"and the hyperparameters encoder and num_labels of XMCModule): {fix}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0].split(". ")[0] if lines else type(error).__name__)[:160]


def saved_hparams(path: str | Path, weights_only: bool = True) -> dict[str, Any] | None:
    """The hyperparameters of a checkpoint file (read memory-mapped), None where they cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception:  # noqa: BLE001 - not loadable this way: the caller goes on without them
        return None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    return dict(hparams) if isinstance(hparams, Mapping) else None


def _saved_label_count(state: dict[str, Tensor]) -> int:
    """Labels of a checkpoint's head: its label map (grouped heads: weight rows are groups), bias or weight rows."""
    key = next((key for key in ("head.label_position", "head.bias") if key in state), "head.weight")
    return int(state[key].shape[0])


class XMCModule(L.LightningModule):
    """Extreme multi-label classifier: a document encoder and a fixed fan-in sparse (or dense) label head.

    Args:
        encoder: encoder factory: an encoder class of :mod:`xmc_dst.encoders` (or a ``functools.partial`` of one,
            or a ``{"class_path", "init_args"}`` dict); in yaml a ``class_path`` and its ``init_args``. It is called
            with :class:`~xmc_dst.encoders.EncoderInputs` built from ``tokenizer``/``num_features``.
        num_labels: size of the label space (linked from the DataModule).
        tokenizer: tokenizer directory or hub name of text data (linked from the DataModule); the encoder weights
            are read from there unless the encoder names ``pretrained``.
        num_features: number of bag-of-words features (linked from a BoW DataModule).
        num_lexical_features: width of the data's lexical TF-IDF features (linked from a text DataModule with
            ``lexical_features``); the encoder's ``lexical_dim`` projects them.
        pretrained_weights: load the encoder's pretrained weights (False when a checkpoint provides all weights).
        head: head factory: a head class of :mod:`xmc_dst.heads` (``FixedFanInHead``, ``DenseHead``) with its
            arguments, optimizer settings included (a ``functools.partial`` or a ``{"class_path", "init_args"}``
            dict; in yaml a ``class_path`` and its ``init_args``); called with the head's input width, the number of
            labels and the seeded generator. Default: ``FixedFanInHead`` with its defaults. A head whose arguments
            do not fit its input width (``fan_in`` above it) fails at construction.
        intermediate_dim: width of a dense layer between the encoder and the head (0: none).
        lexical_terms: with lexical features in the data, a :class:`~xmc_dst.heads.LexicalHead` whose labels read
            the TF-IDF features of their training documents, at most this many each (the strongest), started at
            their centroids, its scores added to the head's (0: none).
        lexical_connections: the most connections of the lexical head in all (None: no bound); above it the labels
            with the most terms are cut first, so its memory is bounded on any data.
        lexical_head_lr: its learning rate (AdamW, no weight decay; default: the head's).
        lexical_negatives: spare connections of the lexical head for negative evidence, as a share of its support
            (0: none); :class:`callbacks.LexicalNegatives` fills them with the (term, label) pairs the loss gradient
            asks for.
        head_init: ``random``, or ``label_names``: at the start of ``fit`` every label's name is read as a document
            (encoder, lexical channel, intermediate layer), the vectors are centred on their mean over labels, and
            each label's head weights start there (the sparse head connects to the ``fan_in`` largest coordinates,
            with those values as weights; the dense head takes the whole vector), at the initialisation's norm.
            It costs one encoder pass over the names and, once, ``labels x head inputs`` floats.
        intermediate_activation: its activation; ``identity`` as the authors (they configure ReLU but never apply
            it in training).
        aux_clusters: number of label clusters of the auxiliary meta-classifier (0: no auxiliary head).
        aux_cluster_file: ``.npy`` label -> cluster assignment (see :func:`xmc_dst.clusters.load_cluster_file`);
            without it, labels are assigned to ``aux_clusters`` contiguous blocks of label ids until a callback calls
            :meth:`set_label_clusters`.
        loss: ``squared_hinge`` (the paper's) or ``bce``.
        loss_reduction: ``auto`` (the authors' normalisation for the loss), ``sum``, ``mean``, ``batch_mean``.
        positive_weighting: ``none``, or ``propensity``: each positive's loss term times its label's inverse
            propensity (Jain et al., 2016; the training split's counts, the DataModule's A and B), so a tail label's
            few positives pull as hard as PSP@k counts them; negatives keep weight 1.
        encoder_optimizer: ``adamw`` or ``sgd`` for the encoder, the intermediate layer and the auxiliary head.
        encoder_lr, encoder_weight_decay: encoder learning rate and weight decay (none on biases and norms).
        intermediate_lr: learning rate of the intermediate layer (default: the head's).
        aux_lr: learning rate of the auxiliary head.
        momentum: momentum of those SGD groups (the head has its own).
        warmup_steps, lr_schedule: linear warmup (optimizer steps) and then ``cosine``/``linear`` decay to 0 at the
            end of training or ``constant``; the head's unless it sets its own.
        ks: the k of the P@k/nDCG@k/PSP@k/PSnDCG@k metrics.
        predict_k: labels returned per document by ``predict_step``.
        seed: seed of the head's initial topology and weights (None: the global RNG).
    """

    def __init__(
        self,
        encoder: EncoderFactory,
        num_labels: int,
        tokenizer: str | None = None,
        num_features: int | None = None,
        num_lexical_features: int | None = None,
        pretrained_weights: bool = True,
        head: HeadFactory | None = None,
        intermediate_dim: int = 0,
        intermediate_activation: Activation = "identity",
        head_init: Literal["random", "label_names"] = "random",
        lexical_terms: int = 0,
        lexical_connections: int | None = 20_000_000,
        lexical_head_lr: float | None = None,
        lexical_negatives: float = 0.0,
        aux_clusters: int = 0,
        aux_cluster_file: str | None = None,
        loss: LossName = "squared_hinge",
        loss_reduction: Reduction = "auto",
        positive_weighting: Literal["none", "propensity"] = "none",
        encoder_optimizer: Algorithm = "adamw",
        encoder_lr: float = 1e-5,
        encoder_weight_decay: float = 0.01,
        intermediate_lr: float | None = None,
        aux_lr: float = 5e-4,
        momentum: float = 0.9,
        warmup_steps: int = 1000,
        lr_schedule: Schedule = "cosine",
        ks: Sequence[int] = (1, 3, 5),
        predict_k: int = 5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        if loss not in ("bce", "squared_hinge"):
            raise ValueError(f"loss must be 'bce' or 'squared_hinge', got {loss!r}")
        if head_init not in ("random", "label_names"):
            raise ValueError(f"head_init must be 'random' or 'label_names', got {head_init!r}")
        if positive_weighting not in ("none", "propensity"):
            raise ValueError(f"positive_weighting must be 'none' or 'propensity', got {positive_weighting!r}")
        check_k(predict_k, "model.predict_k")
        if not ks:
            raise ValueError("model.ks must name at least one k (the k of P@k and the other metrics)")
        for k in ks:
            check_k(k, "every k of model.ks")
        for name, value in (("intermediate_dim", intermediate_dim), ("aux_clusters", aux_clusters),
                            ("warmup_steps", warmup_steps)):
            if value < 0:
                raise ValueError(f"model.{name} must be >= 0, got {value}")
        self.save_hyperparameters()
        self._make_hparams_portable(encoder=encoder, head=head)

        inputs = EncoderInputs(tokenizer=tokenizer, num_features=num_features,
                               num_lexical_features=num_lexical_features, pretrained_weights=pretrained_weights)
        self.encoder = resolve_factory(encoder, "encoder")(inputs)
        features = int(self.encoder.output_dim)
        if intermediate_dim > 0:
            self.intermediate = nn.Sequential(nn.Linear(features, intermediate_dim),
                                              activation(intermediate_activation))
            features = intermediate_dim
        else:
            self.intermediate = None
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.head = self._build_head(head, features, num_labels, generator, intermediate_dim)
        if head_init == "label_names" and not hasattr(self.head, "start_from"):
            raise ValueError(f"head_init='label_names' needs a head that can start from label vectors (start_from): "
                             f"FixedFanInHead or DenseHead, not {type(self.head).__name__}")
        self.lexical_head: LexicalHead | None = None
        if lexical_terms:
            if not num_lexical_features:
                raise ValueError(f"lexical_terms={lexical_terms} needs lexical features from the data: set the "
                                 "DataModule's lexical_features, or lexical_terms 0")
            if getattr(self.encoder, "lexical", None) is None:
                raise ValueError(f"lexical_terms={lexical_terms} needs the encoder's lexical projection (its "
                                 "lexical_dim > 0), which carries the TF-IDF vocabulary into checkpoints")
            self.lexical_head = LexicalHead(int(num_lexical_features), num_labels, lexical_terms, lexical_connections,
                                           lexical_negatives)

        self.aux_alpha: float = 0.0
        self._clusters_pending = False
        if aux_clusters > 0 or aux_cluster_file:
            count = count_clusters(aux_cluster_file) if aux_cluster_file else aux_clusters
            clusters = torch.arange(num_labels) * count // num_labels  # contiguous blocks until replaced
            if aux_cluster_file:
                try:
                    clusters = load_cluster_file(aux_cluster_file, num_labels)
                except ClusterNamesNeeded:  # members are label names: resolved in setup() with the data's names
                    self._clusters_pending = True
            self.register_buffer("label_clusters", clusters.long())
            self.aux_head: nn.Linear | None = nn.Linear(int(self.encoder.output_dim), count)
        else:
            self.register_buffer("label_clusters", None)
            self.aux_head = None
        self._has_aux_group = self.aux_head is not None

        self.label_names: list[str] | None = None
        self.data_info: dict[str, Any] = {}
        self.val_metrics: XMCMetrics | None = None
        self.test_metrics: XMCMetrics | None = None
        self._filter_pairs: Tensor | None = None
        self._filter_on_val = False
        self._positive_weights: Tensor | None = None
        self.last_test_metrics: dict[str, float] = {}

    @staticmethod
    def _build_head(head: Any, features: int, num_labels: int, generator: torch.Generator | None,
                    intermediate_dim: int) -> nn.Module:
        try:
            module = resolve_factory(head if head is not None else FixedFanInHead, "head")(features, num_labels,
                                                                                         generator)
        except InputTooNarrow as error:
            raise ValueError(_narrow_input_message(error, intermediate_dim)) from error
        if not isinstance(getattr(module, "optimizer_settings", None), HeadOptimizer):
            raise TypeError(f"the head {type(module).__name__} has no optimizer_settings (xmc_dst.heads.HeadOptimizer)")
        return module

    def _make_hparams_portable(self, **factories: Any) -> None:
        """Outside the CLI, store the factories as class_path dicts so that checkpoints hold only plain data
        (``torch.load(weights_only=True)``) and reload through the same instantiator as CLI checkpoints."""
        if isinstance(self.hparams.get("encoder"), Mapping):
            return
        for name, factory in factories.items():
            if factory is None or isinstance(factory, Mapping):
                continue
            spec = factory_spec(factory)
            if spec is None:
                log.warning("the %s factory is not a class or a keyword-only partial of one; checkpoints will "
                            "pickle it (load them with weights_only=False)", name)
                return
            self.hparams[name] = spec
        self.hparams["ks"] = [int(k) for k in self.hparams["ks"]]
        self.hparams["_instantiator"] = CLI_INSTANTIATOR

    # ------------------------------------------------------------------------------------------ forward

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Encoder output (after its dropout), the input of the auxiliary head and the intermediate layer."""
        return self.encoder(batch)

    def head_inputs(self, features: Tensor) -> Tensor:
        """What the head reads: the encoder output through the intermediate layer, where there is one."""
        return self.intermediate(features) if self.intermediate is not None else features

    def logits_from_features(self, features: Tensor) -> Tensor:
        """Label scores [batch, num_labels] (fp32 with the sparse head, also under autocast)."""
        return self.head(self.head_inputs(features))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Label scores [batch, num_labels] of a batch dict (text: ``input_ids``, ``attention_mask``; BoW:
        ``feature_ids``, ``feature_values``, ``feature_offsets``)."""
        return self.logits(batch, self.features(batch))

    def logits(self, batch: Mapping[str, Tensor], features: Tensor) -> Tensor:
        """The head's scores of ``features``, plus the lexical head's of the batch's TF-IDF rows if there is one."""
        logits = self.logits_from_features(features)
        if self.lexical_head is not None:
            logits = logits + self.lexical_head(batch)
        return logits

    @torch.no_grad()
    def label_name_vectors(self, names: Sequence[str], tokenizer: Any, max_length: int,
                           batch_size: int = 256) -> Tensor:
        """The head's inputs (encoder, lexical channel, intermediate layer) of each name read as a document,
        ``[len(names), head inputs]``, in eval mode."""
        training = self.training
        self.eval()
        try:
            rows = []
            for start in range(0, len(names), batch_size):
                batch = encode_texts(self.encoder, tokenizer, names[start:start + batch_size], max_length, self.device)
                rows.append(self.head_inputs(self.features(batch)).float())
            return torch.cat(rows)
        finally:
            self.train(training)

    def start_head_from_label_names(self, names: Sequence[str], tokenizer: Any, max_length: int) -> None:
        """``head_init='label_names'``: the head starts at its labels' name vectors, centred on their mean (what
        every name shares says nothing about one label)."""
        if tokenizer is None:
            raise ValueError("head_init='label_names' needs text data (a tokenizer reads the label names)")
        vectors = self.label_name_vectors(names, tokenizer, max_length)
        self.head.start_from(vectors - vectors.mean(dim=0, keepdim=True))
        log.info("head started at the vectors of %d label names", len(names))

    def scores(self, logits: Tensor) -> Tensor:
        """Scores reported by predictions: sigmoid probabilities for ``bce``, raw margins for ``squared_hinge``."""
        return torch.sigmoid(logits.float()) if self.hparams.loss == "bce" else logits.float()

    # ------------------------------------------------------------------------------------------ auxiliary head

    def cluster_positives(self, label_ids: Tensor, label_offsets: Tensor) -> tuple[Tensor, Tensor]:
        """CSR positives of the meta-labels: the distinct clusters of each document's labels."""
        num_clusters = self.aux_head.out_features
        rows = rows_of(label_offsets, label_ids.numel())
        keys = torch.unique(rows * num_clusters + self.label_clusters[label_ids.long()])
        counts = torch.bincount(keys // num_clusters, minlength=label_offsets.numel() - 1)
        offsets = torch.zeros_like(label_offsets)
        offsets[1:] = torch.cumsum(counts, 0)
        return keys % num_clusters, offsets

    def aux_loss(self, features: Tensor, label_ids: Tensor, label_offsets: Tensor) -> Tensor:
        """Mean binary cross-entropy of the meta-classifier (``BCEWithLogitsLoss()`` as the authors)."""
        cluster_ids, cluster_offsets = self.cluster_positives(label_ids, label_offsets)
        return bce_with_logits(self.aux_head(features).float(), cluster_ids, cluster_offsets, "mean")

    @torch.no_grad()
    def set_label_clusters(self, clusters: Tensor) -> None:
        """Replace the label -> cluster assignment (and re-initialise the auxiliary head if the count changes)."""
        if self.aux_head is None:
            raise RuntimeError("this module has no auxiliary head (aux_clusters=0)")
        clusters = clusters.to(self.label_clusters.device, torch.long)
        if clusters.shape != self.label_clusters.shape or clusters.min() < 0:
            raise ValueError(f"expected {self.label_clusters.numel()} non-negative cluster ids")
        if int(clusters.max()) + 1 != self.aux_head.out_features:
            if self._trainer is not None and self.trainer.optimizers:
                raise RuntimeError("the number of clusters cannot change once the optimizer holds the head")
            old = self.aux_head
            self.aux_head = nn.Linear(old.in_features, int(clusters.max()) + 1).to(old.weight.device)
        self.label_clusters = clusters

    def remove_aux_head(self) -> None:
        """Drop the auxiliary head for good: its parameters leave the optimizers (state included) and are freed.

        The optimizer keeps an empty ``aux`` group, so that optimizer checkpoints keep their layout; a checkpoint
        saved afterwards has no ``aux_head`` weights, and loading it removes the head first (``on_load_checkpoint``).
        Under DDP the wrapper still expects gradients for the removed parameters: train with
        ``strategy: ddp_find_unused_parameters_true`` when the head is removed mid-run.
        """
        if self.aux_head is None:
            return
        if self._trainer is not None:
            drop_parameters(self.trainer.optimizers, self.aux_head.parameters())
        self.aux_head = None
        self.aux_alpha = 0.0

    # ------------------------------------------------------------------------------------------ training

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        features = self.features(batch)
        logits = self.logits(batch, features)
        label_ids, label_offsets = batch["label_ids"], batch["label_offsets"]
        loss = xmc_loss(self.hparams.loss, logits, label_ids, label_offsets, self.hparams.loss_reduction,
                        self._positive_weights)
        size = logits.shape[0]
        if self.aux_head is not None:  # also at alpha 0: every parameter gets a gradient (DDP needs that)
            aux = self.aux_loss(features, label_ids, label_offsets)
            self.log("train/main_loss", loss.detach(), batch_size=size)
            self.log("train/aux_loss", aux.detach(), batch_size=size)
            loss = (1.0 - self.aux_alpha) * loss + self.aux_alpha * aux
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """One :class:`~xmc_dst.optim.GroupwiseOptimizer` with a group per part and one ``LambdaLR`` with a lambda
        per group, stepped every optimizer step (see :mod:`xmc_dst.optim` for why not two optimizers); the head's
        group takes the head's own settings (``optimizer_settings``)."""
        hp, head = self.hparams, self.head.optimizer_settings
        side = dict(algorithm=hp.encoder_optimizer, momentum=hp.momentum)
        own = [dict(group, algorithm="adamw", momentum=hp.momentum)
               for group in getattr(self.encoder, "own_optimizer_groups", list)()]
        taken = {id(p) for group in own for p in group["params"]}
        decay, no_decay = split_no_decay((n, p) for n, p in self.encoder.named_parameters() if id(p) not in taken)
        groups = [
            dict(name="encoder", params=decay, lr=hp.encoder_lr, weight_decay=hp.encoder_weight_decay, **side),
            dict(name="encoder_no_decay", params=no_decay, lr=hp.encoder_lr, weight_decay=0.0, **side),
            *own,
        ]
        if self.intermediate is not None:
            groups.append(dict(name="intermediate", params=list(self.intermediate.parameters()),
                               lr=hp.intermediate_lr if hp.intermediate_lr is not None else head.lr,
                               weight_decay=hp.encoder_weight_decay, **side))
        if self._has_aux_group:
            params = list(self.aux_head.parameters()) if self.aux_head is not None else []
            groups.append(dict(name="aux", params=params, lr=hp.aux_lr, weight_decay=hp.encoder_weight_decay,
                               **side))
        groups.append(dict(name="head", params=list(self.head.parameters()), lr=head.lr, weight_decay=head.weight_decay,
                           algorithm=head.algorithm, momentum=head.momentum, state_dtype=head.state_dtype,
                           rounding_seed=head.rounding_seed))
        if self.lexical_head is not None:
            groups.append(dict(name="lexical_head", params=list(self.lexical_head.parameters()),
                               lr=hp.lexical_head_lr if hp.lexical_head_lr is not None else head.lr, weight_decay=0.0,
                               algorithm="adamw", momentum=hp.momentum))
        optimizer = GroupwiseOptimizer(groups)

        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        total = int(total) if math.isfinite(total) else None
        lambdas = []
        for group in groups:
            is_head = group["name"] == "head"
            warmup = head.warmup_steps if is_head and head.warmup_steps is not None else hp.warmup_steps
            schedule = head.lr_schedule if is_head and head.lr_schedule is not None else hp.lr_schedule
            if total is None:
                schedule = "constant"  # no known end of training to decay towards
            lambdas.append(schedule_lambda(schedule, warmup, total or 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ evaluation

    def setup(self, stage: str) -> None:
        """Take the label names, propensities and reciprocal-pair filter from the DataModule, build the metrics."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        inv_propensity = None
        if datamodule is not None:
            names = getattr(datamodule, "label_names", None)
            if names is not None:
                if len(names) != self.hparams.num_labels:
                    raise ValueError(f"the data ({type(datamodule).__name__}) has {len(names)} labels, the model "
                                     f"was built for {self.hparams.num_labels}: build the model with "
                                     f"num_labels={len(names)} (the CLI links data.num_labels to it), or load a "
                                     "checkpoint trained on this data")
                self.label_names = list(names)
                if self._clusters_pending and self.aux_head is not None:
                    keys = list(getattr(datamodule, "label_keys", names))  # LF data: label ids, not titles
                    clusters = load_cluster_file(self.hparams.aux_cluster_file, len(names), keys)
                    self.label_clusters.copy_(clusters)
                    self._clusters_pending = False
            vocabulary = getattr(datamodule, "lexical_vocabulary", None)
            lexical = getattr(self.encoder, "lexical", None)
            if lexical is not None and vocabulary is not None:
                lexical.set_vocabulary(vocabulary)
            if stage == "fit" and self.lexical_head is not None and not bool(self.lexical_head.initialised):
                support = datamodule.label_term_support(self.lexical_head.max_terms, self.lexical_head.max_connections)
                self.lexical_head.set_support(*(torch.from_numpy(array) for array in support))
            if stage == "fit" and self.hparams.get("head_init", "random") == "label_names":
                self.start_head_from_label_names(self.label_names, getattr(datamodule, "tokenizer", None),
                                                 int(getattr(datamodule, "max_length", 128)))
            if stage in ("fit", "validate", "test") and hasattr(datamodule, "train_label_counts"):
                inv_propensity = inverse_propensity(
                    datamodule.train_label_counts, datamodule.num_train_docs,
                    getattr(datamodule, "propensity_a", 0.55), getattr(datamodule, "propensity_b", 1.5))
                if self.hparams.get("positive_weighting", "none") == "propensity":
                    self._positive_weights = inv_propensity.float()
            pairs = getattr(datamodule, "filter_pairs", None)
            if pairs is not None and len(pairs):
                self._filter_pairs = torch.as_tensor(pairs, dtype=torch.long)
                self._filter_on_val = getattr(datamodule, "val_fraction", 0.0) == 0
            self.data_info = {
                "datamodule": type(datamodule).__name__,
                "tokenizer": getattr(datamodule, "tokenizer_name", self.hparams.tokenizer),
                "max_length": getattr(datamodule, "max_length", None),
            }
        if stage in ("fit", "validate", "test"):
            ks = list(self.hparams.ks)
            self.val_metrics = XMCMetrics(ks, inv_propensity)
            self.test_metrics = XMCMetrics(ks, inv_propensity)

    def _evaluate(self, batch: Mapping[str, Tensor], metrics: XMCMetrics, filtered: bool) -> None:
        logits = self(batch)
        if filtered and self._filter_pairs is not None:
            logits = mask_reciprocal_logits(logits, batch["doc_index"], self._filter_pairs)
        _, ids = top_k(logits, max(metrics.ks))
        metrics.update(ids, batch["label_ids"], batch["label_offsets"])

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self._filter_on_val)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, True)

    def _log_metrics(self, metrics: XMCMetrics, prefix: str) -> dict[str, float]:
        values = {f"{prefix}/{name}": float(value) for name, value in metrics.compute().items()}
        self.log_dict(values, sync_dist=False)  # already reduced across processes by the metric
        metrics.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self.last_test_metrics = self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Top ``predict_k`` labels per document: ``{"doc_index", "scores", "label_ids"}`` (padding id -1)."""
        scores, ids = top_k(self(batch), self.hparams.predict_k)
        return {"doc_index": batch["doc_index"], "scores": self.scores(scores), "label_ids": ids}

    # ------------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what inference needs besides the weights: label names, tokenizer and data settings."""
        checkpoint["label_names"] = self.label_names
        checkpoint["data_info"] = dict(self.data_info)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path | IO, *args: Any, **kwargs: Any) -> XMCModule:
        """Lightning's loader; a checkpoint written before the head was a component gets its head hyperparameters
        migrated (:func:`migrate_hparams`) unless ``head=`` is given."""
        if "head" not in kwargs and isinstance(checkpoint_path, (str, Path)):
            hparams = saved_hparams(checkpoint_path, kwargs.get("weights_only") is not False)
            if hparams is not None and hparams.get("head") != (migrated := migrate_hparams(hparams)).get("head"):
                kwargs["head"] = migrated["head"]
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def load_weights_except_head(self, path: str | Path) -> list[str]:
        """Start from a checkpoint's encoder (and intermediate layer) for another label space: its weights are loaded,
        the label head, auxiliary head and label clusters keep this module's fresh initialisation. The rest of the
        architecture must match. Returns the keys loaded."""
        check_checkpoint(path)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        own = ("head.", "aux_head.", "label_clusters")
        state = {key: value for key, value in state.items() if not key.startswith(own)}
        current = self.state_dict()
        wrong = [f"{key} {tuple(value.shape)} (here {tuple(current[key].shape)})" for key, value in state.items()
                 if key in current and tuple(value.shape) != tuple(current[key].shape)]
        missing = [key for key in current if not key.startswith(own) and key not in state]
        unknown = [key for key in state if key not in current]
        if wrong or missing or unknown:
            problems = "; ".join(part for part in (
                f"other shapes: {', '.join(wrong[:3])}" if wrong else "",
                f"missing there: {', '.join(missing[:3])}" if missing else "",
                f"unknown here: {', '.join(unknown[:3])}" if unknown else "") if part)
            raise CheckpointError(f"checkpoint {path}: its encoder does not fit this model ({problems}): keep the "
                                  "encoder and intermediate settings of the run that wrote it")
        self.load_state_dict(state, strict=False)
        return list(state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the weights are loaded: a checkpoint of another label space fails here with the fix, not later
        # with a tensor size mismatch.
        saved_head = checkpoint.get("state_dict", {}).get("head.weight")
        saved_names = checkpoint.get("label_names")
        if saved_head is not None and tuple(saved_head.shape) != tuple(self.head.weight.shape):
            saved_labels, labels = _saved_label_count(checkpoint["state_dict"]), self.head.out_features
            what = (f"{saved_labels} labels, this run has {labels}" if saved_labels != labels else
                    f"a head of shape {tuple(saved_head.shape)}, this run builds {tuple(self.head.weight.shape)} "
                    "(fan_in, intermediate_dim or head type differ)")
            if saved_names is not None and self.label_names is not None:
                what += f" ({label_set_difference(list(saved_names), self.label_names)})"
            raise ValueError(f"the checkpoint was trained with {what}: resume on the data and model settings it was "
                             f"trained with, or start a new run without --ckpt_path{_REINIT_HINT}")
        if saved_names is not None and self.label_names is not None and list(saved_names) != self.label_names:
            raise ValueError(f"{label_set_difference(list(saved_names), self.label_names)}: the checkpoint's scores "
                             "belong to its own labels, so metrics and predictions here would be wrong. Run on the "
                             f"data it was trained on (or data with its label set){_REINIT_HINT}")
        self.label_names = saved_names
        self.data_info = dict(checkpoint.get("data_info") or {})
        state = checkpoint.get("state_dict", {})
        if self.aux_head is not None and not any(key.startswith("aux_head.") for key in state):
            self.remove_aux_head()  # saved after the auxiliary objective ended
