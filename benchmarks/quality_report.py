"""Tables and plots of ``benchmarks/quality.py``'s runs (and ``benchmarks/peers.py``'s, when present).

Kept apart from the grid driver so that ``python benchmarks/quality.py --report-only`` rebuilds everything from
``quality.jsonl`` without importing torch or Lightning.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import cell, mean_std

METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")
NOTES = (
    "Columns: *head MiB (train)* = the head's parameters, gradients, optimizer state and indices; *peak "
    "RSS* = the training process's peak resident memory (interpreter and data included); *s / epoch* = "
    'one training epoch with its validation pass; *train s* = the whole fit; *infer ms / doc* = the test '
    "pass over the test documents. Frozen-encoder runs (Debtags) share the encoder's pooled vectors "
    'through an exact on-disk cache: only the first run of a dataset pays the encoder pass (its *train s*'
    " is in the mean of its row), the others' *train s* is the head and intermediate training only. "
    'Peers: *train s* is fitting on ready TF-IDF features, *infer* their top-5 prediction (`peers.md` has'
    ' the details).'
)


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(dataset, variant) -> {metric: (mean, std)}, seeds, costs`` over the seeds of each pair."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["variant"])].append(run)
    table = {}
    for key, group in groups.items():
        row: dict[str, Any] = {"seeds": sorted(r["seed"] for r in group), "runs": len(group)}
        for metric in METRICS:
            values = [r["metrics"][metric] for r in group if metric in r["metrics"]]
            if values:
                row[metric] = mean_std(values)
        for cost in ("epoch_s", "fit_s", "peak_mib", "head_mib", "head_params", "epochs"):
            values = [r[cost] for r in group if r.get(cost) is not None]
            if values:
                row[cost] = mean_std([float(v) for v in values])
        per_doc = [1000 * r["test_s"] / r["test_docs"] for r in group if r.get("test_docs")]
        if per_doc:
            row["infer_ms_per_doc"] = mean_std(per_doc)
        row["fan_in"] = group[0].get("fan_in")
        table[key] = row
    return table


def load_peers(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown(runs: list[dict[str, Any]], peers: list[dict[str, Any]], header: str,
             order: list[str] | None = None) -> str:
    """The results table per dataset: our variants (mean ± std over seeds), then the peers."""
    table = aggregate(runs)
    datasets = order or sorted({d for d, _ in table})
    lines = [header, ""]
    for dataset in datasets:
        ours = [(v, row) for (d, v), row in table.items() if d == dataset]
        theirs = [p for p in peers if p.get("dataset") == dataset]
        if not ours and not theirs:
            continue
        lines += [f"### {dataset}", "",
                  "| model | seeds | " + " | ".join(METRICS) + " | head params | head MiB (train) | peak RSS MiB "
                  "| epochs | s / epoch | train s | infer ms / doc |",
                  "|---|---|" + "---|" * (len(METRICS) + 7)]
        for variant, row in ours:
            cells = [cell(row[m], row["runs"]) if m in row else "-" for m in METRICS]
            cost = [f"{row['head_params'][0]:,.0f}" if "head_params" in row else "-",
                    f"{row['head_mib'][0]:.1f}" if "head_mib" in row else "-",
                    f"{row['peak_mib'][0]:,.0f}" if "peak_mib" in row else "-",
                    f"{row['epochs'][0]:.0f}" if "epochs" in row else "-",
                    f"{row['epoch_s'][0]:.1f}" if "epoch_s" in row else "-",
                    f"{row['fit_s'][0]:.0f}" if "fit_s" in row else "-",
                    f"{row['infer_ms_per_doc'][0]:.3f}" if "infer_ms_per_doc" in row else "-"]
            lines.append(f"| {variant} | {row['runs']} | " + " | ".join(cells + cost) + " |")
        for peer in theirs:
            m = peer.get("metrics", {})
            cells = [cell(m[k], peer.get("runs", 1)) if k in m else "-" for k in METRICS]
            train = (peer.get("train_s") or [None])[0]
            predict = (peer.get("predict_s") or [None])[0]
            docs = peer.get("test_docs")
            infer = f"{1000 * predict / docs:.3f}" if predict is not None and docs else "-"
            train_cell = f"{train:.1f}" if train is not None else "-"
            lines.append(f"| peer: {peer['system']} | {peer.get('runs', 1)} | " + " | ".join(cells)
                         + f" | - | - | - | - | - | {train_cell} | {infer} |")
        lines.append("")
    return "\n".join(lines)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: Path, footer: str, bottom: float) -> None:
    """Stamp the provenance footer, lay out above it, write the PNG and free the figure."""
    figure.text(0.01, 0.005, footer, fontsize=7)
    figure.tight_layout(rect=(0, bottom, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_fan_in(runs: list[dict[str, Any]], path: Path, footer: str, datasets: list[str]) -> bool:
    """P@1 and head training memory against fan-in (sparse, DST), with the dense head as a line."""
    plt = _pyplot()

    table = aggregate(runs)
    datasets = [d for d in datasets if any(k[0] == d for k in table)]
    if not datasets:
        return False
    figure, axes = plt.subplots(2, len(datasets), figsize=(4.2 * len(datasets), 6.4), squeeze=False)
    for column, dataset in enumerate(datasets):
        points = sorted((row["fan_in"], row) for (d, v), row in table.items()
                        if d == dataset and v.startswith("sparse-f") and row.get("fan_in"))
        dense = table.get((dataset, "dense"))
        for row_index, (metric, label) in enumerate((("P@1", "test P@1 (%)"), ("head_mib", "head MiB (train)"))):
            ax = axes[row_index][column]
            if points:
                xs = [p[0] for p in points]
                ys = [p[1][metric][0] for p in points if metric in p[1]]
                errors = [p[1][metric][1] for p in points if metric in p[1]]
                if len(ys) == len(xs):
                    ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label="sparse (DST)")
            if dense is not None and metric in dense:
                ax.axhline(dense[metric][0], color="gray", linestyle="--", label="dense head")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("fan-in")
            ax.set_ylabel(label)
            if row_index == 0:
                ax.set_title(dataset)
            ax.legend(fontsize=8)
    _save(plt, figure, path, footer, bottom=0.03)
    return True


def plot_aux_curves(runs: list[dict[str, Any]], path: Path, footer: str, datasets: list[str],
                    pairs: dict[str, tuple[str, str]]) -> bool:
    """Validation P@1 per epoch with and without the auxiliary objective (mean over seeds)."""
    plt = _pyplot()

    datasets = [d for d in datasets if d in pairs and any(r["dataset"] == d for r in runs)]
    if not datasets:
        return False
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for column, dataset in enumerate(datasets):
        ax = axes[0][column]
        for variant in pairs[dataset]:
            curves = [r["curve"] for r in runs if r["dataset"] == dataset and r["variant"] == variant]
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for curve in curves:
                for point in curve:
                    if "P@1" in point:
                        by_epoch[point["epoch"]].append(point["P@1"])
            if by_epoch:
                epochs = sorted(by_epoch)
                ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker=".", label=variant)
        ax.set_title(dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation P@1 (%)")
        ax.legend(fontsize=8)
    _save(plt, figure, path, footer, bottom=0.05)
    return True


def write_report(runs: list[dict[str, Any]], out: Path, command: str, machine: str, commit: str,
                 datasets: list[str], peers: bool = True, aux_pairs: dict[str, tuple[str, str]] | None = None) -> None:
    """Write ``quality.md`` and the PNG plots under ``out``."""
    runs = [r for r in runs if r["dataset"] in datasets]
    peer_rows = load_peers(out / "peers.jsonl") if peers else []
    commits = sorted({r.get("commit", "?") for r in runs})
    commands = sorted({r.get("command", command) for r in runs})
    machine = " ; ".join(sorted({r["machine"] for r in runs if r.get("machine")})) or machine  # where the runs ran
    footer = f"{machine} | {' ; '.join(commands) or command} | commit {', '.join(commits)}"
    if commands and command not in commands:  # --report-only: name the commands that ran the grid
        command = " ; ".join(commands) + f"`; report by `{command}"
    stamp = time.strftime("%Y-%m-%d")
    header = (f"Machine(s): {machine}. Command: `{command}`. Runs at commit(s) {', '.join(commits)}; report {stamp} "
              f"at {commit}. Mean ± sample std over seeds; test split; PSP with A = 0.55, B = 1.5.\n\n"
              + NOTES)
    (out / "quality.md").write_text(markdown(runs, peer_rows, header, datasets) + "\n")
    print((out / "quality.md").read_text())
    try:
        import matplotlib  # noqa: F401 - the `bench` extra
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): tables written, plots skipped")
        return
    plot_fan_in(runs, out / "quality_fan_in.png", footer, datasets)
    if aux_pairs:
        plot_aux_curves(runs, out / "quality_aux_curves.png", footer, datasets, aux_pairs)
