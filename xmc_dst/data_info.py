"""``xmc-dst data-info DIR``: what to check in a dataset folder before a long GPU run.

It reads the folder in any layout the DataModules read (raw text, LF, Extreme Classification Repository sparse
format), through the same DataModule a config would build (``--config``: that config's class and settings; else the
named dataset whose folder has this name, e.g. ``Amazon-670K``; else the layout's generic class), so the files it
finds and the errors it raises are the run's. It prints:

* documents per split and labels: those of the training split (the model's outputs for raw text), every label (train
  and test; LF and sparse data: the label file's / header's count) and the test labels that no training document has;
* labels per document (mean, median, max) and training documents per label, with head / torso / tail counts: a
  label is *tail* with at most ``--tail-max`` (5) training documents, *head* with at least ``--head-min`` (100), and
  labels without any training document are counted apart;
* text lengths in tokens of the configured tokenizer (special tokens included, untruncated) on a fixed-seed sample
  of ``--sample`` documents per split, as percentiles, and the share longer than ``max_length``; for sparse data the
  features per document instead;
* the published statistics of a named dataset beside what was found (train / test documents, labels over both);
* with ``--plot PNG``, the training frequency of every label against its rank, log-log (needs matplotlib).

``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmc_dst.config_file import read_config

__all__ = ["DatasetInfo", "SplitInfo", "data_info", "data_info_main"]

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class SplitInfo:
    """One split: documents, labels per document, label frequencies, and a sample of its texts (or feature counts)."""

    docs: int
    labels_per_doc: dict[str, float]  # mean, median, max
    docs_without_labels: int
    lengths: dict[str, float] = field(default_factory=dict)  # percentile -> tokens (or features); "truncated" share
    length_unit: str = "tokens"


@dataclass
class DatasetInfo:
    """What :func:`data_info` found in a folder."""

    directory: str
    datamodule: str
    layout: str
    splits: dict[str, SplitInfo]
    train_labels: int  # labels with at least one training document
    all_labels: int  # train and test labels (or the label file's / header's count)
    labels_without_train_docs: int
    unseen_test_labels: int  # distinct test labels without a training document
    unseen_test_occurrences: int
    docs_per_label: dict[str, float]  # mean, median, max over the training labels
    head_torso_tail: dict[str, int]
    thresholds: dict[str, int]
    published: dict[str, int] | None = None
    tokenizer: str | None = None
    max_length: int | None = None
    notes: list[str] = field(default_factory=list)
    label_frequencies: list[int] = field(default_factory=list, repr=False)  # training docs per label, descending

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("label_frequencies")
        return out

    def found(self) -> dict[str, int]:
        return {"train_docs": self.splits["train"].docs, "test_docs": self.splits["test"].docs,
                "num_labels": self.all_labels}


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "median": 0.0, "max": 0.0}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "max": float(values.max())}


def _sample(items: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of ``size`` items of a stream (reservoir sampling: one pass, ``size`` items held)."""
    rng, kept = random.Random(seed), []
    for i, item in enumerate(items):
        if i < size:
            kept.append(item)
        elif (j := rng.randrange(i + 1)) < size:
            kept[j] = item
    return kept


def _percentiles(lengths: np.ndarray, max_length: int | None) -> dict[str, float]:
    if lengths.size == 0:
        return {}
    out = {f"p{q}": float(np.percentile(lengths, q)) for q in PERCENTILES}
    if max_length is not None:
        out["truncated"] = float((lengths > max_length).mean())
    return out


# ------------------------------------------------------------------------------------------------- the layouts


def _layout(data: Any) -> str:
    from datamodules.bow import BoWXMCDataModule
    from datamodules.lf import LFXMCDataModule

    return "sparse" if isinstance(data, BoWXMCDataModule) else "lf" if isinstance(data, LFXMCDataModule) else "raw"


