"""Head benchmark: the fixed fan-in layer against a dense ``nn.Linear`` at extreme label counts.

For every (implementation, label count, fan-in) it runs one training configuration in a fresh process and reports
the median forward+backward time, the time of one rewire that regrows 30% of the slots, the static training memory
(parameters + gradients + Adam states + indices, counted from the tensors) and the process's peak resident memory.

    python benchmarks/head.py                       # the default grid, a Markdown table
    python benchmarks/head.py --json --out-features 670000 --fan-in 32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

DEFAULT_OUT = [31_000, 131_000, 670_000]
DEFAULT_FAN_IN = [32, 64]
DEFAULT_IMPLS = ["dense", "kernel", "csr"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_one(impl: str, out_features: int, in_features: int, fan_in: int, batch: int, repeats: int,
            device: str, threads: int | None) -> dict:
    """One configuration, in the calling process: a few Adam training steps and (sparse only) rewires."""
    import torch

    from xmc_dst.sparse import FixedFanInLinear

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "dense":
        layer = torch.nn.Linear(in_features, out_features, device=device)
    else:
        layer = FixedFanInLinear(in_features, out_features, fan_in, impl=impl,
                                 generator=torch.Generator(device="cpu").manual_seed(0)).to(device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = torch.randn(batch, in_features, device=device, requires_grad=True)
    grad = torch.randn(batch, out_features, device=device)
    times = []
    for step in range(repeats + 1):  # the first step warms up (and creates the Adam states)
        optimizer.zero_grad(set_to_none=False)
        x.grad = None
        _sync(device)
        start = time.perf_counter()
        layer(x).backward(grad)
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
        optimizer.step()
    rewire_times, reset_times = [], []
    if impl != "dense":
        generator = torch.Generator(device=device).manual_seed(1)
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            result = layer.rewire("fraction", 0.3, generator)
            _sync(device)
            rewire_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            layer.reset_optimizer_state(optimizer, result)
            _sync(device)
            reset_times.append(time.perf_counter() - start)
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl if impl == "dense" else f"sparse-{layer.resolved_impl()}",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "out_features": out_features,
        "in_features": in_features,
        "fan_in": None if impl == "dense" else fan_in,
        "batch": batch,
        "fwd_bwd_ms": round(statistics.median(times) * 1000, 1),
        "rewire_ms": round(statistics.median(rewire_times) * 1000, 1) if rewire_times else None,
        "state_reset_ms": round(statistics.median(reset_times) * 1000, 1) if reset_times else None,
        # parameters + their gradients + Adam states + index buffers
        "static_train_bytes": 2 * param_bytes + state_bytes + buffer_bytes,
        "peak_rss_bytes": peak,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def _child(queue: mp.Queue, kwargs: dict) -> None:
    try:
        queue.put(run_one(**kwargs))
    except Exception as err:  # reported by the parent, which carries on with the next configuration
        queue.put({"error": f"{type(err).__name__}: {err}", **kwargs})


def run_isolated(**kwargs) -> dict:
    """Run one configuration in a fresh process, so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; "peak MB" is the peak CUDA allocation on a GPU, else the peak RSS."""
    dense = {r["out_features"]: r for r in rows if r["impl"] == "dense" and "error" not in r}
    lines = ["| impl | labels | fan-in | fwd+bwd ms | vs dense | rewire 30% ms | static train MB | vs dense | "
             "peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['out_features']:,} | {r['fan_in']} | error: {r['error']} ||||||")
            continue
        d = dense.get(r["out_features"])
        speed = f"{d['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if d and r["impl"] != "dense" else ""
        mem = f"{d['static_train_bytes'] / r['static_train_bytes']:.1f}x" if d and r["impl"] != "dense" else ""
        lines.append(
            f"| {r['impl']} | {r['out_features']:,} | {r['fan_in'] or '-'} | {r['fwd_bwd_ms']:.1f} | {speed} | "
            f"{r['rewire_ms'] if r['rewire_ms'] is not None else '-'} | {r['static_train_bytes'] / 1e6:,.0f} | "
            f"{mem} | {(r['peak_cuda_bytes'] or r['peak_rss_bytes']) / 1e6:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-features", type=int, nargs="+", default=DEFAULT_OUT)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--fan-in", type=int, nargs="+", default=DEFAULT_FAN_IN)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps after one warm-up step")
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS,
                        help="dense and any of the sparse impls: auto kernel csr embedding_bag")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for out_features in args.out_features:
        for impl in args.impls:
            for fan_in in [None] if impl == "dense" else args.fan_in:
                row = run_isolated(impl=impl, out_features=out_features, in_features=args.in_features,
                                   fan_in=fan_in or 0, batch=args.batch, repeats=args.repeats, device=device,
                                   threads=args.threads)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    result = row.get("fwd_bwd_ms", row.get("error"))
                    print(f"  done: {row.get('impl')} {out_features} {fan_in}: {result}", file=sys.stderr, flush=True)
    if not args.json:
        print(f"Head benchmark on {device} ({os.cpu_count()} cores), in={args.in_features}, batch={args.batch}, "
              f"fp32, Adam; median of {args.repeats} steps\n")
        print(markdown(rows))


if __name__ == "__main__":
    main()
