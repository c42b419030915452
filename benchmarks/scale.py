"""Scale benchmark: training throughput and memory of the dense and the sparse head at 31K, 131K and 670K labels.

Why: the point of the fixed fan-in head is that extreme label counts train where a dense last layer does not fit.
This measures it with the real training step, not the head alone (``benchmarks/head.py`` does that): the MiniLM-L6
encoder fine-tuned end to end, an optional intermediate layer, the label head, the squared-hinge loss and the
project's AdamW, driven by a Lightning ``Trainer.fit`` on synthetic data in the raw-text layout
(``benchmarks/synthetic.py``: power-law label frequencies, ~5 labels per document, label-dependent texts) read by
``datamodules.RawTextXMCDataModule``. Label counts are those of Wiki10-31K, AmazonTitles-131K and Amazon-670K; the
memory at Amazon-3M's 2.8M labels is the estimate of :func:`xmc_dst.estimate.estimate_memory` (no run).

How: every configuration (label count x head) runs in a fresh Python process, so its peak resident memory is its
own. The process trains ``--warmup + --steps`` optimizer steps; throughput counts the documents of the last
``--steps`` steps over the wall time from the end of the last warm-up step to the end of the last step (data
loading, forward, backward, optimizer step and callbacks included). Sparse runs carry the DynamicSparseTraining
callback (SET, fraction pruning) with one rewire inside the warm-up, so the peak includes a rewire's transient
tensors while the timed steps, as in real training between rewires, have none. Reported per configuration: the
process's peak RSS (VmHWM: interpreter, libraries, data and model included), the head's parameter count, the head's
training state (parameters + gradients + AdamW moments + int32 indices, counted from the live tensors) and the
estimate of the whole training memory for that configuration. On CUDA the peak is also ``max_memory_allocated``.
The share of CPU time that other processes used during the timed steps is measured from ``/proc/stat``, since
the machine this ran on is shared.

    python benchmarks/scale.py                                   # CPU, the default grid (~15 min on 2 cores)
    python benchmarks/scale.py --labels 30938 --variants dense sparse --warmup 1 --steps 2    # a quick look
    python benchmarks/scale.py --device cuda --precision bf16-mixed --batch-size 128 --max-length 128
    python benchmarks/scale.py --report-only                     # redo the table and plot from the jsonl

Writes ``benchmarks/results/scale_cpu.{jsonl,md}`` and ``scale_memory.png`` (on CUDA ``scale_<gpu>.{jsonl,md}`` and
``scale_memory_<gpu>.png``). Synthetic data and its tokenised cache are kept under ``--data-root`` (default
``synthetic`` under the cache root of :mod:`xmc_dst.paths`) and reused when their settings match.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/scale.py` from a checkout: import benchmarks.*

from benchmarks.common import OFFLINE_ENV, ChildFailed, run_child, serve_child  # noqa: E402 - after the path above
from xmc_dst.paths import cache_dir  # noqa: E402
from xmc_dst.provenance import cpu_model, git_commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# Wiki10-31K, AmazonTitles-131K, Amazon-670K; Amazon-3M is estimated only.
DEFAULT_LABELS = [30_938, 131_073, 670_091]
ESTIMATE_LABELS = 2_812_281
VARIANTS = ("dense", "sparse", "sparse-int")
GB = 1e9

# ---------------------------------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict[str, Any]:
    import torch

    mem = 0
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gb": round(mem / GB, 1),
            "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
    return info


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------------------------------------------- configs


def variant_model_args(variant: str, fan_in: int, intermediate_dim: int) -> dict[str, Any]:
    """XMCModule arguments of a head variant."""
    sparse = {"class_path": "xmc_dst.heads.FixedFanInHead", "init_args": {"fan_in": fan_in}}
    if variant == "dense":
        return {"head": {"class_path": "xmc_dst.heads.DenseHead"}, "intermediate_dim": 0}
    if variant == "sparse":
        return {"head": sparse, "intermediate_dim": 0}
    if variant == "sparse-int":
        return {"head": sparse, "intermediate_dim": intermediate_dim, "intermediate_activation": "relu"}
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")


ENCODER_ARGS = {"pooling": "mean", "layers": [-1, 0], "dropout": 0.2, "trainable_layers": -1, "length_chunks": 1}


def dst_args(warmup: int) -> dict[str, Any]:
    """One rewire at optimizer step ``warmup - 1`` (inside the warm-up), none in the timed steps."""
    return {"interval": max(1, warmup - 1), "end_step": warmup, "prune": "fraction", "drop_fraction": 0.3,
            "regrow": "random", "seed": 0}


def estimate_gb(num_labels: int, variant: str, args: argparse.Namespace, tokenizer: str) -> dict[str, float]:
    """Estimated training memory (GB) of one configuration: total and static, from :mod:`xmc_dst.estimate`."""
    from xmc_dst.estimate import estimate_memory

    model = {"encoder": {"class_path": "xmc_dst.encoders.TransformerEncoder", "init_args": dict(ENCODER_ARGS)},
             "num_labels": num_labels, **variant_model_args(variant, args.fan_in, args.intermediate_dim)}
    trainer: dict[str, Any] = {"precision": args.precision}
    if variant != "dense":
        trainer["callbacks"] = [{"class_path": "callbacks.DynamicSparseTraining", "init_args": dst_args(args.warmup)}]
    config = {"model": model, "data": {"batch_size": args.batch_size, "max_length": args.max_length,
                                       "tokenizer": tokenizer}, "trainer": trainer}
    estimate = estimate_memory(config)
    kind = "dense" if variant == "dense" else "sparse"
    head = estimate.parts[kind]["head"]
    return {"estimate_gb": estimate.total(kind) / GB, "estimate_static_gb": estimate.static(kind) / GB,
            "estimate_head_state_gb": head.static / GB}


# ---------------------------------------------------------------------------------------------------- child


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: build data and model, ``Trainer.fit`` for the steps, measure."""
    import lightning as L
    import torch

    from benchmarks.probes import StepTimer
    from callbacks import DynamicSparseTraining
    from datamodules import RawTextXMCDataModule
    from xmc_dst.encoders import TransformerEncoder
    from xmc_dst.memory import peak_rss_bytes, reset_peak_rss
    from xmc_dst.model import XMCModule

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device, warmup, steps = spec["device"], int(spec["warmup"]), int(spec["steps"])
    cuda = device == "cuda"
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()
    data = RawTextXMCDataModule(spec["data_dir"], tokenizer=spec["tokenizer"], max_length=spec["max_length"],
                                batch_size=spec["batch_size"], val_fraction=0.0, val_on_test=False,
                                cache_dir=spec["cache_dir"])
    encoder = functools.partial(TransformerEncoder, **ENCODER_ARGS)
    model = XMCModule(encoder, num_labels=data.num_labels, tokenizer=data.tokenizer_name, loss="squared_hinge",
                      loss_reduction="batch_mean", seed=0,
                      **variant_model_args(spec["variant"], spec["fan_in"], spec["intermediate_dim"]))

    timer = StepTimer(warmup, steps, cuda)
    callbacks: list[L.Callback] = [timer]
    dst = DynamicSparseTraining(**dst_args(warmup)) if spec["variant"] != "dense" else None
    if dst is not None:
        callbacks.append(dst)
    total = warmup + steps
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=spec["precision"],
                        max_steps=total, max_epochs=1, limit_train_batches=total, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=spec["workdir"])
    setup_peak = peak_rss_bytes()
    fit_peak_reset = reset_peak_rss()
    trainer.fit(model, datamodule=data)
    fit_peak = peak_rss_bytes()
    if len(timer.ends) < total:
        raise RuntimeError(f"trained {len(timer.ends)} steps of {total} (too few training documents?)")

    elapsed = timer.ends[total - 1] - timer.ends[warmup - 1] if warmup else timer.ends[-1] - timer.begin
    timed_docs = sum(timer.docs[warmup:])
    (busy0, own0, steal0), (busy1, own1, steal1) = timer.cpu if len(timer.cpu) == 2 else ((0, 0, 0), (0, 0, 0))
    cores = os.cpu_count() or 1
    head = timer.static.get("head")
    step_times = [b - a for a, b in zip([timer.begin, *timer.ends[:-1]], timer.ends, strict=True)]
    result = {
        "device": device,
        "threads": torch.get_num_threads(),
        "num_labels": data.num_labels,
        "train_docs": data.num_train_docs,
        "head_impl": model.head.resolved_impl() if hasattr(model.head, "resolved_impl") else "dense",
        "docs_per_s": timed_docs / elapsed,
        "step_s_median": statistics.median(step_times[warmup:]),
        "docs_per_s_median_step": spec["batch_size"] / statistics.median(step_times[warmup:]),
        "step_s_all": [round(t, 3) for t in step_times],
        "losses": [round(v, 4) for v in timer.losses],
        "setup_s": timer.begin - started,
        # process peak RSS: the larger of the peak before fit (imports, data, model) and during fit
        "peak_rss_bytes": max(setup_peak or 0, fit_peak or 0),
        "fit_peak_rss_bytes": fit_peak if fit_peak_reset else None,
        "fit_start_rss_bytes": timer.fit_start_rss,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "head_params": sum(p.numel() for p in model.head.parameters()),
        "head_state_bytes": head.static if head else None,
        "model_static_bytes": sum(part.static for part in timer.static.values()),
        "static_by_part": {name: part.static for name, part in timer.static.items()},
        # CPU time other processes used while this one was timed, as a share of all cores (steal: the hypervisor's)
        "others_cpu_share": max(0.0, ((busy1 - busy0) - (own1 - own0)) / (elapsed * cores)) if busy1 else None,
        "own_cpu_share": (own1 - own0) / (elapsed * cores) if busy1 else None,
        "steal_share": (steal1 - steal0) / (elapsed * cores) if busy1 else None,
        "dst_rewires": dst.num_updates if dst is not None else 0,
        "loadavg_end": os.getloadavg(),
    }
    return result


