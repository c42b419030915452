"""Shared fixtures: offline settings and a tiny random BERT with a WordPiece tokenizer.

The tiny encoder is saved in a temporary directory and loaded through the same ``from_pretrained`` code as the
shipped MiniLM, so tests exercise the real loading path without network or large weights.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA, Triton kernels run through Triton's CPU interpreter (read when xmc_dst.triton_fan_in is imported);
# with CUDA they compile, and the interpreter-only tests skip themselves.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_encoder(directory: Path, words: list[str] | None = None, hidden_size: int = 32) -> Path:
    """Write a random 2-layer BERT and a WordPiece tokenizer to ``directory`` and return it."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = ["##" + ch for ch in letters]
    base = ["the", "a", "of", "and", "for", "library", "tool", "data", "python", "file", "game", "network"]
    vocab = SPECIAL_TOKENS + list(dict.fromkeys(base + (words or []))) + letters + pieces + list(".,:;-_()/+'\"!?")
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "BertTokenizer", "do_lower_case": true, "model_max_length": 512}', encoding="utf-8"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT + WordPiece tokenizer directory, loadable with ``AutoModel/AutoTokenizer``."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


TOPICS = {"python": "lang::python", "game": "use::gameplaying", "network": "protocol::ip", "data": "works-with::db",
          "file": "works-with::file", "library": "role::shared-lib"}


def write_topic_dataset(directory: Path, train: int = 48, test: int = 16, seed: int = 0) -> Path:
    """A raw-text dataset whose labels are the topic words of each document (learnable in a few epochs)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        texts, labels = [], []
        for _ in range(count):
            words = rng.sample(sorted(TOPICS), rng.randint(1, 3))
            texts.append(" ".join(words + ["the", "tool"]))
            labels.append(" ".join(TOPICS[w] for w in words))
        (directory / f"{split}_texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        (directory / f"{split}_labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    return directory


# Planted topics for label clustering and the auxiliary objective: each document is about one of GROUPS topics.
GROUPS, LABELS_PER_GROUP, FEATURES_PER_GROUP = 4, 8, 10
OUT, VOCAB = GROUPS * LABELS_PER_GROUP, GROUPS * FEATURES_PER_GROUP


def planted_batches(num_docs: int = 96, batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Documents about one of GROUPS topics: 3 labels and 5 features of that topic, 1 random feature."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        topic = int(torch.randint(GROUPS, (1,), generator=g))
        labels = topic * LABELS_PER_GROUP + torch.randperm(LABELS_PER_GROUP, generator=g)[:3]
        features = topic * FEATURES_PER_GROUP + torch.randperm(FEATURES_PER_GROUP, generator=g)[:5]
        features = torch.unique(torch.cat([features, torch.randint(VOCAB, (1,), generator=g)]))
        docs.append((features, labels.sort().values))
    batches = []
    for start in range(0, num_docs, batch_size):
        chunk = docs[start:start + batch_size]
        x = torch.zeros(len(chunk), VOCAB)
        y = torch.zeros(len(chunk), OUT)
        for i, (f, lab) in enumerate(chunk):
            x[i, f], y[i, lab] = 1.0, 1.0
        batches.append({
            "x": x, "y": y,
            "feature_ids": torch.cat([f for f, _ in chunk]),
            "feature_values": torch.ones(sum(len(f) for f, _ in chunk)),
            "feature_offsets": torch.tensor([0] + [len(f) for f, _ in chunk]).cumsum(0),
            "label_ids": torch.cat([lab for _, lab in chunk]),
            "label_offsets": torch.tensor([0] + [len(lab) for _, lab in chunk]).cumsum(0),
        })
    return batches
