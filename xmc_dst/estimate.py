"""Training memory a configuration will need, estimated before training, the dense and the sparse head side by side.

The static part is exact arithmetic: parameters, their gradients, the optimizer's per-element state (AdamW: two
moments; SGD with momentum: one buffer) and buffers such as the sparse head's int32 indices. The rest, activations,
depends on the kernels and the allocator and is estimated:

* the label head keeps its fp32 logits ``[batch, labels]`` and their gradient (dense and sparse heads alike);
* a transformer layer keeps ``s*b*(16h + 2as)`` activation elements and ``s*b*(2h + as)`` bytes of dropout masks
  (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"); with gradient
  checkpointing only its ``s*b*h`` input;
* the optimizer step makes one parameter-sized temporary per parameter group, one group at a time (AdamW's
  ``torch._foreach_sqrt(exp_avg_sqs)`` denominator in :class:`xmc_dst.optim.GroupwiseOptimizer`, SGD's
  weight-decayed gradient copy; freed when the group is done), so the largest group sets it: with a dense head
  the head, with a sparse one usually the encoder's weight matrices;
* a head stored in bf16 (``weight_dtype``) holds 2-byte weights and gradients and ``state_dtype`` moments; its
  optimizer step works in chunks of :data:`xmc_dst.optim.LOW_PRECISION_CHUNK` elements, so its temporaries are a few
  MB whatever its size; a grouped head (:class:`xmc_dst.heads.GroupedFanInHead`) holds one int32 index row per group
  of ``G`` labels (padded to whole groups) and two int32 label maps (label -> slot, slot -> label);
* dynamic sparse training adds the bit-packed ever-active map (``rows * ceil(in / 64) * 8`` bytes, rows = the
  labels or the tracked sample) and the transient tensors of one rewire (about 22 bytes per connection: masks,
  int64 permutation, moved state).

:func:`estimate_memory` reads a LightningCLI config (or XMCModule hyperparameters); ``xmc-dst estimate-memory``
(:func:`estimate_memory_main`) prints it. The tests compare it with what :mod:`xmc_dst.memory` measures on a live
model.

No network: a transformer encoder's sizes come from its ``config.json`` (``--encoder-config``, the model folder, or the
Hugging Face cache), else from :data:`KNOWN_ENCODERS`, the published architectures of the encoders the shipped
configs name (with a note saying so), so the estimate answers before anything is downloaded. An encoder none of these
knows is an :class:`EncoderConfigNotFound` naming what is missing and how to provide it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmc_dst.clusters import count_clusters
from xmc_dst.config_file import read_config
from xmc_dst.grouped import covering_group_size
from xmc_dst.memory import GIB, MIB, PartBytes
from xmc_dst.optim import LOW_PRECISION_CHUNK, LOW_PRECISION_TEMPORARY_BYTES, split_no_decay
from xmc_dst.paths import default_tokenizer

__all__ = ["KNOWN_ENCODERS", "EncoderConfigNotFound", "MemoryEstimate", "encoder_architecture", "estimate_memory",
           "estimate_memory_main", "estimate_memory_parts", "transformer_activation_bytes"]

STATE_PER_PARAM = {"adamw": 2, "sgd": 1}
# Parameter-sized temporaries of one group's optimizer step, by algorithm (see the module docstring). SGD's is the
# weight-decayed gradient copy: none without weight decay, which the estimate does not know (an over-count then).
STEP_TEMPORARIES_PER_PARAM = {"adamw": 1, "sgd": 1}
# Transient bytes per connection during one rewire (prune mask, regrown mask, int64 permutation, gathered weight,
# sorted int32 indices, one moved optimizer-state tensor).
REWIRE_BYTES_PER_SLOT = 1 + 1 + 8 + 4 + 4 + 4
# A grouped rewire per slot of a group: the masks, int64 permutation and sorted indices, plus per label of the group
# the gathered weight, an fp32 magnitude copy and one moved state tensor.
GROUPED_REWIRE_BYTES_PER_SLOT = 1 + 1 + 8 + 4
# The CPU generator state each bf16 parameter's stochastic rounding keeps in its optimizer state.
ROUNDING_STATE_BYTES = 5056
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

_BERT_BASE = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
              "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
              "type_vocab_size": 2}
_DISTILBERT_BASE = {"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12,
                    "hidden_dim": 3072, "max_position_embeddings": 512}
_ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
                 "type_vocab_size": 1}
_MINILM_L6 = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
              "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
              "type_vocab_size": 2}
# The architecture (the sizes of its config.json on the Hugging Face hub) of the encoders the configs name, for an
# estimate on a machine that has not downloaded them. Parameters: 109.5 M, 66.4 M, 124.6 M, 22.7 M (with pooler).
KNOWN_ENCODERS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": _BERT_BASE, "google-bert/bert-base-uncased": _BERT_BASE,
    "distilbert-base-uncased": _DISTILBERT_BASE, "distilbert/distilbert-base-uncased": _DISTILBERT_BASE,
    "sentence-transformers/msmarco-distilbert-base-v4": _DISTILBERT_BASE,
    "roberta-base": _ROBERTA_BASE, "FacebookAI/roberta-base": _ROBERTA_BASE,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM_L6, "nreimers/MiniLM-L6-H384-uncased": _MINILM_L6,
}


class EncoderConfigNotFound(FileNotFoundError):
    """The encoder's architecture (its ``config.json``) is not on this machine and not in :data:`KNOWN_ENCODERS`."""


