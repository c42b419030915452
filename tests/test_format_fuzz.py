"""Fuzzing every reader of the data formats: random bytes and valid files with random damage either parse or raise
the project's ``DataFormatError`` (naming the file and, where there is one, the line); never another exception.

Bounded: a fixed seed and a fixed number of inputs per reader (about a second in all). A failing input is printed,
so that it can become a case of its own.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from datamodules.bow import read_names
from datamodules.formats import (
    DataFormatError,
    count_lines,
    iter_json_lines,
    iter_label_lines,
    lf_targets,
    read_filter_pairs,
    read_xc_matrix,
    read_xc_single,
    read_xc_split,
    require_nonempty,
)
from datamodules.lf import lf_docs, record_text
from datamodules.raw_text import raw_text_docs
from datamodules.text import text_only_docs

CASES = 150  # inputs per reader
PIECES = [" ", "  ", "\t", ",", ":", "-", "0", "1", "9", "12", "e", ".", "1e999", "nan", "-1", "x", "\ufeff", "\u00a0",
          "\u3000", "\u2028", "\x00", "{", "}", "[", "]", '"', "\n", "\r", "\r\n", "é", "99999999999999999999"]
VALID = {
    "xc_single": "3 6 4\n0,3 0:1 2:0.5\n 1:2 5:0.25\n1,2 3:1.5\n",
    "xc_features": "2 5\n0:1 4:0.5\n2:3\n",
    "xc_labels": "2 3\n0:1\n1:1 2:1\n",
    "labels": "lang::python use::gameplaying\n\nprotocol::ip\n",
    "texts": "a python tool\n\nthe game\n",
    "json": "".join(json.dumps(r) + "\n" for r in (
        {"uid": "a", "title": "python tool", "content": "x", "target_ind": [0, 2], "target_rel": [1.0, 1.0]},
        {"uid": "b", "title": "game", "content": "", "target_ind": [1], "target_rel": [1.0]})),
    "lbl": "".join(json.dumps({"uid": str(i), "title": t}) + "\n" for i, t in enumerate(["python", "game", "tool"])),
    "pairs": "0 1\n\n2 0\n",
    "names": "alpha\nbeta\ngamma\ndelta\n",
}


def damaged(rng: random.Random, text: str) -> bytes:
    """``text`` with 1-4 random edits (insert a piece, delete or replace a byte, truncate), or random bytes."""
    if rng.random() < 0.2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    data = bytearray(text.encode("utf-8"))
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        action = rng.randrange(4)
        if action == 0:
            data[where:where] = rng.choice(PIECES).encode("utf-8")
        elif action == 1 and data:
            del data[min(where, len(data) - 1)]
        elif action == 2 and data:
            data[min(where, len(data) - 1)] = rng.randrange(256)
        else:
            del data[where:]
    return bytes(data)


def _lf(folder: Path, path: Path) -> list:
    labels = folder / "lbl.json"
    labels.write_text(VALID["lbl"], encoding="utf-8")
    names = [record_text(str(labels), n, r, False) for n, r in iter_json_lines(labels, ("title",))]
    for number, record in iter_json_lines(path, ("title", "target_ind")):
        lf_targets(path, number, record, len(names))
    return list(lf_docs(str(path), len(names), True, str(folder / "stats.json"), str(labels)))


def _raw(folder: Path, path: Path) -> list:
    texts = folder / "texts.txt"
    texts.write_text(VALID["texts"], encoding="utf-8")
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps(["lang::python", "protocol::ip"]), encoding="utf-8")
    return list(raw_text_docs(str(texts), str(path), str(vocab), str(folder / "stats.json")))


def _split(folder: Path, path: Path) -> object:
    labels = folder / "y.txt"
    labels.write_text(VALID["xc_labels"], encoding="utf-8")
    return read_xc_split(path, labels)


READERS: dict[str, tuple[str, Callable[[Path, Path], object]]] = {
    "read_xc_single": ("xc_single", lambda folder, path: read_xc_single(path)),
    "read_xc_matrix": ("xc_features", lambda folder, path: read_xc_matrix(path, "feature")),
    "read_xc_split": ("xc_features", _split),
    "iter_label_lines": ("labels", lambda folder, path: list(iter_label_lines(path))),
    "raw_text_docs": ("labels", _raw),
    "text_only_docs": ("texts", lambda folder, path: (require_nonempty(path, "text"), list(text_only_docs(str(path))),
                                                      count_lines(path))),
    "lf_docs": ("json", _lf),
    "read_filter_pairs": ("pairs", lambda folder, path: read_filter_pairs(path, 3, 3)),
    "read_names": ("names", lambda folder, path: read_names(path, 4, "label")),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_parses_or_raises_a_data_format_error(reader, tmp_path):
    sample, read = READERS[reader]
    rng = random.Random(f"{reader}-15")
    path = tmp_path / "input.txt"
    outcomes = {"parsed": 0, "DataFormatError": 0}
    for case in range(CASES):
        data = damaged(rng, VALID[sample])
        path.write_bytes(data)
        try:
            read(tmp_path, path)
        except DataFormatError as error:
            assert error.path.name in str(error) and str(error).startswith(str(error.path)), (case, data, error)
            outcomes["DataFormatError"] += 1
        except Exception as error:  # noqa: BLE001 - the point: anything else is a bug in the reader
            pytest.fail(f"{reader} raised {type(error).__name__}: {error} on input {data!r}")
        else:
            outcomes["parsed"] += 1
    assert outcomes["parsed"] and outcomes["DataFormatError"], outcomes  # both kinds of input were exercised