def _label_lists(data: Any, layout: str, split: str) -> Iterator[list[str]]:
    """Each document's labels as strings (label ids for LF and sparse data), in file order."""
    from datamodules.formats import iter_json_lines, iter_label_lines, lf_targets

    if layout == "raw":
        for _, labels in iter_label_lines(data.files[f"{split}_labels"]):
            yield list(dict.fromkeys(labels))
    elif layout == "lf":
        path, num_labels = data.files["trn" if split == "train" else "tst"], _num_labels(data, layout)
        for number, record in iter_json_lines(path, ("title", "target_ind")):
            yield [str(t) for t in dict.fromkeys(lf_targets(path, number, record, num_labels))]
    else:
        matrix = data.split_data(split)
        for row in range(matrix.num_docs):
            ids = matrix.label_indices[matrix.label_indptr[row]:matrix.label_indptr[row + 1]]
            yield [str(i) for i in dict.fromkeys(ids.tolist())]


def _num_labels(data: Any, layout: str) -> int:
    """The label file's (LF) or header's (sparse) label count, read without building any cache."""
    from datamodules.formats import count_lines

    return count_lines(data.files["lbl"]) if layout == "lf" else data.num_labels


def _texts(data: Any, layout: str, split: str) -> Iterator[str]:
    from datamodules.formats import iter_json_lines, iter_lines
    from datamodules.lf import record_text

    if layout == "raw":
        for _, text in iter_lines(data.files[f"{split}_texts"]):
            yield text
    else:
        path = data.files["trn" if split == "train" else "tst"]
        for number, record in iter_json_lines(path, ("title",)):
            yield record_text(str(path), number, record, data.use_content)


def _load_tokenizer(name: str) -> Any:
    from datamodules.text import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as error:  # not on this machine, or not a tokenizer
        raise ValueError(f"data-info: tokenizer {name!r} cannot be loaded here ({str(error).splitlines()[0]}); pass "
                         "--tokenizer DIR (a local tokenizer folder), or --sample 0 to skip the text lengths") from None


def _token_lengths(texts: list[str], tokenizer: Any) -> np.ndarray:
    """Tokens per text, special tokens included, untruncated."""
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"] if texts else []
    return np.array([len(ids) for ids in encoded], dtype=np.int64)


def _feature_counts(data: Any, split: str) -> np.ndarray:
    return np.diff(data.split_data(split).feature_indptr)


# ------------------------------------------------------------------------------------------------- the analysis


def _named_class_for(directory: Path) -> type | None:
    """The named dataset whose folder has ``directory``'s name (``data/Amazon-670K`` -> Amazon670K)."""
    from datamodules import named

    for value in vars(named).values():
        if isinstance(value, type) and issubclass(value, named.NamedDataset) and value is not named.NamedDataset:
            if Path(value.default_dir).name.lower() == directory.name.lower():
                return value
    return None


def _generic_class_for(directory: Path) -> type:
    """The layout's DataModule class, from the files in ``directory``."""
    from datamodules.bow import BoWXMCDataModule, find_split
    from datamodules.formats import resolve
    from datamodules.lf import LFXMCDataModule
    from datamodules.raw_text import RawTextXMCDataModule

    if resolve(directory / "trn.json.gz") or resolve(directory / "trn.json"):
        return LFXMCDataModule
    if any(find_split(directory, name) for name in ("train", "trn")):
        return BoWXMCDataModule
    if not directory.is_dir():
        raise FileNotFoundError(f"data-info: {directory} is not a directory")
    if resolve(directory / "train_labels.txt") is None:
        held = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
        raise FileNotFoundError(
            f"data-info: {directory} holds no dataset in a known layout (it holds {held}); expected the raw-text "
            "layout (train_texts.txt or train_raw_texts.txt, train_labels.txt, test_*), the LF layout (trn.json.gz, "
            "tst.json.gz, lbl.json.gz) or the sparse format (train.txt, test.txt or trn_X_Xf.txt, trn_X_Y.txt, ...)")
    return RawTextXMCDataModule