def _hub_cached_config(name: str) -> Path | None:
    """``config.json`` of hub model ``name`` in the local Hugging Face cache (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub name (e.g. a missing folder's path)
        return None
    return Path(found) if isinstance(found, str) else None


@contextlib.contextmanager
def encoder_architecture(location: str, encoder_config: str | Path | None = None) -> Iterator[tuple[str, str | None]]:
    """A folder holding the ``config.json`` of the encoder at ``location`` (hub name or folder), and a note when
    the sizes are not the encoder's own file. Looked for, without network: ``encoder_config`` (a ``config.json``
    or a folder with one), the folder ``location``, the Hugging Face cache, :data:`KNOWN_ENCODERS`."""
    if encoder_config is not None:
        path = Path(encoder_config).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise EncoderConfigNotFound(f"--encoder-config {encoder_config}: no such file (expected the encoder's "
                                        "config.json or the folder holding it)")
        source: Path | None = path
    elif (Path(location).expanduser() / "config.json").is_file():
        source = Path(location).expanduser() / "config.json"
    else:
        source = _hub_cached_config(location)
    if source is None and location not in KNOWN_ENCODERS:
        from huggingface_hub import constants

        raise EncoderConfigNotFound(
            f"the architecture of encoder {location!r} is not on this machine: no folder of that name, no "
            f"config.json for it in the Hugging Face cache ({constants.HF_HUB_CACHE}), and it is not one of the "
            f"encoders known without it ({', '.join(sorted(KNOWN_ENCODERS))}); pass --encoder-config PATH (its "
            f"config.json, e.g. `huggingface-cli download {location} config.json` on a machine with network)")
    with tempfile.TemporaryDirectory(prefix="xmc-dst-encoder-") as folder:
        if source is None:
            (Path(folder) / "config.json").write_text(json.dumps(KNOWN_ENCODERS[location]), encoding="utf-8")
            note = (f"encoder {location}: architecture from xmc-dst's table of known encoders (its config.json is "
                    "not on this machine); pass --encoder-config PATH to use the file")
        else:
            shutil.copyfile(source, Path(folder) / "config.json")
            note = None
        yield folder, note


def transformer_activation_bytes(batch: int, seq: int, hidden: int, heads: int, layers: int, element_bytes: int,
                                 checkpointing: bool = False) -> int:
    """Saved activations of ``layers`` transformer layers for one step (Korthikanti et al., 2022)."""
    if checkpointing:
        return layers * seq * batch * hidden * element_bytes
    elements = seq * batch * (16 * hidden + 2 * heads * seq)
    masks = seq * batch * (2 * hidden + heads * seq)
    return layers * (elements * element_bytes + masks)


@dataclass
class MemoryEstimate:
    """Estimated training memory of one configuration, the dense and the sparse head side by side."""

    parts: dict[str, dict[str, PartBytes]]  # head kind ("dense", "sparse") -> part name -> bytes
    batch_size: int
    precision: str
    budget_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def total(self, head: str) -> int:
        return sum(part.total for part in self.parts[head].values())

    def static(self, head: str) -> int:
        return sum(part.static for part in self.parts[head].values())

    def fits(self, head: str, budget_bytes: int | None = None) -> bool | None:
        """Whether the estimate fits ``budget_bytes`` (default: the estimate's budget; None without one)."""
        budget = budget_bytes if budget_bytes is not None else self.budget_bytes
        return None if budget is None else self.total(head) <= budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "precision": self.precision, "budget_bytes": self.budget_bytes,
            "heads": {head: {"parts": {name: asdict(p) for name, p in parts.items()}, "static": self.static(head),
                             "total": self.total(head), "fits": self.fits(head)}
                      for head, parts in self.parts.items()},
            "notes": list(self.notes),
        }

    def table(self) -> Any:
        """A ``rich`` table: MiB per part and kind of memory, dense and sparse head side by side."""
        from rich.table import Table

        heads = list(self.parts)
        table = Table(title=f"Estimated training memory (batch {self.batch_size}, {self.precision})")
        table.add_column("part")
        table.add_column("kind")
        for head in heads:
            table.add_column(f"{head} head MiB", justify="right")
        names = list(dict.fromkeys(name for head in heads for name in self.parts[head]))
        for name in names:
            for kind in ("params", "grads", "optimizer", "buffers", "activations"):
                values = [getattr(self.parts[h].get(name, PartBytes()), kind) for h in heads]
                if any(values):
                    table.add_row(name, kind, *(f"{v / MIB:,.1f}" for v in values))
        table.add_row("all", "static", *(f"{self.static(h) / MIB:,.1f}" for h in heads), style="bold")
        table.add_row("all", "total (M_tr)", *(f"{self.total(h) / MIB:,.1f}" for h in heads), style="bold")
        if self.budget_bytes is not None:
            table.add_row("budget", f"{self.budget_bytes / GIB:.1f} GiB",
                          *("fits" if self.fits(h) else "does NOT fit" for h in heads), style="bold")
        return table


