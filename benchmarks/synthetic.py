"""Write a synthetic extreme-classification dataset in the raw-text layout, at any size.

Why: throughput and memory at 31K-3M labels need data of that size without downloading the Extreme Classification
Repository; the statistics follow what real XMC data looks like, so that what is measured on it carries over:

* label frequencies follow a power law (Zipf with exponent ``--zipf`` over popularity ranks, ranks assigned to label
  ids by a random permutation), so a few head labels are everywhere and most labels are rare;
* a few labels per document: ``1 + Poisson(--labels-per-doc - 1)`` *distinct* labels (a label drawn twice for one
  document is redrawn, so the mean is the requested one);
* every label occurs in at least ``--min-label-count`` training documents (default 1): the readers take the label
  vocabulary from the training labels, so this is what makes a model built on the data have exactly
  ``--num-labels`` outputs. Those occurrences take randomly chosen label slots of the training documents, the
  other slots follow the power law; the training split therefore needs about ``num_labels * min_label_count /
  labels_per_doc`` documents (an error says so when it has fewer; ``--min-label-count 0`` turns this off);
* texts are drawn from label-dependent word distributions: each label owns ``--topic-words`` characteristic words,
  and a document mixes words of its labels' topics (share ``topic_share``) with Zipf-distributed background words;
  words are pronounceable pseudo-words, so a WordPiece tokenizer splits them into a realistic number of pieces.

Files: ``train_texts.txt``, ``train_labels.txt``, ``test_texts.txt``, ``test_labels.txt`` (what
``datamodules.RawTextXMCDataModule`` reads), and ``synthetic.json`` with the settings and summary statistics.
Written in chunks with bounded memory (besides ``O(num_labels)`` tables), into a temporary directory that is renamed
into place at the end. About 25K documents/s on one core.

    python benchmarks/synthetic.py data/synthetic-31k --num-labels 31000 --train 20000 --test 2000
    python benchmarks/synthetic.py data/synthetic-670k --num-labels 670000 --train 490000 --test 150000
"""

from __future__ import annotations

