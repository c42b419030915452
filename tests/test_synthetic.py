"""The synthetic XMC generator (benchmarks/synthetic.py) produces the statistics it is asked for, in a readable layout.

Checked on a tiny size (a few seconds): the label-frequency power law (exponent fitted on the head of the
rank-frequency curve), distinct labels per document with the requested mean, every label present in training (so the
reader's label vocabulary has exactly ``num_labels`` labels), label-dependent texts, and that
``RawTextXMCDataModule`` reads and batches the files.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SYNTHETIC = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic.py"


def load_synthetic() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synthetic_benchmark_data", SYNTHETIC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_labels(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines()]


def fitted_exponent(counts: Counter, first: int = 5, last: int = 100) -> float:
    """Slope of log(frequency) against log(rank) over ranks ``first..last``, negated (a Zipf exponent)."""
    freq = np.sort(np.array(list(counts.values()), dtype=np.float64))[::-1][first - 1:last]
    ranks = np.arange(first, first + len(freq), dtype=np.float64)
    return -float(np.polyfit(np.log(ranks), np.log(freq), 1)[0])


@pytest.mark.parametrize("zipf", [0.8, 1.2])
def test_statistics_match_the_request(tmp_path: Path, zipf: float) -> None:
    synthetic = load_synthetic()
    out = tmp_path / "syn"
    stats = synthetic.write_dataset(out, num_labels=2_000, num_train=6_000, num_test=300, labels_per_doc=5.0,
                                    words_per_doc=20, vocab_size=5_000, zipf=zipf, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["synthetic.json", "test_labels.txt", "test_texts.txt",
                                                     "train_labels.txt", "train_texts.txt"]
    assert json.loads((out / "synthetic.json").read_text())["stats"] == stats
    train = read_labels(out / "train_labels.txt")
    texts = (out / "train_texts.txt").read_text(encoding="utf-8").splitlines()
    assert len(train) == len(texts) == 6_000 and len(read_labels(out / "test_labels.txt")) == 300
    assert all(len(set(labels)) == len(labels) >= 1 for labels in train)  # distinct, at least one
    assert abs(np.mean([len(labels) for labels in train]) - 5.0) < 0.15
    assert all(len(text.split()) == 20 for text in texts)

    counts = Counter(label for labels in train for label in labels)
    assert len(counts) == 2_000 and stats["labels_seen_in_train"] == 2_000 and min(counts.values()) >= 1
    # the power law: the head of the rank-frequency curve has the requested slope (duplicate redraws and the one
    # guaranteed occurrence per label bend it a little)
    assert abs(fitted_exponent(counts) - zipf) < 0.15

    # label-dependent texts: the documents of the most frequent label over-use a few words (its topic words)
    top = counts.most_common(1)[0][0]
    inside = Counter(w for text, labels in zip(texts, train, strict=True) if top in labels for w in text.split())
    outside = Counter(w for text, labels in zip(texts, train, strict=True) if top not in labels for w in text.split())
    n_in, n_out = sum(inside.values()), sum(outside.values())
    ratios = sorted(((inside[w] / n_in) / ((outside[w] + 1) / n_out) for w in inside if inside[w] >= 20), reverse=True)
    assert len(ratios) >= 10 and ratios[9] > 5.0


def test_too_few_documents_for_every_label(tmp_path: Path) -> None:
    synthetic = load_synthetic()
    with pytest.raises(ValueError, match="training documents or min_label_count=0"):
        synthetic.write_dataset(tmp_path / "x", num_labels=1_000, num_train=100, num_test=10)
    stats = synthetic.write_dataset(tmp_path / "y", num_labels=1_000, num_train=100, num_test=10, min_label_count=0)
    assert stats["labels_seen_in_train"] < 1_000 and not (tmp_path / "x").exists()


def test_readable_by_the_raw_text_datamodule(tmp_path: Path, tiny_encoder_dir: Path) -> None:
    from datamodules import RawTextXMCDataModule

    synthetic = load_synthetic()
    out = tmp_path / "syn"
    synthetic.write_dataset(out, num_labels=300, num_train=400, num_test=50, words_per_doc=12, vocab_size=1_000)
    data = RawTextXMCDataModule(out, tokenizer=str(tiny_encoder_dir), max_length=16, batch_size=8,
                                cache_dir=tmp_path / "cache")
    assert data.num_labels == 300 and data.num_train_docs == 400
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (8, 16) and batch["label_offsets"].shape == (9,)
    assert data.dropped_test_labels["unseen_label_occurrences"] == 0  # every label is in training