def estimate_memory_parts(*, num_labels: int, head_in: int, fan_in: int, batch_size: int,
                          encoder_params: int = 0, encoder_trainable: int | None = None,
                          encoder_activations: int = 0, encoder_output_dim: int | None = None,
                          encoder_largest_group: int | None = None,
                          intermediate_dim: int = 0, aux_clusters: int = 0, param_bytes: int = 4,
                          encoder_optimizer: str = "adamw", head_optimizer: str = "adamw",
                          dst: bool = True, track_itop: bool = True, itop_rows: int | None = 65_536,
                          gradient_regrowth: bool = False, group_size: int | None = None,
                          head_weight_dtype: str | None = None, head_state_dtype: str = "float32",
                          lexical_connections: int = 0, num_lexical_features: int = 0, lexical_spare: int = 0,
                          precision: str = "32-true", budget_bytes: int | None = None) -> MemoryEstimate:
    """The estimate from plain numbers (see the module docstring for the formulas).

    The sparse column's head is the per-label fixed fan-in head, or with ``group_size`` the grouped one;
    ``head_weight_dtype`` (default: the precision's parameter dtype) and ``head_state_dtype`` (of a bf16 head's
    momentum / moments) size its weights, gradients and optimizer state.

    ``head_in`` is the head's input width (the intermediate width if any); ``encoder_output_dim`` the encoder's
    (input of the intermediate layer and the auxiliary head; default ``head_in``). Optimizer state counts
    ``STATE_PER_PARAM`` tensors of ``param_bytes`` per trainable element. ``encoder_largest_group`` is the trainable
    elements of the encoder's larger optimizer group (weights with decay, or biases and norms without; default all
    of ``encoder_trainable``): with the other groups it sizes the optimizer step's temporary.
    ``lexical_connections`` sizes a lexical head (:class:`xmc_dst.heads.LexicalHead`: fp32 weights and a bias per
    label under AdamW, int32 labels, int64 pointers over ``num_lexical_features`` terms) in both columns;
    ``lexical_spare`` its spare slots for negative evidence (weights, an int32 label and slot each once grown, and the
    evidence recorded while collecting: compacted once it passes ``max(8 * lexical_spare, 2 ** 22)`` int64 keys with
    fp32 scores, the bound counted).
    """
    enc_state = STATE_PER_PARAM[encoder_optimizer]
    head_state = STATE_PER_PARAM[head_optimizer]
    encoder_trainable = encoder_params if encoder_trainable is None else encoder_trainable
    enc_out = encoder_output_dim or head_in
    logits = 2 * batch_size * num_labels * 4  # fp32 logits and their gradient

    def trained(n_params: int, state: int, buffers: int = 0, activations: int = 0, trainable: int | None = None):
        trainable = n_params if trainable is None else trainable
        return PartBytes(params=n_params * param_bytes, grads=trainable * param_bytes,
                         optimizer=trainable * param_bytes * state, buffers=buffers, activations=activations)

    common: dict[str, PartBytes] = {}
    if encoder_params:
        common["encoder"] = trained(encoder_params, enc_state, activations=encoder_activations,
                                    trainable=encoder_trainable)
    if intermediate_dim:
        common["intermediate"] = trained(enc_out * intermediate_dim + intermediate_dim, enc_state,
                                         activations=2 * batch_size * intermediate_dim * 4)
    if aux_clusters:
        common["aux_head"] = trained(enc_out * aux_clusters + aux_clusters, enc_state,
                                     buffers=num_labels * 8, activations=2 * batch_size * aux_clusters * 4)
    if lexical_connections:
        connections = lexical_connections + lexical_spare
        weights = connections + num_labels
        index = connections * (8 if lexical_spare else 4) + (num_lexical_features + 1) * 8 + 1
        recorded = max(8 * lexical_spare, 1 << 22) * 12 if lexical_spare else 0
        common["lexical_head"] = PartBytes(params=weights * 4, grads=weights * 4,
                                           optimizer=weights * 4 * STATE_PER_PARAM["adamw"],
                                           buffers=index + recorded)
    fan_in = min(fan_in, head_in)
    dense = dict(common, head=trained(num_labels * (head_in + 1), head_state, activations=logits))
    low_precision = head_weight_dtype == "bfloat16"
    weight_bytes = DTYPE_BYTES[head_weight_dtype] if head_weight_dtype else param_bytes
    state_bytes = DTYPE_BYTES[head_state_dtype] if low_precision else weight_bytes
    if group_size is not None:  # as GroupedFanInHead builds it
        group_size = covering_group_size(num_labels, fan_in, head_in, group_size)
    rows = num_labels if group_size is None else -(-num_labels // group_size)  # index rows: labels or groups
    slots = num_labels if group_size is None else rows * group_size
    sparse_params = slots * fan_in + num_labels
    buffers = rows * fan_in * 4 + 8 + (0 if group_size is None else (num_labels + slots) * 4)
    sparse_head = PartBytes(params=sparse_params * weight_bytes, grads=sparse_params * weight_bytes,
                            optimizer=sparse_params * state_bytes * head_state
                            + (2 * ROUNDING_STATE_BYTES if low_precision else 0),
                            buffers=buffers, activations=logits)
    sparse = dict(common, head=sparse_head)

    def step_temporaries(head_params: int) -> PartBytes:
        """The largest group's temporary: GroupwiseOptimizer steps the groups one after the other."""
        groups = [(encoder_trainable if encoder_largest_group is None else encoder_largest_group, encoder_optimizer),
                  (enc_out * intermediate_dim + intermediate_dim if intermediate_dim else 0, encoder_optimizer),
                  (enc_out * aux_clusters + aux_clusters if aux_clusters else 0, encoder_optimizer),
                  (head_params, head_optimizer)]
        sizes = [n * STEP_TEMPORARIES_PER_PARAM[algorithm] * param_bytes for n, algorithm in groups[:-1]]
        head_bytes = (min(head_params, LOW_PRECISION_CHUNK) * LOW_PRECISION_TEMPORARY_BYTES if low_precision
                      else head_params * STEP_TEMPORARIES_PER_PARAM[head_optimizer] * param_bytes)
        return PartBytes(activations=max(*sizes, head_bytes))

    dense["optimizer step temporaries"] = step_temporaries(num_labels * (head_in + 1))
    sparse["optimizer step temporaries"] = step_temporaries(sparse_params)
    notes = ["optimizer step temporaries: one parameter-sized tensor of the largest optimizer group, alive during "
             "the optimizer step (after backward has freed the activations)"]
    if dst:
        words = (head_in + 63) // 64
        if group_size is None:
            rewire = num_labels * fan_in * REWIRE_BYTES_PER_SLOT
        else:
            rewire = rows * fan_in * (GROUPED_REWIRE_BYTES_PER_SLOT + group_size * (weight_bytes + 4 + state_bytes))
        captured = batch_size * (head_in + num_labels) * 4 if gradient_regrowth else 0
        tracked = rows if itop_rows is None else min(rows, itop_rows)
        sparse["dst"] = PartBytes(buffers=tracked * words * 8 if track_itop else 0,
                                  activations=rewire + captured)
        notes.append("dst activations: transient tensors of one rewire (and the captured batch with gradient "
                     "regrowth); they peak after the optimizer step, not with the encoder's activations")
    return MemoryEstimate({"dense": dense, "sparse": sparse}, batch_size, precision, budget_bytes, notes)


def _init_args(node: Any) -> dict[str, Any]:
    if not isinstance(node, Mapping):
        return {}
    return dict(node.get("init_args", node if "class_path" not in node else {}) or {})


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _count_encoder(encoder_spec: Mapping[str, Any], tokenizer: str | None, num_features: int | None,
                   encoder_config: str | Path | None = None,
                   num_lexical_features: int | None = None) -> tuple[nn.Module, int, int, str | None]:
    """Build the encoder on the meta device (no memory, no weights read, no network) and count its parameters (a
    lexical projection's table included); a transformer's architecture comes from :func:`encoder_architecture` (with
    its note, if any)."""
    from xmc_dst.components import resolve_factory
    from xmc_dst.encoders import EncoderInputs

    args = _init_args(encoder_spec)
    location = args.get("pretrained") or tokenizer
    if "BagOfWords" in str(encoder_spec.get("class_path")) or location is None:
        architecture: Any = contextlib.nullcontext((None, None))
    else:
        architecture = encoder_architecture(str(location), encoder_config)
    with architecture as (folder, note):
        spec = dict(encoder_spec) if folder is None else {"class_path": encoder_spec["class_path"],
                                                          "init_args": {**args, "pretrained": folder}}
        factory = resolve_factory(spec)
        with torch.device("meta"):
            encoder = factory(EncoderInputs(tokenizer=tokenizer, num_features=num_features,
                                            num_lexical_features=num_lexical_features, pretrained_weights=False))
    params = list(encoder.parameters())
    return encoder, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), note


