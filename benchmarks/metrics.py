"""Throughput and peak memory of the sparse XMC metrics vs a dense-mask reference.

Both methods receive the same ranked predictions ``topk_ids`` [batch, k] and CSR positives and compute
P@k, nDCG@k, PSP@k and PSnDCG@k for k in 1..K (``--no-ps``: P@k and nDCG@k only):

* ``sparse``: :class:`xmc_dst.metrics.XMCMetrics` ((row, label) keys + ``torch.isin``; O(batch * k + nnz)).
* ``dense``: the straightforward implementation: a [batch, num_labels] boolean mask of the positives, ``gather`` for
  the hits, and ``topk`` over the propensity-weighted dense mask for the PS normaliser (as pyxclib does).

The top-k over the model's logits is shared by both pipelines, so it is excluded from both and timed on its own
(row ``topk on logits``) for scale. Memory: each method runs in a fresh spawned process, and we report the growth
of the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the timed loop, i.e. after inputs
are built; the dense mask size ``batch * num_labels`` bytes is also given analytically.

Usage: ``python benchmarks/metrics.py [--num-labels N --batch B --k K --batches 10 --threads 1,2] [--no-ps] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import resource
import time


def make_inputs(num_labels: int, batch: int, k: int, avg_pos: float, alpha: float, seed: int):
    """Power-law positives (~``avg_pos`` per doc, some docs empty) and predictions with ~half the slots correct."""
    import torch

    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, num_labels + 1, dtype=torch.float64).pow(-alpha)
    cdf = torch.cumsum(probs / probs.sum(), 0)

    def draw(n: int) -> torch.Tensor:
        return torch.searchsorted(cdf, torch.rand(n, generator=g, dtype=torch.float64)).clamp_(max=num_labels - 1)

    n_pos = torch.poisson(torch.full((batch,), float(avg_pos)), generator=g).long()
    rows = torch.repeat_interleave(torch.arange(batch), n_pos)
    keys = torch.unique(rows * num_labels + draw(rows.numel()))  # distinct positives, sorted by row
    rows, label_ids = keys // num_labels, keys % num_labels
    label_offsets = torch.zeros(batch + 1, dtype=torch.long)
    label_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=batch), 0)

    topk_ids = draw(batch * k).view(batch, k)
    counts = label_offsets[1:] - label_offsets[:-1]
    for slot in range(k):  # put the slot-th positive in a random half of the rows (duplicates are rare and harmless)
        take = (counts > slot) & (torch.rand(batch, generator=g) < 0.5)
        topk_ids[take, slot] = label_ids[label_offsets[:-1][take] + slot]
    train_counts = torch.poisson(probs / probs.sum() * 5e6, generator=g)
    return topk_ids, label_ids, label_offsets, train_counts


def dense_reference(topk_ids, label_ids, label_offsets, inv_prop, num_labels: int, k: int) -> dict:
    """Dense-mask metrics (sums over docs, same definitions as xmc_dst.metrics)."""
    import torch

    batch = topk_ids.shape[0]
    mask = torch.zeros(batch, num_labels, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(batch), label_offsets[1:] - label_offsets[:-1])
    mask[rows, label_ids] = True
    h = mask.gather(1, topk_ids).double()
    n_pos = label_offsets[1:] - label_offsets[:-1]
    r = torch.arange(1, k + 1, dtype=torch.float64)
    disc = 1.0 / torch.log2(r + 1)
    cum_disc = torch.cumsum(disc, 0)
    n_ideal = torch.minimum(n_pos.unsqueeze(1), r.long())
    idcg = torch.where(n_ideal > 0, cum_disc[(n_ideal - 1).clamp(min=0)], 1.0)
    sums = {"p": (torch.cumsum(h, 1) / r).sum(0), "ndcg": (torch.cumsum(h * disc, 1) / idcg).sum(0)}
    if inv_prop is None:
        return sums
    ideal_w = torch.where(mask, inv_prop.float(), 0.0).topk(k, dim=1).values.double()  # best PS ranking
    wh = inv_prop[topk_ids] * h
    return {
        **sums,
        "psp": (torch.cumsum(wh, 1) / r).sum(0),
        "psp_ideal": (torch.cumsum(ideal_w, 1) / r).sum(0),
        "psndcg": (torch.cumsum(wh * disc, 1) / idcg).sum(0),
        "psndcg_ideal": (torch.cumsum(ideal_w * disc, 1) / idcg).sum(0),
    }


def run_method(method: str, args: dict) -> dict:
    """Run one method in this (fresh) process; return timing, RSS growth and P@k/PSP@k for cross-checking."""
    import torch

    from xmc_dst.metrics import XMCMetrics, inverse_propensity

    torch.set_num_threads(args["threads"])
    num_labels, batch, k = args["num_labels"], args["batch"], args["k"]
    inputs = [
        make_inputs(num_labels, batch, k, args["avg_pos"], args["alpha"], args["seed"] + i)
        for i in range(args["batches"])
    ]
    inv_prop = None if args["no_ps"] else inverse_propensity(inputs[0][3], 5_000_000)
    ks = tuple(range(1, k + 1))
    logits = torch.randn(batch, num_labels) if method == "topk" else None
    metric = XMCMetrics(ks=ks, inv_propensity=inv_prop)
    totals: dict = {}

    def step(topk_ids, label_ids, label_offsets) -> None:
        if method == "sparse":
            metric.update(topk_ids, label_ids, label_offsets)
        elif method == "dense":
            for name, v in dense_reference(topk_ids, label_ids, label_offsets, inv_prop, num_labels, k).items():
                totals[name] = totals.get(name, 0) + v
        else:
            torch.topk(logits, k, dim=1)

    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # inputs built; warm-up peaks count too
    for topk_ids, label_ids, label_offsets, _ in inputs[: args["warmup"]]:
        step(topk_ids, label_ids, label_offsets)
    metric.reset()
    totals.clear()
    t0 = time.perf_counter()
    for topk_ids, label_ids, label_offsets, _ in inputs:
        step(topk_ids, label_ids, label_offsets)
    elapsed = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "method": method,
        "threads": args["threads"],
        "docs_per_s": batch * len(inputs) / elapsed,
        "ms_per_batch": 1e3 * elapsed / len(inputs),
        "peak_rss_growth_mib": (rss_after - rss_before) / 1024,  # ru_maxrss is in KiB on Linux
    }
    if method == "sparse":
        values = metric.compute()
        out.update({key: float(values[key]) for key in (f"P@{k}", f"PSP@{k}") if key in values})
    elif method == "dense":
        n_docs = batch * len(inputs)
        out[f"P@{k}"] = float(100 * totals["p"][k - 1] / n_docs)
        if inv_prop is not None:
            out[f"PSP@{k}"] = float(100 * totals["psp"][k - 1] / totals["psp_ideal"][k - 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-labels", type=int, default=670_091, help="label space (Amazon-670K: 670,091)")
    parser.add_argument("--batch", type=int, default=256, help="documents per update")
    parser.add_argument("--k", type=int, default=5, help="predictions per doc; metrics for k = 1..K")
    parser.add_argument("--avg-pos", type=float, default=5.0, help="mean positives per doc (Poisson)")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of label frequencies")
    parser.add_argument("--batches", type=int, default=10, help="timed updates per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    parser.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated torch intra-op thread counts, one run of each method per count",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ps", action="store_true", help="P@k and nDCG@k only (no propensity-scored metrics)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    args = vars(parser.parse_args())

    thread_counts = [int(t) for t in str(args["threads"]).split(",") if t.strip()]
    ctx = mp.get_context("spawn")
    k = args["k"]
    mask_mib = args["batch"] * args["num_labels"] / 2**20
    results = []
    for threads in thread_counts:
        by_method = {}
        for method in ("sparse", "dense", "topk"):
            with ctx.Pool(1) as pool:  # fresh process per method, so peak RSS is not shared
                by_method[method] = pool.apply(run_method, (method, {**args, "threads": threads}))
        sparse, dense = by_method["sparse"], by_method["dense"]
        for key in (f"P@{k}", f"PSP@{k}")[: 1 if args["no_ps"] else 2]:
            if not math.isclose(sparse[key], dense[key], rel_tol=1e-5):
                raise SystemExit(f"sparse and dense disagree on {key}: {sparse[key]} vs {dense[key]}")
        for r in by_method.values():
            r.update(num_labels=args["num_labels"], batch=args["batch"], k=k)
            r["speedup_vs_dense"] = r["docs_per_s"] / dense["docs_per_s"]
            r["dense_mask_mib_analytic"] = mask_mib if r["method"] == "dense" else 0.0
            results.append(r)
    if args["json"]:
        for r in results:
            print(json.dumps(r))
        return
    names = {
        "sparse": "XMCMetrics (sparse)",
        "dense": "dense bool mask (+ dense topk for PS ideal)",
        "topk": "topk on logits (shared, excluded)",
    }
    sparse = results[0]
    print(
        f"num_labels={args['num_labels']:,} batch={args['batch']} k={k} timed batches={args['batches']}; "
        f"PS metrics: {'no' if args['no_ps'] else 'yes'}; P@{k}={sparse[f'P@{k}']:.3f} "
        f"PSP@{k}={sparse.get(f'PSP@{k}', float('nan')):.3f} (sparse and dense agree)"
    )
    print()
    print("| method | threads | docs/s | ms/batch | vs dense | peak RSS growth MiB | dense mask MiB (analytic) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {names[r['method']]} | {r['threads']} | {r['docs_per_s']:,.0f} | {r['ms_per_batch']:.2f} "
            f"| {r['speedup_vs_dense']:.1f}x | {r['peak_rss_growth_mib']:.1f} | {r['dense_mask_mib_analytic']:.1f} |"
        )


if __name__ == "__main__":
    main()
