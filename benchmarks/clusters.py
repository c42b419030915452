"""Time the label clustering of the auxiliary objective at Amazon-670K scale on random data.

Random documents stand in for the training set: ``--docs`` token sequences of ``--tokens`` ids drawn from a Zipf
law over ``--vocab`` (the shape of a tokenised Amazon-670K: 490,449 documents of 128 BERT tokens), each with
``--labels-per-doc`` labels drawn from ``--labels`` (5.45 on average there). The two timed phases are those of
:class:`callbacks.AuxiliaryObjective` when it builds clusters: label embeddings (two passes over the batches:
document frequencies, then projected TF-IDF sums) and the balanced 2-means tree into ``--clusters`` groups.

    python benchmarks/clusters.py                     # 670,091 labels, 8,192 clusters
    python benchmarks/clusters.py --docs 20000 --labels 30000 --clusters 512   # a quick run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from xmc_dst.clusters import balanced_kmeans_tree, label_embeddings
from xmc_dst.memory import peak_rss_bytes


def random_batches(docs: int, tokens: int, vocab: int, labels: int, labels_per_doc: int, batch_size: int,
                   seed: int):
    """A re-iterable of text batches (``input_ids``, ``attention_mask``, CSR labels), generated on the fly."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()

    def batches():
        g = torch.Generator().manual_seed(seed)
        for start in range(0, docs, batch_size):
            n = min(batch_size, docs - start)
            ids = torch.multinomial(zipf, n * tokens, replacement=True, generator=g).view(n, tokens)
            lengths = torch.randint(tokens // 4, tokens + 1, (n,), generator=g)
            mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
            yield {"input_ids": ids, "attention_mask": mask,
                   "label_ids": torch.randint(labels, (n * labels_per_doc,), generator=g),
                   "label_offsets": torch.arange(0, n * labels_per_doc + 1, labels_per_doc)}

    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=490_449)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=30_522)
    parser.add_argument("--labels", type=int, default=670_091)
    parser.add_argument("--labels-per-doc", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=8_192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    batches = random_batches(args.docs, args.tokens, args.vocab, args.labels, args.labels_per_doc,
                             args.batch_size, args.seed)
    began = time.perf_counter()
    for _ in batches():
        pass
    generate = time.perf_counter() - began  # the cost of making the random batches, subtracted twice below

    began = time.perf_counter()
    embeddings = label_embeddings(batches, args.labels, args.dim, args.seed)
    embed = time.perf_counter() - began - 2 * generate
    began = time.perf_counter()
    clusters = balanced_kmeans_tree(embeddings, args.clusters, args.iterations, args.seed)
    tree = time.perf_counter() - began
    sizes = torch.bincount(clusters, minlength=args.clusters)
    print(json.dumps({
        "labels": args.labels, "docs": args.docs, "tokens": args.tokens, "clusters": args.clusters,
        "dim": args.dim, "threads": torch.get_num_threads(), "embeddings_s": round(embed, 1),
        "tree_s": round(tree, 1), "total_s": round(embed + tree, 1), "batch_generation_s": round(generate, 1),
        "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
        "peak_rss_mib": round((peak_rss_bytes() or 0) / 2**20),
    }))


if __name__ == "__main__":
    main()