@dataclass
class HeadSettings:
    """What the estimate reads from a config's head: fan-in, optimizer, grouping and dtypes."""

    fan_in: int
    optimizer: str
    group_size: int | None = None
    weight_dtype: str | None = None
    state_dtype: str = "float32"


def _head_settings(model: Mapping[str, Any]) -> HeadSettings:
    """The config head's settings; what it does not set (a dense head has no fan-in), the defaults of the sparse
    head it names (the grouped one, else the fixed fan-in head), for the sparse column."""
    from xmc_dst.heads import FixedFanInHead, GroupedFanInHead

    head = model.get("head")
    grouped = isinstance(head, Mapping) and str(head.get("class_path", "")).endswith("GroupedFanInHead")
    defaults = inspect.signature(GroupedFanInHead if grouped else FixedFanInHead).parameters
    args = _init_args(head)

    def arg(name: str) -> Any:
        return args.get(name, defaults[name].default)

    return HeadSettings(int(arg("fan_in")), str(arg("optimizer")), int(arg("group_size")) if grouped else None,
                        str(args["weight_dtype"]) if "weight_dtype" in args else None, str(arg("state_dtype")))


def _precision_bytes(precision: str) -> tuple[int, int]:
    """(parameter bytes, activation element bytes) of a Lightning precision string."""
    precision = str(precision)
    if precision in ("16-true", "bf16-true", "16", "bf16"):
        return 2, 2
    if "mixed" in precision:
        return 4, 2
    return 4, 4


