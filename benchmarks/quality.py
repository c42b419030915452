"""Accuracy, memory and cost of every model variant on the shipped real datasets, beside peer systems.

    python benchmarks/quality.py                              # the whole grid (hours on 2 CPU cores)
    python benchmarks/quality.py --datasets bibtex --seeds 42 # one dataset, one seed
    python benchmarks/quality.py --report-only                # tables and plots from the saved runs

The peers (``benchmarks/peers.py``; ``bash scripts/setup-peers.sh`` installs them) run for every dataset that
``peers.jsonl`` lacks, a peer whose package is missing is skipped with a note.

Each run is one ``xmc-dst fit`` of a shipped config (``configs/<dataset>.yaml``) with a few keys changed by the
variant, in a fresh subprocess (so its peak RSS is its own), with the same protocol as the configs: the bag-of-words
configs and the raw-text recipe train on every training document and keep the last epoch (rows named
``holdout/...`` and ``v3/...`` chose it on 10% of them held out); the kept checkpoint is tested on the full test
split, test labels unseen in training dropped from the targets (points kept).
PSP uses A = 0.55, B = 1.5 for every dataset.

Variants on the raw-text sets (Debtags, DebianFiles; configs/raw-text.yaml, one recipe for both):
  recipe               the config as shipped
  recipe+dense         the same with the nn.Linear head (no DST)
  recipe-lexical-head  without the lexical head (lexical_terms 0)
  recipe-lexical       without any lexical feature (neither projection nor head)
  recipe+propensity    positives weighted by their label's inverse propensity (the v3 recipe's choice)
  recipe+projection-lr the lexical projection trained at 1e-3 (v3's; the recipe keeps it near its random start)
  recipe+holdout       10% of the training documents held out to choose the checkpoint (v3's protocol; the recipe
                       trains on every document and tests the last epoch)
  recipe+fan-in-256    the sparse head at fan-in 256
  recipe+steps-6000    twice the training budget (callbacks.TrainingBudget steps 6000; the recipe: 3000)
  recipe+features-250k a TF-IDF vocabulary of up to 250,000 terms (the recipe: 100,000)
  recipe+label-names   the head starts at its labels' names read as documents (model.head_init label_names)
  recipe-lexical-lr    the lexical head at the head's learning rate 1e-3 (the recipe: 1e-2)
  recipe+negatives     the lexical head grows negative evidence (lexical_negatives 0.5, callbacks.LexicalNegatives)
  recipe+grouped-g<G>  the sparse head as a grouped one (GroupedFanInHead, G labels per shared index row, grouped
                       by LabelGrouping), G = 8, 16, 32
  recipe+bf16-sr       the sparse head's weights and optimizer state in bf16, stochastic rounding
  recipe+grouped-g16+bf16-sr  both

Variants on the bag-of-words sets (what each one shows):
  dense            the nn.Linear baseline head
  sparse-f<k>      fixed fan-in head at fan-in k (two values per dataset), with DST (SET rewiring)
  +intermediate    sparse head after a dense intermediate layer (the paper's gradient-flow remedy 1)
  +aux             sparse head with the auxiliary meta-classifier over label clusters (remedy 2)
  gradient         DST with gradient (RigL) regrowth instead of random
  frozen-topology  the sparse head with rewiring off: the control that shows what DST itself buys
  grouped-g<G>     the shipped sparse head as a grouped one (G labels share an index row), G = 8, 16, 32
  bf16-sr          the shipped sparse head in bf16 weights and state, stochastic rounding
  grouped-g16+bf16-sr  both
  holdout          the shipped config with 10% of the training documents held out to choose the checkpoint (the
                   protocol of the rows named ``holdout/<variant>``, measured before the configs trained on all)

Writes ``benchmarks/results/quality.jsonl`` (one line per run, appended; a run already there is not run again),
``quality.md`` (mean and standard deviation over seeds, with the peers of ``benchmarks/peers.py`` when their
packages are installed) and the plots ``quality_fan_in.png`` and ``quality_aux_curves.png``. Every table and plot
names the machine, the command and the commit.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/quality.py` from a checkout: import benchmarks.*

from benchmarks.common import ChildFailed, run_child, serve_child  # noqa: E402 - after the path above
from xmc_dst.paths import cache_dir  # noqa: E402
from xmc_dst.provenance import git_commit, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")


# --------------------------------------------------------------------------------------------------------------
# The grid: dataset -> base config, variants -> dotted-key changes of that config.
# --------------------------------------------------------------------------------------------------------------

DST = "callbacks.DynamicSparseTraining"
AUX = "callbacks.AuxiliaryObjective"
GROUPING = "callbacks.LabelGrouping"
GROUP_SIZES = (8, 16, 32)
BF16_SR = {"model.head.init_args.weight_dtype": "bfloat16", "model.head.init_args.state_dtype": "bfloat16"}


def grouped(size: int) -> dict[str, Any]:
    """The shipped sparse head as a grouped one (groups of ``size`` labels by clusters of the training data)."""
    return {"model.head.class_path": "xmc_dst.heads.GroupedFanInHead", "model.head.init_args.group_size": size,
            "model.head.init_args.impl": None, f"callbacks.{GROUPING}": {}}

HOLDOUT = {"data.init_args.val_fraction": 0.1}  # the checkpoint chosen on 10% of the training documents
RELU_1024 = {"model.intermediate_dim": 1024, "model.intermediate_activation": "relu"}
DEBIAN_FILES = {"data.class_path": "datamodules.DebianFiles"}  # the same recipe, the other shipped raw-text set
# The raw-text recipe (configs/raw-text.yaml) and what each of its parts buys, on every raw-text dataset.
RECIPE_VARIANTS: dict[str, dict[str, Any]] = {
    "recipe+dense": {"model.head.class_path": "xmc_dst.heads.DenseHead", "model.head.init_args.fan_in": None,
                     "model.head.init_args.impl": None, f"callbacks.{DST}": None},
    "recipe-lexical-head": {"model.lexical_terms": 0},
    "recipe-lexical": {"model.lexical_terms": 0, "model.encoder.init_args.lexical_dim": 0,
                       "data.init_args.lexical_features": 0},
    "recipe+propensity": {"model.positive_weighting": "propensity"},  # v3: positives times inverse propensity
    "recipe+projection-lr": {"model.encoder.init_args.lexical_lr": 1e-3},  # v3: the projection trained at 1e-3
    "recipe+holdout": HOLDOUT,  # v3: 10% of the training documents held out select the checkpoint
    "recipe-lexical-lr": {"model.lexical_head_lr": None},
    "recipe+negatives": {"model.lexical_negatives": 0.5},
    "recipe+fan-in-256": {"model.head.init_args.fan_in": 256},
    "recipe+steps-6000": {"callbacks.callbacks.TrainingBudget": {"steps": 6000}},  # twice the recipe's budget
    "recipe+features-250k": {"data.init_args.lexical_features": 250_000},  # every term of >= 2 docs on both sets
    "recipe+label-names": {"model.head_init": "label_names"},  # the head starts at its labels' name vectors
    **{f"recipe+grouped-g{size}": grouped(size) for size in GROUP_SIZES},
    "recipe+bf16-sr": dict(BF16_SR),
    "recipe+grouped-g16+bf16-sr": {**grouped(16), **BF16_SR},
}
DATASETS: dict[str, dict[str, Any]] = {
    "debtags": {"config": "configs/raw-text.yaml", "default": "recipe", "variants": RECIPE_VARIANTS, "base": {}},
    "debian-files": {"config": "configs/raw-text.yaml", "default": "recipe", "variants": RECIPE_VARIANTS,
                     "base": DEBIAN_FILES},
    "bibtex": {"config": "configs/bibtex.yaml", "fan_ins": (16, 64), "aux_clusters": 16, "aux_cutoff": 10,
               "default": "sparse-f64", "extra": {}},
    "delicious": {"config": "configs/delicious.yaml", "fan_ins": (32, 128), "aux_clusters": 64, "aux_cutoff": 10,
                  "default": "sparse-f128", "extra": {}},
}


def variants(dataset: str) -> dict[str, dict[str, Any]]:
    """Changes of the dataset's config per variant; ``None`` removes a key, ``callbacks.X`` edits a callback.
    Each dataset's shipped config is one of the variants (``DATASETS[d]["default"]``) with no change (beyond the
    dataset's ``base``: the DataModule of a dataset that shares a config)."""
    spec = DATASETS[dataset]
    if "variants" in spec:
        base = spec["base"]
        out = {name: {**base, **changes} for name, changes in spec["variants"].items()}
        out[spec["default"]] = dict(base)
        return out
    low, high = spec["fan_ins"]
    out: dict[str, dict[str, Any]] = {
        "dense": {"model.head.class_path": "xmc_dst.heads.DenseHead", "model.head.init_args.fan_in": None,
                  "model.head.init_args.impl": None, f"callbacks.{DST}": None},  # the head's optimizer settings stay
        f"sparse-f{high}": {"model.head.init_args.fan_in": high, "model.intermediate_dim": 0},
        f"sparse-f{low}": {"model.head.init_args.fan_in": low, "model.intermediate_dim": 0},
        "sparse+intermediate": dict(RELU_1024),
        "sparse+aux": {"model.aux_clusters": spec["aux_clusters"],
                       f"callbacks.{AUX}": {"alpha": 0.4, "cutoff_epoch": spec["aux_cutoff"]}},
        "gradient": {f"callbacks.{DST}.regrow": "gradient"},
        "frozen-topology": {f"callbacks.{DST}": None},
        **{f"grouped-g{size}": grouped(size) for size in GROUP_SIZES},
        "bf16-sr": dict(BF16_SR),  # bf16 weights and state, stochastic rounding (the head's own optimizer)
        "grouped-g16+bf16-sr": {**grouped(16), **BF16_SR},
        "holdout": dict(HOLDOUT),
        **spec["extra"],
    }
    out[spec["default"]] = {}  # the shipped config as it is
    return out