# ---------------------------------------------------------------------------------------------------- parent


def train_docs_for(num_labels: int, docs_per_label: float, labels_per_doc: float, minimum: int) -> int:
    """Training documents for ``docs_per_label`` label occurrences per label on average (Amazon-670K: 4.0)."""
    return max(minimum, math.ceil(num_labels * docs_per_label / labels_per_doc))


def prepare_data(num_labels: int, args: argparse.Namespace, tokenizer: str) -> Path:
    """Write (or reuse) the synthetic dataset for ``num_labels`` labels and build its tokenised cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import write_dataset

    from datamodules import RawTextXMCDataModule

    settings = {"num_labels": num_labels, "num_train": train_docs_for(num_labels, args.docs_per_label, 5.0, 4_000),
                "num_test": 500, "labels_per_doc": 5.0, "words_per_doc": max(24, args.max_length),
                "vocab_size": 50_000, "topic_words": 16, "topic_share": 0.5, "zipf": 1.0, "seed": 0,
                "min_label_count": 1}
    out = Path(args.data_root) / f"synthetic-{num_labels}"
    meta = out / "synthetic.json"
    if not (meta.is_file() and json.loads(meta.read_text()).get("settings") == settings):
        began = time.perf_counter()
        stats = write_dataset(out, **{k: v for k, v in settings.items() if k != "num_train" and k != "num_test"},
                              num_train=settings["num_train"], num_test=settings["num_test"])
        print(f"  wrote {out} in {time.perf_counter() - began:.0f} s: {stats}", flush=True)
    began = time.perf_counter()
    data = RawTextXMCDataModule(out, tokenizer=tokenizer, max_length=args.max_length, batch_size=args.batch_size,
                                cache_dir=Path(args.data_root) / "cache", num_proc=os.cpu_count() or 1)
    data.prepare_data()
    print(f"  tokenised cache of {out.name} ready in {time.perf_counter() - began:.0f} s", flush=True)
    return out


def run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; an error (or a kill, e.g. out of memory) becomes a record."""
    began = time.perf_counter()
    try:
        result = run_child(__file__, spec, timeout)
    except ChildFailed as failed:
        return {"error": f"{failed.status}: {failed.last_line}", "log_tail": failed.output[-1500:],
                "process_wall_s": time.perf_counter() - began}
    return {**result, "process_wall_s": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=DEFAULT_LABELS, help="label counts to train")
    parser.add_argument("--estimate-labels", type=int, default=ESTIMATE_LABELS, help="label count estimated only")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="dense, sparse (fixed fan-in on the encoder), sparse-int (intermediate layer first)")
    parser.add_argument("--fan-in", type=int, default=32, help="inputs per label of the sparse head")
    parser.add_argument("--intermediate-dim", type=int, default=1024, help="width of sparse-int's ReLU layer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per document")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (one rewire in them)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (at least 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, help="Lightning precision (default: 32-true on CPU, "
                                                          "bf16-mixed on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--docs-per-label", type=float, default=4.0,
                        help="synthetic training documents per label on average (Amazon-670K: 4.0)")
    parser.add_argument("--data-root", default=str(cache_dir("synthetic")))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--report-only", action="store_true", help="rewrite the md and png from the jsonl")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        serve_child(args.child, run_one)
        return
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    tag = "cpu" if args.device == "cpu" else slug(torch.cuda.get_device_name())
    jsonl = args.out_dir / f"scale_{tag}.jsonl"
    if args.report_only:
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        write_reports(rows, args.out_dir, tag, regenerated=True)
        return

    from xmc_dst.paths import default_tokenizer

    tokenizer = default_tokenizer()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT),
                                                              *(argv if argv is not None else sys.argv[1:])])
    meta = {"type": "meta", "command": command, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine_info(args.device), "device": args.device, "precision": args.precision,
            "batch_size": args.batch_size, "max_length": args.max_length, "warmup": args.warmup,
            "steps": args.steps, "fan_in": args.fan_in, "intermediate_dim": args.intermediate_dim,
            "encoder": f"MiniLM-L6 ({tokenizer}), trainable end to end, {ENCODER_ARGS}",
            "docs_per_label": args.docs_per_label, "loadavg_before": os.getloadavg()}
    began = time.perf_counter()
    print(f"{command}\ncommit {meta['commit']}, {meta['machine']}, load before {meta['loadavg_before']}", flush=True)
    rows: list[dict[str, Any]] = [meta]
    for num_labels in args.labels:
        print(f"data for {num_labels:,} labels", flush=True)
        data_dir = prepare_data(num_labels, args, tokenizer)
        for variant in args.variants:
            spec = {"variant": variant, "data_dir": str(data_dir), "tokenizer": tokenizer,
                    "cache_dir": str(Path(args.data_root) / "cache"), "max_length": args.max_length,
                    "batch_size": args.batch_size, "fan_in": args.fan_in, "intermediate_dim": args.intermediate_dim,
                    "device": args.device, "precision": args.precision, "warmup": args.warmup, "steps": args.steps,
                    "threads": args.threads}
            row = {"type": "run", "labels": num_labels, "variant": variant,
                   "fan_in": None if variant == "dense" else min(args.fan_in, args.intermediate_dim if
                                                                  variant == "sparse-int" else 768),
                   "intermediate_dim": args.intermediate_dim if variant == "sparse-int" else 0,
                   **estimate_gb(num_labels, variant, args, tokenizer), **run_isolated(spec, args.timeout)}
            rows.append(row)
            print("  " + summary(row), flush=True)
            write_jsonl(jsonl, rows)  # after every run: a killed benchmark keeps what it measured
    for variant in args.variants:
        rows.append({"type": "estimate", "labels": args.estimate_labels, "variant": variant,
                     "fan_in": None if variant == "dense" else args.fan_in,
                     "intermediate_dim": args.intermediate_dim if variant == "sparse-int" else 0,
                     **estimate_gb(args.estimate_labels, variant, args, tokenizer)})
    meta["loadavg_after"] = os.getloadavg()
    meta["wall_s"] = round(time.perf_counter() - began, 1)
    write_jsonl(jsonl, rows)
    write_reports(rows, args.out_dir, tag)
    print(f"done in {meta['wall_s'] / 60:.1f} min; wrote {jsonl} and the md/png next to it")