import argparse
import json
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
                  zipf: float = 1.0, seed: int = 0, chunk: int = 20_000, min_label_count: int = 1) -> dict:
    """Write the four files and ``synthetic.json`` into ``out_dir`` (replaced atomically); return the statistics."""
    if num_labels < 1 or num_train < 1 or num_test < 0 or labels_per_doc < 1 or words_per_doc < 1:
        raise ValueError("need num_labels >= 1, num_train >= 1, num_test >= 0, labels_per_doc >= 1, words_per_doc >= 1")
    settings = {"num_labels": num_labels, "num_train": num_train, "num_test": num_test,
                "labels_per_doc": labels_per_doc, "words_per_doc": words_per_doc, "vocab_size": vocab_size,
                "topic_words": topic_words, "topic_share": topic_share, "zipf": zipf, "seed": seed,
                "min_label_count": min_label_count}
    rng = np.random.default_rng(seed)
    label_order = rng.permutation(num_labels)  # which label id gets which popularity rank
    label_cdf = np.cumsum(zipf_probabilities(num_labels, zipf))
    word_cdf = np.cumsum(zipf_probabilities(vocab_size, 1.0))
    topics = rng.integers(0, vocab_size, size=(num_labels, topic_words), dtype=np.int32)
    vocab = np.array([pseudo_word(i) for i in range(vocab_size)], dtype=object)
    label_names = np.array([f"L{i}" for i in range(num_labels)], dtype=object)

    def draw_labels(n: int) -> np.ndarray:
        ranks = np.searchsorted(label_cdf, rng.random(n), side="right")
        return label_order[np.minimum(ranks, num_labels - 1)]

    # Distinct labels per document, decided up front so that the coverage slots can be placed over the whole split.
    per_doc = {split: np.minimum(1 + rng.poisson(labels_per_doc - 1.0, size=count), num_labels)
               for split, count in zip(SPLITS, (num_train, num_test), strict=True)}
    train_slots = int(per_doc["train"].sum())
    needed = num_labels * max(0, min_label_count)
    cover = np.full(train_slots, -1, dtype=np.int64)  # slot -> label forced there (-1: drawn from the power law)
    if needed:
        if needed > train_slots:
            raise ValueError(
                f"{num_labels} labels x min_label_count {min_label_count} need {needed} training label slots, the "
                f"{num_train} training documents have {train_slots}: use about "
                f"{int(np.ceil(needed * 1.05 / labels_per_doc))} training documents or min_label_count=0")
        cover[rng.choice(train_slots, size=needed, replace=False)] = rng.permutation(
            np.repeat(np.arange(num_labels), min_label_count))

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    label_counts = np.zeros(num_labels, dtype=np.int64)
    total_labels = {split: 0 for split in SPLITS}
    try:
        for split, count in zip(SPLITS, (num_train, num_test), strict=True):
            slot = 0  # global slot index of the chunk's first document
            with open(tmp / f"{split}_texts.txt", "w", encoding="utf-8") as texts, \
                    open(tmp / f"{split}_labels.txt", "w", encoding="utf-8") as labels:
                for start in range(0, count, chunk):
                    n = min(chunk, count - start)
                    wanted = per_doc[split][start:start + n]
                    doc_labels = draw_labels(int(wanted.sum()))
                    if split == "train":
                        forced = cover[slot:slot + len(doc_labels)]
                        doc_labels = np.where(forced >= 0, forced, doc_labels)
                    slot += len(doc_labels)
                    bounds = np.concatenate([[0], np.cumsum(wanted)])
                    n_topic = rng.binomial(words_per_doc, topic_share, size=n)
                    background = np.searchsorted(word_cdf, rng.random((n, words_per_doc)), side="right")
                    text_lines, label_lines = [], []
                    for d in range(n):
                        mine = np.unique(doc_labels[bounds[d]:bounds[d + 1]])
                        while len(mine) < wanted[d]:  # a label drawn twice: redraw, keeping the mean requested
                            mine = np.union1d(mine, draw_labels(int(wanted[d]) - len(mine)))
                        if split == "train":
                            label_counts[mine] += 1
                        total_labels[split] += len(mine)
                        owners = mine[rng.integers(0, len(mine), size=n_topic[d])]
                        words = topics[owners, rng.integers(0, topic_words, size=n_topic[d])]
                        tokens = np.concatenate([words, background[d, : words_per_doc - n_topic[d]]])
                        rng.shuffle(tokens)
                        text_lines.append(" ".join(vocab[np.minimum(tokens, vocab_size - 1)]))
                        label_lines.append(" ".join(label_names[mine]))
                    texts.write("\n".join(text_lines) + "\n")
                    labels.write("\n".join(label_lines) + "\n")
        stats = {
            "labels": num_labels,
            "train": num_train,
            "test": num_test,
            "labels_seen_in_train": int((label_counts > 0).sum()),
            "min_train_label_count": int(label_counts.min()),
            "avg_labels_per_doc": (total_labels["train"] + total_labels["test"]) / max(1, num_train + num_test),
            "avg_labels_per_train_doc": total_labels["train"] / num_train,
            "avg_docs_per_label": total_labels["train"] / num_labels,
            "top_label_share": float(label_counts.max() / num_train),
        }
        (tmp / "synthetic.json").write_text(json.dumps({"settings": settings, "stats": stats}, indent=1) + "\n",
                                            encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


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
    parser.add_argument("--topic-share", type=float, default=0.5,
                        help="share of a text's words drawn from its labels' topics")
    parser.add_argument("--min-label-count", type=int, default=1,
                        help="training documents each label occurs in at least (0: labels may be unseen in training)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stats = write_dataset(args.out_dir, args.num_labels, args.train, args.test, args.labels_per_doc,
                          args.words_per_doc, args.vocab_size, args.topic_words, args.topic_share, zipf=args.zipf,
                          seed=args.seed, min_label_count=args.min_label_count)
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s: {stats}")


if __name__ == "__main__":
    main()