def estimate_memory(config: str | Path | Mapping[str, Any], *, batch_size: int | None = None,
                    precision: str | None = None, max_length: int | None = None, num_labels: int | None = None,
                    num_features: int | None = None, budget_gib: float | None = None,
                    encoder_config: str | Path | None = None) -> MemoryEstimate:
    """Estimate the training memory of a LightningCLI config, dense and sparse head side by side.

    Args:
        config: a yaml path or the parsed dict (``model``/``data``/``trainer`` sections), or XMCModule
            hyperparameters (a dict with ``encoder``).
        batch_size, precision, max_length: override the config's (defaults 32, ``32-true``, 128).
        num_labels: the label count when the config does not give it (default: the data's published count).
        num_features: vocabulary size of bag-of-words data (default: read from the data).
        budget_gib: device memory to compare with (``fits``).
        encoder_config: the transformer encoder's ``config.json`` (or its folder), where the encoder named in the
            config is not on this machine (see :func:`encoder_architecture`).

    The encoder is built on the meta device from its architecture (no weights are read, nothing is downloaded), so
    its parameter counts, frozen layers included, are exact. A DynamicSparseTraining callback in
    ``trainer.callbacks`` adds its map and rewire buffers to the sparse column.
    """
    if not isinstance(config, Mapping):
        config = read_config(config, "estimate-memory")
    if "encoder" in config and "model" not in config:
        config = {"model": config}
    model = _init_args(config.get("model", {}))
    data_node = config.get("data", {}) or {}
    data = _init_args(data_node)
    trainer = config.get("trainer", {}) or {}
    data_cls = _import(data_node["class_path"]) if isinstance(data_node, Mapping) and "class_path" in data_node \
        else None

    labels = num_labels or model.get("num_labels")
    if labels is None and data_cls is not None and getattr(data_cls, "published", None) is not None:
        labels = data_cls.published.num_labels
    if labels is None and data_cls is not None:
        labels = data_cls(**data).num_labels
    if labels is None:
        raise ValueError("the number of labels is not in the config; pass num_labels")
    batch = int(batch_size or data.get("batch_size") or 32)
    seq = int(max_length or data.get("max_length") or 128)
    precision = str(precision or trainer.get("precision") or "32-true")
    param_bytes, act_bytes = _precision_bytes(precision)

    encoder_spec = model.get("encoder")
    if encoder_spec is None:
        raise ValueError("the config names no model encoder")
    if isinstance(encoder_spec, str):
        encoder_spec = {"class_path": encoder_spec}
    tokenizer = model.get("tokenizer") or data.get("tokenizer")
    if tokenizer is None and "BagOfWords" not in str(encoder_spec.get("class_path")):
        tokenizer = default_tokenizer()
    if num_features is None and "BagOfWords" in str(encoder_spec.get("class_path")):
        num_features = model.get("num_features") or (data_cls(**data).num_features if data_cls else None)
    encoder, enc_params, enc_trainable, architecture_note = _count_encoder(
        encoder_spec, tokenizer, num_features, encoder_config, int(data.get("lexical_features", 0) or 0) or None)
    head = _head_settings(model)
    enc_groups = split_no_decay(encoder.named_parameters())  # XMCModule's two encoder groups
    enc_largest = max(sum(p.numel() for p in group) for group in enc_groups)
    enc_out = int(encoder.output_dim)
    transformer = getattr(encoder, "transformer", None)
    if transformer is not None and enc_trainable > 0:
        cfg = transformer.config
        enc_act = transformer_activation_bytes(
            batch, seq, int(cfg.hidden_size), int(cfg.num_attention_heads), int(cfg.num_hidden_layers), act_bytes,
            checkpointing=bool(_init_args(encoder_spec).get("gradient_checkpointing", False)))
    else:
        enc_act = 2 * batch * enc_out * act_bytes
    intermediate = int(model.get("intermediate_dim", 0) or 0)
    head_in = intermediate or enc_out
    aux = int(model.get("aux_clusters", 0) or 0)
    notes = [architecture_note] if architecture_note else []
    if model.get("aux_cluster_file") and not aux:
        try:
            aux = count_clusters(model["aux_cluster_file"])
        except OSError:
            notes.append(f"aux_cluster_file {model['aux_cluster_file']} not found: auxiliary head not counted")

    lexical_features = int(data.get("lexical_features", 0) or 0)
    lexical_terms = int(model.get("lexical_terms", 0) or 0) if lexical_features else 0
    lexical_connections = int(labels) * lexical_terms
    if lexical_terms:
        cap = model.get("lexical_connections", 20_000_000)
        lexical_connections = min(lexical_connections, int(cap)) if cap is not None else lexical_connections
        notes.append("lexical_head: its bound min(lexical_connections, labels x lexical_terms); the (label, term) "
                     "pairs that co-occur in training, what it holds, are often far fewer")
    lexical_spare = round(float(model.get("lexical_negatives", 0.0) or 0.0) * lexical_connections)

    dst_args = None
    for callback in trainer.get("callbacks", []) or []:
        if isinstance(callback, Mapping) and str(callback.get("class_path", "")).endswith("DynamicSparseTraining"):
            dst_args = _init_args(callback)
    budget = int(budget_gib * GIB) if budget_gib is not None else None
    estimate = estimate_memory_parts(
        num_labels=int(labels), head_in=head_in, fan_in=head.fan_in, batch_size=batch,
        encoder_params=enc_params, encoder_trainable=enc_trainable, encoder_activations=enc_act,
        encoder_output_dim=enc_out, encoder_largest_group=enc_largest, intermediate_dim=intermediate,
        aux_clusters=aux, param_bytes=param_bytes,
        encoder_optimizer=model.get("encoder_optimizer", "adamw"), head_optimizer=head.optimizer,
        group_size=head.group_size, head_weight_dtype=head.weight_dtype, head_state_dtype=head.state_dtype,
        dst=dst_args is not None, track_itop=bool((dst_args or {}).get("track_itop", True)),
        itop_rows=(dst_args or {}).get("itop_rows", 65_536),
        gradient_regrowth=(dst_args or {}).get("regrow") == "gradient", lexical_connections=lexical_connections,
        num_lexical_features=lexical_features, lexical_spare=lexical_spare, precision=precision, budget_bytes=budget)
    estimate.notes.extend(notes)
    if transformer is not None:
        estimate.notes.append("encoder activations: Korthikanti et al. (2022) per-layer formula; attention kernels "
                              "that do not keep the s x s scores (flash/memory-efficient SDPA) need less")
    return estimate