# ---------------------------------------------------------------------------------------------------- reports


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['labels']:,} {row['variant']}: ERROR {row['error']}"
    return (f"{row['labels']:,} {row['variant']}: {row['docs_per_s']:.1f} docs/s, peak RSS "
            f"{row['peak_rss_bytes'] / GB:.2f} GB, head state {row['head_state_bytes'] / GB:.3f} GB, estimate "
            f"{row['estimate_gb']:.2f} GB, others' CPU {100 * (row['others_cpu_share'] or 0):.0f}%")


VARIANT_LABEL = {"dense": "dense", "sparse": "sparse", "sparse-int": "sparse + intermediate"}


def header_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM"
    if meta["device"] == "cuda":
        where = f"{m['gpu']} ({m['gpu_memory_gb']} GB) on {where}"
    lines = [f"Machine: {where}; torch {m['torch']}, Python {m['python']}",
             f"Command: `{meta['command']}` at commit {meta['commit']} ({meta['date']})"]
    return lines + ([meta["regenerated"]] if meta.get("regenerated") else [])


def write_reports(rows: list[dict[str, Any]], out_dir: Path, tag: str, regenerated: bool = False) -> None:
    meta = next(row for row in rows if row.get("type") == "meta")
    if regenerated:
        meta = dict(meta, regenerated=f"table and plot rewritten from the jsonl by `--report-only` at commit "
                                      f"{git_commit()} (measurements unchanged)")
    (out_dir / f"scale_{tag}.md").write_text(markdown(rows, meta), encoding="utf-8")
    plot(rows, meta, out_dir / ("scale_memory.png" if tag == "cpu" else f"scale_memory_{tag}.png"))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cuda = meta["device"] == "cuda"
    runs = [r for r in rows if r.get("type") == "run"]
    shares = [r["others_cpu_share"] for r in runs if r.get("others_cpu_share") is not None]
    lines = [f"# Scale: training throughput and memory, dense vs sparse head ({meta['device']})", ""]
    lines += [f"- {line}" for line in header_lines(meta)]
    lines += [
        f"- Training step: MiniLM-L6 encoder fine-tuned end to end (mean of the last and the embedding layer, 768 "
        f"features), label head, squared hinge, AdamW, `Trainer.fit`, precision {meta['precision']}, batch "
        f"{meta['batch_size']}, max_length {meta['max_length']}; {meta['warmup']} warm-up steps (sparse: one DST "
        f"rewire among them) then {meta['steps']} timed steps. Synthetic data (`benchmarks/synthetic.py`: Zipf(1.0) "
        f"label frequencies, every label in training, 5 labels/document, {meta['docs_per_label']} documents per "
        "label). sparse+intermediate: a "
        f"{meta['intermediate_dim']}-wide ReLU layer before the head. Each row is a fresh process.",
        f"- Wall time {meta.get('wall_s', 0) / 60:.1f} min; load average (1/5/15 min) before "
        f"{fmt_load(meta.get('loadavg_before'))}, after {fmt_load(meta.get('loadavg_after'))}.",
    ]
    if shares and not cuda:
        busy = max(shares)
        lines.append(
            f"- **Shared machine**: other processes used {100 * min(shares):.0f}-{100 * busy:.0f}% of the "
            f"{meta['machine']['cores']} cores while steps were timed (column *others CPU*, from /proc/stat). "
            + ("Throughput was measured with other jobs running and is a lower bound for an idle machine."
               if busy > 0.05 else "The machine was essentially idle while timed."))
    lines += [
        "- *docs/s*: documents of the timed steps over their wall time; *median step*: batch size over the median "
        "timed step (less sensitive to bursts of other jobs); *docs per own CPU-s*: documents per CPU-second this "
        "process used while timed, an indication (not a measurement) of what an uncontended core would do. "
        "*peak RSS*: the process's VmHWM (interpreter, libraries, tokenised data, model; all of it). *head "
        "params*: parameters of the label head. *head+optimizer*: the head's parameters, gradients, AdamW moments and "
        "int32 indices, counted from the live tensors. *estimate*: `xmc_dst.estimate.estimate_memory` for the whole "
        "training step (static + activations, no interpreter or data), the number to compare with a device budget."
        + (" *peak CUDA*: `torch.cuda.max_memory_allocated` during fit." if cuda else "")
        + " Peak RSS exceeds the estimate by the interpreter, libraries and data (RSS at fit start minus the model's "
        "parameters, `fit_start_rss_bytes` in the jsonl) and, with the dense head, by the AdamW step's temporary "
        "copy of the second moments (`torch._foreach_sqrt` in `xmc_dst.optim`: one parameter-sized tensor, which the "
        "estimate does not count).",
        "",
        "| labels | head | fan-in | docs/s | docs/s, median step | docs per own CPU-s | peak RSS GB | "
        + ("peak CUDA GB | " if cuda else "") + "head params | head+optimizer GB | estimate GB | others CPU |",
        "|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("type") not in ("run", "estimate"):
            continue
        name = VARIANT_LABEL[r["variant"]]
        fan_in = "-" if r["fan_in"] is None else (f"{r['fan_in']} of {r['intermediate_dim']}"
                                                  if r["intermediate_dim"] else f"{r['fan_in']} of 768")
        if r["type"] == "estimate":
            lines.append(f"| {r['labels']:,} | {name} | {fan_in} | (estimate only) | - | - | - | "
                         + ("- | " if cuda else "")
                         + f"{head_params(r):,} | {r['estimate_head_state_gb']:.2f} | {r['estimate_gb']:.2f} | - |")
        elif "error" in r:
            lines.append(f"| {r['labels']:,} | {name} | {fan_in} | error: {r['error'][:120]} | - | - | - | "
                         + ("- | " if cuda else "") + f"{head_params(r):,} | - | {r['estimate_gb']:.2f} | - |")
        else:
            cuda_cell = f"{r['peak_cuda_bytes'] / GB:.2f} | " if cuda else ""
            share = "-" if r.get("others_cpu_share") is None else f"{100 * r['others_cpu_share']:.0f}%"
            own = r.get("own_cpu_share")
            per_cpu = f"{r['docs_per_s'] / (own * meta['machine']['cores']):.1f}" if own else "-"
            lines.append(f"| {r['labels']:,} | {name} | {fan_in} | {r['docs_per_s']:.1f} | "
                         f"{r['docs_per_s_median_step']:.1f} | {per_cpu} | "
                         f"{r['peak_rss_bytes'] / GB:.2f} | {cuda_cell}{r['head_params']:,} | "
                         f"{r['head_state_bytes'] / GB:.3f} | {r['estimate_gb']:.2f} | {share} |")
    return "\n".join(lines) + "\n"


def head_params(row: dict[str, Any]) -> int:
    """Parameter count of the label head (weights + bias) from the configuration."""
    if row.get("head_params"):
        return int(row["head_params"])
    width = row["intermediate_dim"] or 768
    per_label = width + 1 if row["variant"] == "dense" else min(row["fan_in"], width) + 1
    return row["labels"] * per_label


def fmt_load(load: Sequence[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in load) if load else "?"


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = meta["device"] == "cuda"
    colors = {"dense": "tab:red", "sparse": "tab:blue", "sparse-int": "tab:green"}
    fig, ax = plt.subplots(figsize=(8.5, 6.0))
    for variant, color in colors.items():
        runs = sorted((r for r in rows if r.get("type") == "run" and r["variant"] == variant and "error" not in r),
                      key=lambda r: r["labels"])
        all_rows = sorted((r for r in rows if r.get("type") in ("run", "estimate") and r["variant"] == variant),
                          key=lambda r: r["labels"])
        if not all_rows:
            continue
        name = VARIANT_LABEL[variant]
        if runs:
            peak_key = "peak_cuda_bytes" if cuda else "peak_rss_bytes"
            style = dict(marker="D", linestyle="-.", mfc="none", markersize=9) if variant == "sparse-int" else \
                dict(marker="o", linestyle="-")
            ax.plot([r["labels"] for r in runs], [r[peak_key] / GB for r in runs], color=color,
                    label=f"{name}: measured peak {'CUDA' if cuda else 'RSS'}", **style)
            if variant != "sparse-int" or not any(r.get("variant") == "sparse" for r in rows):
                ax.plot([r["labels"] for r in runs], [r["head_state_bytes"] / GB for r in runs], "s:", color=color,
                        label=f"{name}: measured head+optimizer")
        if variant == "sparse-int" and any(r.get("variant") == "sparse" for r in rows):
            continue  # its head state and estimate lie on the sparse head's (the 1024-wide layer adds 13 MB)
        ax.plot([r["labels"] for r in all_rows], [r["estimate_gb"] for r in all_rows], "^--", color=color,
                alpha=0.6, mfc="none", label=f"{name}: estimate (whole step)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("labels")
    ax.set_ylabel("GB")
    ax.set_title(f"Training memory against label count, batch {meta['batch_size']}, max_length "
                 f"{meta['max_length']}, {meta['precision']}\n(largest point: estimate only)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.text(0.01, 0.01, "\n".join(header_lines(meta)).replace("`", ""), fontsize=6.5, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
