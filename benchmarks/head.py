"""Head benchmark: the fixed fan-in layer against a dense ``nn.Linear`` at extreme label counts.

For every (implementation, label count, fan-in, batch) it runs one training configuration in a fresh process and
reports the median forward+backward time, the time of one rewire that regrows 30% of the slots, the static training
memory (parameters + gradients + Adam states + indices, counted from the tensors) and the process's peak memory.

Beside each time it prints the achieved fraction of the memory roofline: the bytes one forward+backward must move
at least (:func:`step_bytes`) over the time, against the device's copy bandwidth measured in the same process
(:func:`copy_bandwidth`: bytes read + written per second by a large device-to-device copy). A fraction near 1 means
the step moves its data as fast as the memory allows; the head is memory-bound, so that is its limit.

``--precision bf16-mixed`` runs the forward under ``torch.autocast`` with a bf16 input (what a bf16-mixed encoder
hands the head): the dense layer then multiplies in bf16, the sparse head reads bf16 inputs and writes fp32 logits.
``triton-transposed`` is ``impl="triton"`` with the input gradient from the transposed structure instead of atomics.
``groupedG`` (``grouped8``, ``grouped16``, ...) is :class:`xmc_dst.grouped.GroupedFanInLinear` with groups of ``G``
labels sharing their fan-in, labels in shuffled groups as clusters place them (every group's outputs are rows
anywhere in the logits); ``groupedG-ordered`` groups consecutive label ids (the control grouping). A ``+bf16-sgd``
or ``+bf16-adamw`` suffix stores the layer's weights in bf16 and steps them with
:class:`xmc_dst.optim.GroupwiseOptimizer` (fp32 arithmetic, stochastic rounding, bf16 momentum / moments); the other
rows step with ``torch.optim.Adam``. The output gradient has the logits' layout, as the loss hands it back
(``torch.randn_like``).

    python benchmarks/head.py                       # the default grid, a Markdown table
    python benchmarks/head.py --json --out-features 670000 --fan-in 32
    python benchmarks/head.py --device cuda --precision bf16-mixed --impls dense csr triton triton-transposed \
        --out-features 31000 131000 670000 3000000 --fan-in 32 --batch 64 256 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import statistics
import sys
import time

DEFAULT_OUT = [31_000, 131_000, 670_000]
DEFAULT_FAN_IN = [32, 64]
DEFAULT_IMPLS = ["dense", "kernel", "csr", "grouped8", "grouped16", "grouped32", "grouped16-ordered",
                 "grouped16+bf16-sgd", "grouped16+bf16-adamw", "kernel+bf16-sgd"]
AMP_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def step_bytes(dense: bool, out_features: int, in_features: int, fan_in: int, batch: int, x_bytes: int,
               logit_bytes: int, compute_bytes: int, group_size: int = 1, weight_bytes: int = 4) -> int:
    """The bytes one forward+backward of the head must move at least (fp32 parameters, int32 indices).

    Both layers: the input read twice (forward, weight gradient) and its gradient written (``3 * B * in``), the
    logits written and their gradient read (``2 * B * L``), the bias read and its gradient written (``2 * L``).
    Fixed fan-in: indices read twice (forward, backward) and weights twice (forward, input gradient), the weight
    gradient written: ``L * k * (2 * 4 + 3 * 4)``; with index rows shared by groups of ``G`` labels and weights of
    ``weight_bytes``, ``L * k * (2 * 4 / G + 3 * weight_bytes)``. Dense: the weight read twice in the compute dtype
    (forward, input gradient) and its gradient written in fp32; under autocast also the fp32 weight read and its
    compute-dtype copy written once per step (``L * in * (4 + 2)``).
    """
    shared = 3 * batch * in_features * x_bytes + 2 * batch * out_features * logit_bytes + 2 * out_features * 4
    if not dense:
        return shared + out_features * fan_in * (2 * 4 // group_size + 3 * weight_bytes)
    cast = out_features * in_features * (4 + compute_bytes) if compute_bytes != 4 else 0
    return shared + out_features * in_features * (2 * compute_bytes + 4) + cast


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (256 MiB on CPU); best of 5."""
    import torch

    n = (1 << 28) if device == "cuda" else (1 << 26)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * n * 4 / best


