"""Write a synthetic extreme-classification dataset in the raw-text layout, at any size.

The statistics follow what real XMC data looks like, so that throughput and memory measured on it carry over:

* label frequencies follow a power law (Zipf with exponent ``--zipf``, over a random permutation of label ids), so a
  few head labels are everywhere and most labels are rare;
* a few labels per document (1 + Poisson(``--labels-per-doc`` - 1));
* texts are drawn from label-dependent word distributions: each label owns ``--topic-words`` characteristic words,
  and a document mixes words of its labels' topics with Zipf-distributed background words; words are pronounceable
  pseudo-words, so a WordPiece tokenizer splits them into a realistic number of pieces.

Files: ``train_texts.txt``, ``train_labels.txt``, ``test_texts.txt``, ``test_labels.txt`` (what
``datamodules.RawTextXMCDataModule`` reads). Written in chunks with bounded memory, into a temporary directory that
is renamed into place at the end.

    python benchmarks/synthetic.py data/synthetic-670k --num-labels 670000 --train 100000 --test 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["an", "en", "in", "on", "ar", "er", "or", "ul"]
SPLITS = ("train", "test")


def pseudo_word(index: int) -> str:
    """A deterministic pronounceable word for ``index`` (base-len(SYLLABLES) digits, at least two syllables)."""
    base = len(SYLLABLES)
    parts = [SYLLABLES[index % base]]
    index //= base
    while index or len(parts) < 2:
        parts.append(SYLLABLES[index % base])
        index //= base
    return "".join(reversed(parts))


def zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def write_dataset(out_dir: Path, num_labels: int, num_train: int, num_test: int, labels_per_doc: float = 5.0,
                  words_per_doc: int = 60, vocab_size: int = 50_000, topic_words: int = 16, topic_share: float = 0.5,
                  zipf: float = 1.0, seed: int = 0, chunk: int = 20_000) -> dict:
    """Write the four files into ``out_dir`` (replaced atomically) and return summary statistics."""
    rng = np.random.default_rng(seed)
    label_order = rng.permutation(num_labels)  # which label id gets which popularity rank
    label_cdf = np.cumsum(zipf_probabilities(num_labels, zipf))
    word_cdf = np.cumsum(zipf_probabilities(vocab_size, 1.0))
    topics = rng.integers(0, vocab_size, size=(num_labels, topic_words), dtype=np.int32)
    vocab = np.array([pseudo_word(i) for i in range(vocab_size)], dtype=object)
    label_names = np.array([f"L{i}" for i in range(num_labels)], dtype=object)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    label_counts = np.zeros(num_labels, dtype=np.int64)
    total_labels = 0
    try:
        for split, count in zip(SPLITS, (num_train, num_test), strict=True):
            with open(tmp / f"{split}_texts.txt", "w", encoding="utf-8") as texts, \
                    open(tmp / f"{split}_labels.txt", "w", encoding="utf-8") as labels:
                for start in range(0, count, chunk):
                    n = min(chunk, count - start)
                    per_doc = 1 + rng.poisson(max(0.0, labels_per_doc - 1.0), size=n)
                    ranks = np.searchsorted(label_cdf, rng.random(per_doc.sum()), side="right")
                    doc_labels = label_order[np.minimum(ranks, num_labels - 1)]
                    bounds = np.concatenate([[0], np.cumsum(per_doc)])
                    n_topic = rng.binomial(words_per_doc, topic_share, size=n)
                    background = np.searchsorted(word_cdf, rng.random((n, words_per_doc)), side="right")
                    text_lines, label_lines = [], []
                    for d in range(n):
                        mine = np.unique(doc_labels[bounds[d]:bounds[d + 1]])
                        if split == "train":
                            label_counts[mine] += 1
                        total_labels += len(mine)
                        owners = mine[rng.integers(0, len(mine), size=n_topic[d])]
                        words = topics[owners, rng.integers(0, topic_words, size=n_topic[d])]
                        tokens = np.concatenate([words, background[d, : words_per_doc - n_topic[d]]])
                        rng.shuffle(tokens)
                        text_lines.append(" ".join(vocab[np.minimum(tokens, vocab_size - 1)]))
                        label_lines.append(" ".join(label_names[mine]))
                    texts.write("\n".join(text_lines) + "\n")
                    labels.write("\n".join(label_lines) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "labels": num_labels,
        "train": num_train,
        "test": num_test,
        "labels_seen_in_train": int((label_counts > 0).sum()),
        "avg_labels_per_doc": total_labels / max(1, num_train + num_test),
        "top_label_share": float(label_counts.max() / max(1, num_train)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-labels", type=int, default=31_000)
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--test", type=int, default=2_000)
    parser.add_argument("--labels-per-doc", type=float, default=5.0)
    parser.add_argument("--words-per-doc", type=int, default=60)
    parser.add_argument("--vocab-size", type=int, default=50_000)
    parser.add_argument("--topic-words", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the label-frequency power law")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stats = write_dataset(args.out_dir, args.num_labels, args.train, args.test, args.labels_per_doc,
                          args.words_per_doc, args.vocab_size, args.topic_words, zipf=args.zipf, seed=args.seed)
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s: {stats}")


if __name__ == "__main__":
    main()