def estimate_memory_main(argv: list[str] | None = None) -> int:
    """``xmc-dst estimate-memory --config <yaml> [...]``: print the estimate as a rich table (or JSON)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="xmc-dst estimate-memory",
                                     description="Estimate training memory, dense and sparse head side by side.")
    parser.add_argument("--config", required=True, help="LightningCLI yaml (model/data/trainer sections)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default=None, help="32-true, 16-mixed, bf16-mixed, bf16-true, ...")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per document")
    parser.add_argument("--num-labels", type=int, default=None)
    parser.add_argument("--num-features", type=int, default=None, help="bag-of-words vocabulary size")
    parser.add_argument("--budget-gib", type=float, default=None, help="device memory to fit in")
    parser.add_argument("--encoder-config", default=None, metavar="PATH",
                        help="the encoder's config.json (or its folder) where it is not on this machine")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for option in ("batch_size", "max_length", "num_labels", "num_features", "budget_gib"):
        value = getattr(args, option)
        if value is not None and not value > 0:
            raise ValueError(f"estimate-memory: --{option.replace('_', '-')} must be positive, got {value}")
    estimate = estimate_memory(args.config, batch_size=args.batch_size, precision=args.precision,
                               max_length=args.max_length, num_labels=args.num_labels,
                               num_features=args.num_features, budget_gib=args.budget_gib,
                               encoder_config=args.encoder_config)
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(estimate.table())
        for note in estimate.notes:
            console.print(f"note: {note}")
    return 0 if args.budget_gib is None or estimate.fits("sparse") else 1