def headline(dataset: str) -> tuple[str, ...]:
    """Variants run with every seed: the dense baseline and the shipped config (and, on the bag-of-words sets, the two
    gradient-flow remedies)."""
    if "variants" in DATASETS[dataset]:
        return ("recipe+dense", DATASETS[dataset]["default"])
    return ("dense", DATASETS[dataset]["default"], "sparse+intermediate", "sparse+aux")


def apply_changes(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Return ``config`` with the dotted-key ``changes`` applied (``callbacks.<class>`` keys edit the trainer's
    callback list: ``None`` removes the callback, a dict adds or updates its ``init_args``, ``callbacks.<class>.k``
    sets one argument)."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        if key.startswith("callbacks."):
            _change_callback(config, key.removeprefix("callbacks."), value)
            continue
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return config


def _change_callback(config: dict[str, Any], key: str, value: Any) -> None:
    trainer = config.setdefault("trainer", {})
    callbacks = list(trainer.get("callbacks") or [])
    class_path, argument = key, None
    for known in (DST, AUX):
        if key.startswith(known + "."):
            class_path, argument = known, key[len(known) + 1:]
    found = [cb for cb in callbacks if cb.get("class_path") == class_path]
    if value is None and argument is None:
        callbacks = [cb for cb in callbacks if cb.get("class_path") != class_path]
    elif argument is None:
        if found:
            found[0].setdefault("init_args", {}).update(value)
        else:
            callbacks.append({"class_path": class_path, "init_args": dict(value)})
    else:
        if not found:
            raise KeyError(f"{class_path} is not among the config's callbacks")
        found[0].setdefault("init_args", {})[argument] = value
    trainer["callbacks"] = callbacks


# --------------------------------------------------------------------------------------------------------------
# One run (in its own process).
# --------------------------------------------------------------------------------------------------------------

def shared_cache_path(spec: dict[str, Any]) -> Path | None:
    """The file of the frozen encoder's pooled features that every run of ``spec``'s dataset and encoder settings
    shares (None: the run caches no features)."""
    config = apply_changes(yaml.safe_load((ROOT / spec["config"]).read_text()), spec["changes"])
    encoder = config["model"]["encoder"]
    if not (encoder.get("init_args", {}).get("cache_features") and spec.get("feature_cache_dir")):
        return None
    pooled_by = {k: encoder.get("init_args", {}).get(k) for k in ("pooling", "num_layers", "layers", "pretrained")}
    key = json.dumps([spec["config"], encoder.get("class_path"), pooled_by, config["data"]], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(spec["feature_cache_dir"]) / f"{spec['dataset']}-{digest}.pt"


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit and test one configuration in this process; return metrics, times, memory and the val P@1 curve."""
    import torch

    from benchmarks.probes import SharedFeatureCache, Timing
    from callbacks import MemoryProfiler
    from xmc_dst.cli import cli

    torch.set_num_threads(spec.get("threads", 2))
    config = apply_changes(yaml.safe_load((ROOT / spec["config"]).read_text()), spec["changes"])
    config["seed_everything"] = spec["seed"]
    config.setdefault("model", {})["seed"] = spec["seed"]
    config["test_after_fit"] = True
    work = Path(spec["workdir"])
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(work / "logs"), "name": "run"}}
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["enable_model_summary"] = False
    config.setdefault("checkpoint", {})["dirpath"] = str(work / "checkpoints")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    timing, memory = Timing(), MemoryProfiler(print_table=False)
    start = time.perf_counter()
    app = cli(["--config", str(path)], run=False)
    app.trainer.callbacks.extend([timing, memory])
    shared = None
    if (cache_path := shared_cache_path(spec)) is not None:
        shared = SharedFeatureCache(cache_path)
        app.trainer.callbacks.append(shared)
    app.trainer.fit(app.model, datamodule=app.datamodule)
    fit_s = time.perf_counter() - start
    best = getattr(app.trainer.checkpoint_callback, "best_model_path", "") or None
    app.trainer.test(app.model, datamodule=app.datamodule, ckpt_path=best, verbose=False)
    metrics = {k.removeprefix("test/"): float(v) for k, v in app.trainer.callback_metrics.items()
               if k.startswith("test/")}
    model = app.model
    head_params = sum(p.numel() for p in model.head.parameters())
    return {
        "metrics": {k: metrics[k] for k in METRICS if k in metrics},
        "epochs": len(timing.epochs),
        "epoch_s": statistics.mean(timing.epochs) if timing.epochs else None,
        "fit_s": fit_s,
        "test_s": timing.test_s,
        "test_docs": timing.test_docs,
        "peak_mib": (memory.report.get("peak_bytes") or 0) / 2**20,
        "static_mib": (memory.report.get("static_bytes") or 0) / 2**20,
        "head_mib": _part_mib(memory.report.get("parts", {}).get("head")),
        "head_params": head_params,
        "fan_in": getattr(model.head, "fan_in", None),
        "best_checkpoint": Path(best).name if best else None,
        "shared_feature_cache": bool(shared and shared.loaded),
        "curve": timing.curve,
    }


def _part_mib(part: dict[str, Any] | None) -> float | None:
    """Parameter + gradient + optimizer-state + buffer MiB of one part of the model (MemoryProfiler's report)."""
    if not part:
        return None
    return part["static"] / 2**20


# --------------------------------------------------------------------------------------------------------------
# The grid driver, tables and plots.
# --------------------------------------------------------------------------------------------------------------

def run_jobs(jobs: list[dict[str, Any]], parallel: int, runs: list[dict[str, Any]], runs_path: Path,
             command: str) -> None:
    """Run ``jobs`` ``parallel`` at a time, appending each result to ``runs_path`` as it ends. The first job of each
    shared feature cache runs before the others that read it (it writes the cache), unless the cache exists."""
    lock = threading.Lock()
    paths = {id(job): shared_cache_path(job) for job in jobs}
    cache_of = {id(job): str(paths[id(job)] or job["dataset"]) for job in jobs}
    first_of: dict[str, int] = {}
    for job in jobs:
        first_of.setdefault(cache_of[id(job)], id(job))
    primed = {cache: threading.Event() for cache in first_of}
    for job in jobs:
        if paths[id(job)] is not None and paths[id(job)].exists():
            primed[cache_of[id(job)]].set()
    pending = list(jobs)

    def next_job() -> dict[str, Any] | None:
        while True:
            with lock:
                if not pending:
                    return None
                for job in pending:
                    cache = cache_of[id(job)]
                    if id(job) == first_of[cache] or primed[cache].is_set():
                        pending.remove(job)
                        return job
            time.sleep(1.0)

    def worker() -> None:
        while (job := next_job()) is not None:
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            try:
                result = run_child(__file__, job)
            except ChildFailed as error:  # reported, and the grid goes on
                print(f"run {job['dataset']}/{job['variant']}/seed {job['seed']} failed: {error}", file=sys.stderr,
                      flush=True)
                continue
            finally:
                primed[cache_of[id(job)]].set()
            row = {**{k: job[k] for k in ("dataset", "variant", "seed", "config", "changes", "threads")},
                   **result, "parallel": parallel, "started": started, "machine": machine(),
                   "commit": git_commit(), "command": command}
            with lock:
                with runs_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                runs.append(row)
            m = row["metrics"]
            print(f"{job['dataset']:10s} {job['variant']:30s} seed {job['seed']}: P@1 {m.get('P@1', float('nan')):.2f}"
                  f" PSP@1 {m.get('PSP@1', float('nan')):.2f} fit {row['fit_s']:.0f}s", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, parallel))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=None, help="variant names (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--all-seeds", action="store_true",
                        help="run every variant with every seed (default: the headline variants only; the others "
                             "with the first seed)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (e.g. 2 runs of 1 thread)")
    parser.add_argument("--feature-cache", type=Path, default=cache_dir("quality"),
                        help="where frozen-encoder runs share their pooled vectors (exact)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="leave the peer systems out of the table")
    parser.add_argument("--rerun-peers", action="store_true",
                        help="run the peers again (default: only for datasets missing from peers.jsonl)")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        serve_child(args.child, run_one)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "quality.jsonl"
    runs = load_runs(runs_path)
    done = {(r["dataset"], r["variant"], r["seed"]) for r in runs}
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.report_only:
        jobs = []
        for dataset in args.datasets:
            for variant, changes in variants(dataset).items():
                if args.variants and variant not in args.variants:
                    continue
                every = variant in headline(dataset) or args.all_seeds
                for seed in args.seeds if every else args.seeds[:1]:
                    if (dataset, variant, seed) not in done:
                        jobs.append({"dataset": dataset, "variant": variant, "seed": seed, "threads": args.threads,
                                     "config": DATASETS[dataset]["config"], "changes": changes,
                                     "feature_cache_dir": str(args.feature_cache)})
        run_jobs(jobs, args.parallel, runs, runs_path, command)
    if not args.no_peers and not args.report_only:
        from benchmarks.peers import run_peers, save

        have = {json.loads(line)["dataset"] for line in (args.out / "peers.jsonl").read_text().splitlines()
                if line.strip()} if (args.out / "peers.jsonl").exists() else set()
        missing = [d for d in args.datasets if args.rerun_peers or d not in have]
        if missing:  # the peers' own command: python benchmarks/peers.py (3 runs, 2 threads)
            save(run_peers(missing, runs=3, threads=2, command=command), args.out)
    from benchmarks.quality_report import write_report

    write_report(runs, args.out, command=command, machine=machine(), commit=git_commit(),
                 datasets=args.datasets, peers=not args.no_peers,
                 aux_pairs={d: (f"holdout/{DATASETS[d]['default']}", "holdout/sparse+aux") for d in DATASETS
                            if "variants" not in DATASETS[d]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