def run_one(impl: str, out_features: int, in_features: int, fan_in: int, batch: int, repeats: int,
            device: str, threads: int | None, precision: str = "32-true") -> dict:
    """One configuration, in the calling process: a few Adam training steps and (sparse only) rewires."""
    import torch

    from xmc_dst.sparse import FixedFanInLinear

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    input_grad = None
    if impl == "triton-transposed":
        from xmc_dst import triton_fan_in

        impl, input_grad = "triton", "transposed"
        triton_fan_in.INPUT_GRAD = input_grad
    impl, _, rounding = impl.partition("+")
    generator = torch.Generator(device="cpu").manual_seed(0)
    if impl == "dense":
        layer = torch.nn.Linear(in_features, out_features, device=device)
    elif impl.startswith("grouped"):
        from xmc_dst.grouped import GroupedFanInLinear, group_positions

        size, _, ordered = impl.removeprefix("grouped").partition("-")
        size = int(size)
        shuffled = None if ordered else torch.randperm(out_features, generator=torch.Generator().manual_seed(1))
        layer = GroupedFanInLinear(in_features, out_features, fan_in, size, generator=generator,
                                   label_position=group_positions(out_features, size, shuffled)).to(device)
    else:
        layer = FixedFanInLinear(in_features, out_features, fan_in, impl=impl, generator=generator).to(device)
    if rounding:
        from xmc_dst.optim import GroupwiseOptimizer

        algorithm = rounding.removeprefix("bf16-")
        layer.to(torch.bfloat16)
        optimizer = GroupwiseOptimizer(layer.parameters(), algorithm=algorithm, lr=1e-3, state_dtype="bfloat16")
    else:
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    amp_dtype = getattr(torch, AMP_DTYPES[precision]) if precision in AMP_DTYPES else None
    x = torch.randn(batch, in_features, device=device, dtype=amp_dtype or torch.float32, requires_grad=True)
    grad = None
    times, step_times = [], []
    for step in range(repeats + 1):  # the first step warms up (and creates the Adam states)
        optimizer.zero_grad(set_to_none=False)
        x.grad = None
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            y = layer(x)
        if grad is None:
            grad = torch.randn_like(y)
        y.backward(grad)
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        if step:
            step_times.append(time.perf_counter() - start)
    fwd_bwd = statistics.median(times)
    moved = step_bytes(impl == "dense", out_features, in_features, fan_in, batch, x.element_size(),
                       grad.element_size(), 2 if amp_dtype is not None else 4,
                       group_size=getattr(layer, "group_size", 1), weight_bytes=layer.weight.element_size())
    rewire_times, reset_times = [], []
    if impl != "dense":
        generator = torch.Generator().manual_seed(1)  # a CPU stream, as the DST callback passes
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
    name = impl if impl == "dense" else f"sparse-{layer.resolved_impl()}"
    if impl.startswith("grouped"):
        name = f"{impl}-{layer.resolved_impl()}"
    return {
        "impl": name + (f"-{input_grad}" if input_grad else "") + (f"+{rounding}" if rounding else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "out_features": out_features,
        "in_features": in_features,
        "fan_in": None if impl == "dense" else fan_in,
        "batch": batch,
        "fwd_bwd_ms": round(fwd_bwd * 1000, 3),
        "optimizer_step_ms": round(statistics.median(step_times) * 1000, 1),
        "step_bytes": moved,
        "rewire_ms": round(statistics.median(rewire_times) * 1000, 1) if rewire_times else None,
        "state_reset_ms": round(statistics.median(reset_times) * 1000, 1) if reset_times else None,
        # parameters + their gradients + optimizer states + index buffers
        "static_train_bytes": 2 * param_bytes + state_bytes + buffer_bytes,
        "peak_rss_bytes": peak,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def _child(queue: mp.Queue, kwargs: dict) -> None:
    try:
        queue.put(run_one(**kwargs))
    except Exception as err:  # reported by the parent, which carries on with the next configuration
        queue.put({"error": f"{type(err).__name__}: {err}", **kwargs})


def run_isolated(timeout: float = 600, **kwargs) -> dict:
    """Run one configuration in a fresh process, so its peak memory is its own; a crash or a timeout (a kill for
    memory, say) becomes an error row and the grid goes on."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    deadline = time.monotonic() + timeout
    result = None
    while result is None and time.monotonic() < deadline:
        try:
            result = queue.get(timeout=2)
        except queue_module.Empty:
            if not proc.is_alive() and queue.empty():
                result = {"error": f"the process died (exit code {proc.exitcode})", **kwargs}
    if result is None:
        proc.kill()
        result = {"error": f"timeout after {timeout:.0f} s", **kwargs}
    proc.join()
    return result


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; "peak MB" is the peak CUDA allocation on a GPU, else the peak RSS."""
    dense = {(r["out_features"], r["batch"]): r for r in rows if r["impl"] == "dense" and "error" not in r}
    lines = ["| impl | labels | fan-in | batch | fwd+bwd ms | roofline | vs dense | optimizer step ms | "
             "rewire 30% ms | static train MB | vs dense | peak MB |", "|---|" + "---:|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['out_features']:,} | {r['fan_in']} | {r['batch']} | "
                         f"error: {r['error'][:160]} ||||||||")
            continue
        d = dense.get((r["out_features"], r["batch"]))
        speed = f"{d['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if d and r["impl"] != "dense" else ""
        mem = f"{d['static_train_bytes'] / r['static_train_bytes']:.1f}x" if d and r["impl"] != "dense" else ""
        roofline = f"{100 * r['roofline_fraction']:.0f}%" if r.get("roofline_fraction") is not None else "-"
        lines.append(
            f"| {r['impl']} | {r['out_features']:,} | {r['fan_in'] or '-'} | {r['batch']} | {r['fwd_bwd_ms']:.2f} | "
            f"{roofline} | {speed} | {r.get('optimizer_step_ms', '-')} | "
            f"{r['rewire_ms'] if r['rewire_ms'] is not None else '-'} | "
            f"{r['static_train_bytes'] / 1e6:,.0f} | {mem} | "
            f"{(r['peak_cuda_bytes'] or r['peak_rss_bytes']) / 1e6:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-features", type=int, nargs="+", default=DEFAULT_OUT)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--fan-in", type=int, nargs="+", default=DEFAULT_FAN_IN)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--precision", default="32-true", choices=["32-true", *AMP_DTYPES],
                        help="32-true, or the forward under autocast with a half-precision input")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps after one warm-up step")
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS,
                        help="dense and any of the sparse impls: auto kernel csr embedding_bag triton "
                             "triton-transposed groupedG[-ordered] (e.g. grouped16), each optionally +bf16-sgd or "
                             "+bf16-adamw")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = copy_bandwidth(device)  # here, so that its buffers stay out of the configurations' peaks
    print(f"copy bandwidth on {device}: {bandwidth / 1e9:,.0f} GB/s (read + written)", file=sys.stderr, flush=True)
    rows = []
    for out_features in args.out_features:
        for batch in args.batch:
            for impl in args.impls:
                for fan_in in [None] if impl == "dense" else args.fan_in:
                    row = run_isolated(impl=impl, out_features=out_features, in_features=args.in_features,
                                       fan_in=fan_in or 0, batch=batch, repeats=args.repeats, device=device,
                                       threads=args.threads, precision=args.precision, timeout=args.timeout)
                    row["copy_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
                    if "fwd_bwd_ms" in row:
                        row["roofline_fraction"] = round(row["step_bytes"] / bandwidth / (row["fwd_bwd_ms"] / 1e3), 3)
                    rows.append(row)
                    if args.json:
                        print(json.dumps(row), flush=True)
                    result = row.get("fwd_bwd_ms", row.get("error"))
                    roofline = row.get("roofline_fraction")
                    print(f"  done: {row.get('impl')} {out_features} k={fan_in} b={batch}: {result} ms"
                          + (f" ({100 * roofline:.0f}% of the memory roofline)" if roofline else ""),
                          file=sys.stderr, flush=True)
    if not args.json:
        print(f"Head benchmark on {device} ({os.cpu_count()} cores), in={args.in_features}, {args.precision}, "
              f"Adam; median of {args.repeats} steps; roofline: minimum bytes per step (step_bytes) over the time, "
              f"against the measured copy bandwidth\n")
        print(markdown(rows))


if __name__ == "__main__":
    main()