def _build_datamodule(directory: Path, config: str | Path | None, tokenizer: str | None) -> tuple[Any, str | None]:
    """The DataModule over ``directory`` (the config's class and settings, else a named or generic one) and the
    tokenizer to measure lengths with."""
    init_args: dict[str, Any] = {}
    if config is not None:
        node = read_config(config, "data-info").get("data") or {}
        if "class_path" not in node:
            raise ValueError(f"data-info: {config} has no data.class_path")
        module, _, name = node["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        init_args = dict(node.get("init_args") or {})
    else:
        cls = _named_class_for(directory) or _generic_class_for(directory)
    init_args["data_dir"] = directory
    for unused in ("num_workers", "cache_dir", "predict_file"):
        init_args.pop(unused, None)
    from datamodules.text import TokenizedTextDataModule

    text = issubclass(cls, TokenizedTextDataModule)
    if text and tokenizer is not None:
        init_args["tokenizer"] = tokenizer
    data = cls(**init_args)
    return data, (data.tokenizer_name if text else None)


def data_info(directory: str | Path, config: str | Path | None = None, tokenizer: str | None = None,
              max_length: int | None = None, sample: int = 10_000, tail_max: int = 5, head_min: int = 100,
              seed: int = 0) -> DatasetInfo:
    """Read the dataset in ``directory`` and return its statistics (see the module docstring)."""
    directory = Path(directory).expanduser()
    if tail_max < 0 or head_min <= tail_max:
        raise ValueError(f"data-info: need 0 <= --tail-max < --head-min, got {tail_max} and {head_min}")
    data, tokenizer_name = _build_datamodule(directory, config, tokenizer)
    layout = _layout(data)
    max_length = max_length or getattr(data, "max_length", None)
    tokenizer = _load_tokenizer(tokenizer_name) if sample > 0 and layout != "sparse" else None  # fail before reading
    splits, counts = {}, {}
    for split in ("train", "test"):
        per_doc, counter = [], Counter()
        for labels in _label_lists(data, layout, split):
            per_doc.append(len(labels))
            counter.update(labels)
        per_doc = np.array(per_doc, dtype=np.int64)
        splits[split] = SplitInfo(len(per_doc), _summary(per_doc), int((per_doc == 0).sum()))
        counts[split] = counter
        if sample > 0 and layout == "sparse":
            splits[split].lengths = _percentiles(_feature_counts(data, split), None)
            splits[split].length_unit = "features"
        elif sample > 0:
            texts = _sample(_texts(data, layout, split), sample, seed)
            splits[split].lengths = _percentiles(_token_lengths(texts, tokenizer), max_length)
    train, test = counts["train"], counts["test"]
    if layout == "raw":
        universe = set(train) | set(test)
    else:
        universe = {str(i) for i in range(_num_labels(data, layout))}  # the label file's or header's labels
    unseen = [label for label in test if label not in train]
    frequencies = np.array(sorted((train[label] for label in train), reverse=True), dtype=np.int64)
    tail = int((frequencies <= tail_max).sum())
    head = int((frequencies >= head_min).sum())
    published = getattr(type(data), "published", None)
    info = DatasetInfo(
        directory=str(directory), datamodule=type(data).__name__, layout=layout, splits=splits,
        train_labels=len(train), all_labels=len(universe), labels_without_train_docs=len(universe) - len(train),
        unseen_test_labels=len(unseen), unseen_test_occurrences=sum(test[label] for label in unseen),
        docs_per_label=_summary(frequencies),
        head_torso_tail={"head": head, "torso": len(frequencies) - head - tail, "tail": tail},
        thresholds={"tail_max": tail_max, "head_min": head_min},
        published=asdict(published) if published is not None else None,
        tokenizer=tokenizer_name if layout != "sparse" else None, max_length=max_length if layout != "sparse" else None,
        label_frequencies=frequencies.tolist())
    if layout == "raw" and unseen:
        info.notes.append(f"{len(unseen)} test labels have no training document: the model has no output for "
                          f"them, and their {info.unseen_test_occurrences} test occurrences are dropped")
    if getattr(data, "label_documents", False):
        info.notes.append("label_documents: every label's title is one more training document when training")
    return info


# ------------------------------------------------------------------------------------------------- the command


def _print(info: DatasetInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{info.directory} ({info.datamodule}, {info.layout} layout)")
    table.add_column("")
    for split in info.splits:
        table.add_column(split, justify="right")
    rows = [("documents", lambda s: f"{s.docs:,}"),
            ("labels per document (mean / median / max)",
             lambda s: "{mean:.2f} / {median:g} / {max:g}".format(**s.labels_per_doc)),
            ("documents without labels", lambda s: f"{s.docs_without_labels:,}")]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in info.splits.values()))
    keys = [k for k in ("p50", "p90", "p95", "p99", "p100", "truncated") if k in info.splits["train"].lengths]
    unit = info.splits["train"].length_unit
    for key in keys:
        label = f"{unit} {'max' if key == 'p100' else key}" if key != "truncated" else \
            f"longer than max_length {info.max_length}"
        table.add_row(label, *(f"{s.lengths[key]:.1%}" if key == "truncated" else f"{s.lengths.get(key, 0):g}"
                               for s in info.splits.values()))
    console.print(table)
    spread = info.docs_per_label
    parts = info.head_torso_tail
    console.print(f"labels: {info.train_labels:,} with training documents, {info.all_labels:,} in all, "
                  f"{info.labels_without_train_docs:,} without a training document; test labels unseen in training: "
                  f"{info.unseen_test_labels:,} (test occurrences: {info.unseen_test_occurrences:,})")
    console.print(f"training documents per label: mean {spread['mean']:.2f}, median {spread['median']:g}, max "
                  f"{spread['max']:g}; head (>= {info.thresholds['head_min']}) {parts['head']:,}, torso "
                  f"{parts['torso']:,}, tail (<= {info.thresholds['tail_max']}) {parts['tail']:,}")
    if info.tokenizer:
        console.print(f"tokenizer: {info.tokenizer}")
    if info.published:
        found = info.found()
        cells = [f"{key} {found[key]:,} (published {value:,}{'' if found[key] == value else ', differs'})"
                 for key, value in info.published.items()]
        console.print("published statistics: " + "; ".join(cells))
    for note in info.notes:
        console.print(f"note: {note}")


