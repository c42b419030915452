"""Inference from a checkpoint, and the JSON-lines writer of the ``predict`` subcommand.

Python API::

    from xmc_dst.inference import Predictor

    predictor = Predictor.from_checkpoint("logs/debtags/version_0/checkpoints/best.ckpt", device="cuda")
    predictor.predict(["vim: Vi IMproved - enhanced vi editor"], k=5)
    # [[("role::program", 0.98), ("use::editing", 0.95), ...]]

A checkpoint written by :class:`xmc_dst.model.XMCModule` holds the hyperparameters (encoder class and settings,
number of labels, tokenizer location), the label names and the data settings (``max_length``), so nothing else is
needed. The encoder is rebuilt from its configuration only (``pretrained_weights=False``): its weights come from the
checkpoint, and no pretrained weights are downloaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from xmc_dst.encoders import encode_texts
from xmc_dst.model import XMCModule, check_checkpoint, check_k, saved_hparams, top_k
from xmc_dst.paths import MINILM_TAIL, minilm_dir
from xmc_dst.texts import text_batch

log = logging.getLogger(__name__)

__all__ = ["JsonLinesPredictionWriter", "Predictor", "load_checkpoint"]

def _relocate(location: str | None) -> str | None:
    """A tokenizer/model location usable here: the shipped MiniLM moves with its package (a path into another
    environment's site-packages is mapped onto this one's); other values are returned unchanged."""
    if location is None or Path(location).exists():
        return location
    if Path(location).parts[-2:] == MINILM_TAIL:
        here = minilm_dir()
        if here is not None:
            return str(here)
    return location


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    weights_only: bool | None = None, **overrides: Any) -> XMCModule:
    """The :class:`XMCModule` of a checkpoint, in eval mode on ``device`` (default: CUDA when available).

    ``overrides`` replace saved hyperparameters (e.g. ``tokenizer=`` a local copy of the tokenizer).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(path, (str, Path)):
        check_checkpoint(path)
    if "tokenizer" not in overrides:
        saved = (saved_hparams(path, weights_only is not False) or {}).get("tokenizer")
        moved = _relocate(saved)
        if moved != saved:
            overrides["tokenizer"] = moved
    overrides.setdefault("pretrained_weights", False)
    module = XMCModule.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only, **overrides)
    return module.to(device).eval()


class Predictor:
    """Top-k labels with scores for raw texts, batched, from a trained :class:`XMCModule`.

    Args:
        module: the trained module (e.g. from :func:`load_checkpoint`).
        tokenizer: a Hugging Face tokenizer or its location (default: the module's, from the checkpoint).
        max_length: tokens per text (default: the training data's, else 128).
        batch_size: texts per forward pass.
        autocast_dtype: run the encoder under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on GPU).
    """

    def __init__(self, module: XMCModule, tokenizer: Any = None, max_length: int | None = None,
                 batch_size: int = 64, autocast_dtype: torch.dtype | None = None) -> None:
        self.module = module.eval()
        self.device = next(module.parameters()).device
        self.label_names = module.label_names
        self.max_length = int(max_length or module.data_info.get("max_length") or 128)
        if int(batch_size) < 1:
            raise ValueError(f"Predictor: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.autocast_dtype = autocast_dtype
        location = tokenizer if tokenizer is not None else _relocate(
            module.hparams.get("tokenizer") or module.data_info.get("tokenizer"))
        if isinstance(location, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(location))
        self.tokenizer = tokenizer

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None, batch_size: int = 64,
                        max_length: int | None = None, tokenizer: Any = None,
                        autocast_dtype: torch.dtype | None = None, **overrides: Any) -> Predictor:
        """Load a checkpoint (see :func:`load_checkpoint`) and wrap it."""
        if isinstance(tokenizer, (str, Path)):
            overrides.setdefault("tokenizer", str(tokenizer))
        module = load_checkpoint(path, device, **overrides)
        return cls(module, tokenizer, max_length, batch_size, autocast_dtype)

    def encode(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        """The text batch dict of ``texts`` (padded to the longest, truncated to ``max_length``; with the lexical
        features of the whole texts when the encoder projects them); a ``str`` is one text."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (bag-of-words data): use topk_batch with feature batches")
        texts = text_batch(texts, "Predictor.encode")  # the TF-IDF vocabulary travels in the checkpoint's buffers
        return encode_texts(self.module.encoder, self.tokenizer, texts, self.max_length, self.device)

    @torch.no_grad()
    def topk_batch(self, batch: Mapping[str, Tensor], k: int = 5) -> tuple[Tensor, Tensor]:
        """(scores, label ids) [batch, k] of one batch dict (text or bag-of-words), best first."""
        check_k(k)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.module(batch)
        scores, ids = top_k(logits.float(), k)
        return self.module.scores(scores), ids

    def topk(self, texts: str | Sequence[str], k: int = 5) -> tuple[Tensor, Tensor]:
        """(scores, label ids) [len(texts), k] on CPU, in batches of ``batch_size``; a ``str`` is one text."""
        check_k(k)
        texts = text_batch(texts, "Predictor.topk")
        scores, ids = [], []
        for start in range(0, len(texts), self.batch_size):
            s, i = self.topk_batch(self.encode(texts[start:start + self.batch_size]), k)
            scores.append(s.cpu())
            ids.append(i.cpu())
        if not scores:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(scores), torch.cat(ids)

    def predict(self, texts: str | Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """For each text, its top ``k`` (label name, score) pairs, best first; a ``str`` is one text (one list of
        pairs comes back)."""
        scores, ids = self.topk(text_batch(texts, "Predictor.predict"), k)
        return [
            [(self._name(int(i)), float(s)) for s, i in zip(row_s, row_i, strict=True) if int(i) >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def _name(self, label: int) -> str:
        return self.label_names[label] if self.label_names is not None else str(label)


class JsonLinesPredictionWriter(BasePredictionWriter):
    """Writes the ``predict`` outputs as JSON lines ``{"index", "labels", "scores"}``, one per document.

    ``index`` is the document's line number (0-based) in the prediction file; ``labels`` are label names (ids when
    the model has none). Args: ``output``, the file (default ``<log dir>/predictions.jsonl``; with several
    processes each writes ``<name>.rank<r>.jsonl``).
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.path: Path | None = None
        self._file = None

    def on_predict_start(self, trainer, pl_module) -> None:
        base = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir,
                                                           "predictions.jsonl")
        if trainer.world_size > 1:
            base = base.with_name(f"{base.stem}.rank{trainer.global_rank}{base.suffix}")
        base.parent.mkdir(parents=True, exist_ok=True)
        self.path = base
        self._file = base.open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        names = getattr(pl_module, "label_names", None)
        docs = prediction["doc_index"].tolist()
        scores, ids = prediction["scores"].tolist(), prediction["label_ids"].tolist()
        for doc, row_scores, row_ids in zip(docs, scores, ids, strict=True):
            kept = [(i, s) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            record = {
                "index": int(doc),
                "labels": [names[i] if names is not None else i for i, _ in kept],
                "scores": [round(float(s), 6) for _, s in kept],
            }
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            log.info("predictions written to %s", self.path)
            if trainer.is_global_zero:
                print(f"Predictions written to {self.path}")
