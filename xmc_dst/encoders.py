"""Document encoders: plain ``nn.Module`` components that turn a batch dict into one feature vector per document.

They are kept apart from the LightningModule (as in the lightning-hydra-template) and built by it: the module is
given an encoder *factory* (a class or ``functools.partial``; in yaml a ``class_path`` with ``init_args``) and calls
it with :class:`EncoderInputs`, which carries what comes from the data (the tokenizer / weights location, the
number of bag-of-words features). That is how the DataModule's tokenizer reaches the encoder through one argument
link, without naming the encoder twice.

Every encoder has ``output_dim`` and ``forward(batch) -> [batch, output_dim]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from xmc_dst.lexical import LexicalVocabulary
from xmc_dst.texts import text_batch

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean", "cls_concat"]
Activation = Literal["identity", "relu", "gelu", "tanh"]

__all__ = ["ACTIVATIONS", "BagOfWordsEncoder", "EncoderFactory", "EncoderInputs", "TransformerEncoder",
           "LexicalProjection", "activation", "encode_texts", "masked_mean"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    """An activation module by name (``identity``, ``relu``, ``gelu``, ``tanh``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


@dataclass(frozen=True)
class EncoderInputs:
    """What an encoder needs from the data, passed by the LightningModule when it builds the encoder.

    Attributes:
        tokenizer: directory or hub name of the tokenizer of text data (also where the encoder weights are, unless
            the encoder names another place).
        num_features: vocabulary size of bag-of-words data.
        num_lexical_features: width of the data's lexical TF-IDF features (text data with ``lexical_features``).
        pretrained_weights: load the pretrained weights (False: the architecture only, e.g. before loading a
            checkpoint that holds all weights anyway).
    """

    tokenizer: str | None = None
    num_features: int | None = None
    num_lexical_features: int | None = None
    pretrained_weights: bool = True


EncoderFactory = Callable[[EncoderInputs], nn.Module]


def encode_texts(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                 device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The batch dict ``encoder`` reads for raw ``texts``: token ids padded to the longest and truncated to
    ``max_length``, plus the lexical TF-IDF entries when the encoder projects them (its vocabulary set)."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
    lexical = getattr(encoder, "lexical", None)
    if lexical is not None:
        batch.update({key: value.to(device) for key, value in lexical.featurize(texts).items()})
    return batch


def masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [batch, seq, dim] over the positions where ``attention_mask`` is 1 (0 for empty rows)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class LexicalProjection(nn.Module):
    """A trainable linear map of the document's sparse TF-IDF vector: an ``EmbeddingBag`` weighted by the values.

    The table has one row per lexical feature; a batch touches the rows of its documents' terms only, so the
    gradient is sparse and the optimizer (:class:`xmc_dst.optim.GroupwiseOptimizer`) updates only those rows: a
    vocabulary of hundreds of thousands of terms costs its table (and two Adam moments) in memory, not in time.
    The fitted vocabulary (term keys, idf, n-gram length: :class:`xmc_dst.lexical.LexicalVocabulary`) is held in
    buffers, so a checkpoint carries what inference needs to featurise new texts (:meth:`featurize`); the model
    copies it from the DataModule (:meth:`set_vocabulary`).

    Args:
        num_features: the vocabulary's size.
        dim: output width.
        lr: learning rate of the table's optimizer group.
    """

    def __init__(self, num_features: int, dim: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(num_features, dim, mode="sum", sparse=True)
        nn.init.normal_(self.bag.weight, std=0.5 * dim**-0.5)
        self.lr = float(lr)
        self.register_buffer("keys", torch.zeros(num_features, dtype=torch.long))
        self.register_buffer("idf", torch.zeros(num_features))
        self.register_buffer("ngrams", torch.zeros((), dtype=torch.long))

    @classmethod
    def for_inputs(cls, inputs: EncoderInputs, dim: int, lr: float) -> LexicalProjection | None:
        """The projection an encoder asked for (``dim > 0``), sized by the data's lexical features."""
        if dim < 0:
            raise ValueError(f"lexical_dim must be >= 0, got {dim}")
        if dim == 0:
            return None
        if not inputs.num_lexical_features:
            raise ValueError(f"lexical_dim={dim} needs lexical features from the data: set the DataModule's "
                             "lexical_features (e.g. --data.init_args.lexical_features 100000), or lexical_dim 0")
        return cls(int(inputs.num_lexical_features), dim, lr)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        return [dict(name="lexical", params=[self.bag.weight], lr=self.lr, weight_decay=0.0)]

    @torch.no_grad()
    def set_vocabulary(self, vocabulary: LexicalVocabulary) -> None:
        """Hold ``vocabulary`` (from the DataModule); it must have as many features as the table has rows."""
        if len(vocabulary) != self.keys.numel():
            raise ValueError(f"the data has {len(vocabulary)} lexical features, the lexical projection was built for "
                             f"{self.keys.numel()}")
        self.keys.copy_(torch.from_numpy(vocabulary.kept))
        self.idf.copy_(torch.from_numpy(vocabulary.idf))
        self.ngrams.fill_(vocabulary.ngrams)

    def vocabulary(self) -> LexicalVocabulary:
        if int(self.ngrams) < 1:
            raise RuntimeError("the lexical projection holds no vocabulary yet (set_vocabulary, or a checkpoint)")
        return LexicalVocabulary(self.keys.cpu().numpy(), self.idf.cpu().numpy(), int(self.ngrams))

    def featurize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """The ``lexical_ids``/``lexical_values``/``lexical_offsets`` batch entries of raw texts (a ``str`` is one)."""
        vocabulary = self.vocabulary()
        rows = [vocabulary.transform(text) for text in text_batch(texts, "featurize")]
        lengths = torch.tensor([0] + [len(ids) for ids, _ in rows])
        device = self.keys.device
        return {
            "lexical_ids": torch.from_numpy(np.concatenate([ids for ids, _ in rows])).long().to(device),
            "lexical_values": torch.from_numpy(np.concatenate([v for _, v in rows])).float().to(device),
            "lexical_offsets": torch.cumsum(lengths, 0).to(device),
        }

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "lexical_ids" not in batch:
            raise KeyError("the batch has no lexical features: the encoder's lexical_dim needs the DataModule's "
                           "lexical_features")
        offsets = batch["lexical_offsets"]
        return self.bag(batch["lexical_ids"].long(), offsets[:-1].long(),
                        per_sample_weights=batch["lexical_values"].to(self.bag.weight.dtype))


class TransformerEncoder(nn.Module):
    """A Hugging Face ``AutoModel`` (hub name or local directory) pooled to one vector, then dropout.

    Args:
        inputs: from the data (see :class:`EncoderInputs`); ``inputs.tokenizer`` is the model location by default.
        pooling: ``mean`` (mean over the real tokens), ``cls`` (first token) or ``cls_concat`` (first token of
            each of the last ``num_layers`` layers, concatenated: the authors' ``last_nhidden_conlast``).
        num_layers: layers concatenated by ``cls_concat``.
        layers: the hidden states pooled, concatenated in this order (0 is the embedding layer's output, -1 the
            last layer); default ``[-1]`` (``cls_concat``: ``[-1, ..., -num_layers]``). The embedding layer's
            mean adds lexical detail that the last layer has mixed away (on short texts such as Debtags,
            ``[-1, 0]`` gains over 2 points of P@1 over ``[-1]`` with a frozen MiniLM).
        dropout: dropout on the pooled vector (the authors' ``embed_dropout``).
        pretrained: model location when it differs from the tokenizer's.
        trainable_layers: train only the top ``n`` transformer layers (and nothing below them, embeddings
            included); -1 trains everything, 0 freezes the encoder. A frozen encoder runs in eval mode (no dropout
            inside it) and without autograd.
        compile: compile the transformer with ``torch.compile`` (opt-in: it pays off on long GPU runs only).
        compile_options: keyword arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        cache_features: with a frozen encoder (``trainable_layers=0``), keep each document's pooled vector in
            memory, keyed by its token ids, and compute it only the first time the document is seen. The pooled
            vector is a pure function of the tokens then, so this is exact; it turns every epoch after the first
            into head-only training. Memory: ``output_dim`` floats per distinct document (small datasets).
        length_chunks: run each batch as this many chunks of documents of similar length, each trimmed to its
            longest document: less compute on padding when the batch's lengths vary (pays off on CPU; the results
            are those of the whole batch, as padding is masked).
        lexical_dim: width of a trainable projection of the document's TF-IDF vector (the data's lexical
            features: ``lexical_features`` of the text DataModules), concatenated to the pooled vector before the
            dropout (0: none). The exact words of a short text (names, versions, technical terms), which a frozen
            sentence embedding blurs, reach the layers above; XR-Transformer and NGAME-style systems combine the
            same sparse features with their encoder. See :class:`LexicalProjection`.
        lexical_lr: learning rate of the projection (its own optimizer group: sparse, lazily updated rows).
    """

    def __init__(self, inputs: EncoderInputs, pooling: Pooling = "mean", num_layers: int = 1,
                 layers: list[int] | None = None, dropout: float = 0.0, pretrained: str | None = None,
                 trainable_layers: int = -1, compile: bool = False, compile_options: dict[str, Any] | None = None,
                 gradient_checkpointing: bool = False, cache_features: bool = False, length_chunks: int = 1,
                 lexical_dim: int = 0, lexical_lr: float = 1e-3) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "cls_concat"):
            raise ValueError(f"pooling must be cls, mean or cls_concat, got {pooling!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        location = pretrained or inputs.tokenizer
        if location is None:
            raise ValueError("TransformerEncoder needs a model location: the data's tokenizer or `pretrained`")
        self.location, self.pooling, self.num_layers = str(location), pooling, num_layers
        self.transformer = _load_transformer(self.location, inputs.pretrained_weights)
        hidden = int(self.transformer.config.hidden_size)
        available = int(getattr(self.transformer.config, "num_hidden_layers", 0)) + 1  # hidden states, embeddings too
        if layers is None:
            layers = [-i for i in range(1, num_layers + 1)] if pooling == "cls_concat" else [-1]
        if not layers or any(not -available <= layer < available for layer in layers):
            raise ValueError(f"layers must index the {available} hidden states of {location} (0: embeddings), "
                             f"got {layers}")
        self.layers = [int(layer) for layer in layers]
        self.lexical = LexicalProjection.for_inputs(inputs, lexical_dim, lexical_lr)
        self.output_dim = hidden * len(self.layers) + lexical_dim
        self.dropout = nn.Dropout(dropout)
        self.frozen = _freeze_below(self.transformer, trainable_layers)
        if cache_features and not self.frozen:
            raise ValueError("cache_features needs a frozen encoder (trainable_layers=0)")
        self.cache: dict[bytes, Tensor] | None = {} if cache_features else None
        if length_chunks < 1:
            raise ValueError(f"length_chunks must be >= 1, got {length_chunks}")
        self.length_chunks = length_chunks
        if gradient_checkpointing:
            self.transformer.gradient_checkpointing_enable()
        if compile:
            self.transformer.compile(**(compile_options or {}))

    def train(self, mode: bool = True) -> TransformerEncoder:
        """Keep a frozen transformer in eval mode (its dropout off) while the rest trains."""
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The pooled transformer output, before dropout (in ``length_chunks`` chunks of similar length)."""
        if self.length_chunks == 1 or input_ids.shape[0] < 2 * self.length_chunks:
            return self._pooled(input_ids, attention_mask)
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths)
        parts = []
        for rows in torch.tensor_split(order, self.length_chunks):
            width = max(1, int(lengths[rows].max()))
            parts.append(self._pooled(input_ids[rows, :width], attention_mask[rows, :width]))
        out = torch.cat(parts)
        return out[torch.argsort(order)]

    def _pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        want_hidden = self.layers != [-1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=want_hidden, return_dict=True)
        states = [out.hidden_states[layer] for layer in self.layers] if want_hidden else [out.last_hidden_state]
        if self.pooling == "mean":
            pooled = [masked_mean(state, attention_mask) for state in states]
        else:
            pooled = [state[:, 0] for state in states]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)

    def _pooled_cached(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1).tolist()
        tokens = input_ids.cpu().numpy()
        keys = [tokens[i, : int(n)].tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            fresh = self.pooled(input_ids[rows], attention_mask[rows]).detach()
            for j, i in enumerate(missing):
                self.cache[keys[i]] = fresh[j]
        return torch.stack([self.cache[key] for key in keys]).to(input_ids.device)

    def own_optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with settings of their own (the lexical projection), apart from the encoder's."""
        return self.lexical.optimizer_groups() if self.lexical is not None else []

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if self.cache is not None:
            pooled = self._pooled_cached(input_ids, attention_mask)
        else:
            pooled = self.pooled(input_ids, attention_mask)
        if self.lexical is not None:
            pooled = torch.cat([pooled, self.lexical(batch)], dim=-1)
        return self.dropout(pooled)


def _load_transformer(location: str, pretrained_weights: bool) -> nn.Module:
    """``AutoModel`` without its pooling layer where the architecture has one (it is not used)."""
    from transformers import AutoConfig, AutoModel

    if not pretrained_weights:
        config = AutoConfig.from_pretrained(location)
        try:
            return AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_config(config)
    try:
        return AutoModel.from_pretrained(location, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(location)


def _freeze_below(transformer: nn.Module, trainable_layers: int) -> bool:
    """Freeze all but the top ``trainable_layers`` layers; return True when everything is frozen."""
    if trainable_layers < 0:
        return False
    layers = _layer_list(transformer)
    if trainable_layers > 0 and layers is None:
        raise ValueError("trainable_layers > 0 needs an encoder with a `layer`/`layers` list; use -1 or 0")
    for param in transformer.parameters():
        param.requires_grad_(False)
    if trainable_layers == 0:
        return True
    for layer in list(layers)[-trainable_layers:]:
        for param in layer.parameters():
            param.requires_grad_(True)
    return False


def _layer_list(transformer: nn.Module) -> nn.ModuleList | None:
    for owner in (getattr(transformer, "encoder", None), transformer):
        for name in ("layer", "layers"):
            candidate = getattr(owner, name, None) if owner is not None else None
            if isinstance(candidate, nn.ModuleList):
                return candidate
    return None


class BagOfWordsEncoder(nn.Module):
    """Sparse bag-of-words features -> embedding bag (weighted sum of feature embeddings) -> dense layer.

    The batch holds CSR features (``feature_ids``, ``feature_values``, ``feature_offsets``); the embedding bag
    sums the rows of the embedding table weighted by the feature values, which is a sparse x dense product that
    never densifies the input.

    Args:
        inputs: from the data; ``inputs.num_features`` is the vocabulary size.
        embedding_dim: width of the feature embeddings.
        hidden_dim: output width of the dense layer (0: no dense layer, the embedding bag is the output).
        activation: after the embedding bag and after the dense layer.
        dropout: on the output.
        normalize: L2-normalise each document's feature values first (documents of any length on one scale).
    """

    def __init__(self, inputs: EncoderInputs, embedding_dim: int = 512, hidden_dim: int = 512,
                 activation: Activation = "relu", dropout: float = 0.0, normalize: bool = True) -> None:
        super().__init__()
        if inputs.num_features is None or inputs.num_features < 1:
            raise ValueError("BagOfWordsEncoder needs the number of features of the data (bag-of-words data)")
        self.num_features, self.normalize = int(inputs.num_features), normalize
        self.embedding = nn.EmbeddingBag(self.num_features, embedding_dim, mode="sum")
        nn.init.normal_(self.embedding.weight, std=1.0 / embedding_dim**0.5)
        self.act1 = _activation(activation)
        self.dense = nn.Linear(embedding_dim, hidden_dim) if hidden_dim > 0 else None
        self.act2 = _activation(activation) if hidden_dim > 0 else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.output_dim = hidden_dim if hidden_dim > 0 else embedding_dim

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        ids = batch["feature_ids"].long()
        values = batch["feature_values"].to(self.embedding.weight.dtype)
        offsets = batch["feature_offsets"].long()
        if self.normalize and values.numel():
            rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=ids.device),
                                           offsets[1:] - offsets[:-1], output_size=values.numel())
            norms = torch.zeros(offsets.numel() - 1, dtype=values.dtype, device=values.device)
            norms.index_add_(0, rows, values * values)
            values = values / norms.sqrt().clamp(min=1e-12)[rows]
        x = self.embedding(ids, offsets[:-1], per_sample_weights=values)
        x = self.act1(x)
        if self.dense is not None:
            x = self.act2(self.dense(x))
        return self.dropout(x)


def _activation(name: str) -> nn.Module:
    return activation(name)