def _plot(info: DatasetInfo, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    frequencies = np.array(info.label_frequencies)
    axes.loglog(np.arange(1, frequencies.size + 1), frequencies, marker=".", linestyle="none", markersize=2)
    axes.set_xlabel("label rank")
    axes.set_ylabel("training documents")
    axes.set_title(f"Label frequencies: {Path(info.directory).name}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def data_info_main(argv: list[str] | None = None) -> int:
    """``xmc-dst data-info DIR [--config YAML] [...]``: print the statistics of a dataset folder."""
    parser = argparse.ArgumentParser(prog="xmc-dst data-info", description="Statistics of a dataset folder, to check "
                                     "before training (any layout the DataModules read).")
    parser.add_argument("directory", help="the dataset folder")
    parser.add_argument("--config", default=None, help="read it as this config's DataModule does (class, tokenizer, "
                        "max_length, ...)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the text lengths (default: the config's, "
                        "else the DataModule's default)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per document (default: the config's)")
    parser.add_argument("--sample", type=int, default=10_000, help="documents per split whose length is measured "
                        "(fixed-seed sample; 0: none)")
    parser.add_argument("--tail-max", type=int, default=5, help="a tail label has at most this many training docs")
    parser.add_argument("--head-min", type=int, default=100, help="a head label has at least this many")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write the label-frequency plot")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    for option in ("max_length", "tail_max", "head_min"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"data-info: --{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.sample < 0:
        raise ValueError(f"data-info: --sample must be >= 0 (0: no text lengths), got {args.sample}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("data-info: --plot needs matplotlib: pip install matplotlib (or the package's bench extra)")
    info = data_info(args.directory, args.config, args.tokenizer, args.max_length, args.sample, args.tail_max,
                     args.head_min)
    if args.plot is not None:
        _plot(info, args.plot)
        info.notes.append(f"label-frequency plot written to {args.plot}")
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        _print(info)
    return 0
