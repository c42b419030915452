"""Streaming readers for the XMC file formats, with errors that name the file and the 1-based line.

Formats:
- raw-text layout (AttentionXML / LightXML): one document per line, labels as space-separated strings;
- Extreme Classification Repository sparse format, single-file (header ``N F L``, lines ``l1,l2 f:v f:v``) and
  split form (``*_X_Xf.txt`` with header ``N F`` and ``f:v`` lines, ``*_X_Y.txt`` with header ``N L``, ``l:v``);
- LF JSON lines (``trn.json.gz`` ...) and the ``filter_labels_*.txt`` reciprocal-pair files.

Every reader reads line by line from bytes, so a ``.gz`` file is read transparently, invalid UTF-8 is reported with
its line number, and only ``\\n`` ends a line (``str.splitlines`` would also split on U+2028 and friends, which
occur inside real documents and would shift the text/label alignment).

Encoding policy, the same for every reader (raw text, sparse, LF, prediction and name files): UTF-8; a byte-order
mark (U+FEFF) at the start of a file is dropped, never part of the first document, label or header; a label list
splits at runs of Unicode whitespace (``str.split()``: space, tab, no-break space, U+3000, ...) and a name file's
line (``label_names.txt``) is stripped of it, so no label name has surrounding whitespace; document texts keep
their content (the tokenizer normalises it).
"""

from __future__ import annotations

import gzip
import json
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

PathLike = str | Path


class DataFormatError(ValueError):
    """A data file does not have the expected format; ``path`` and ``line`` (1-based) say where."""

    def __init__(self, path: PathLike, line: int | None, expected: str, got: str | None = None) -> None:
        self.path, self.line, self.expected, self.got = Path(path), line, expected, got
        where = f"{path}:{line}" if line is not None else f"{path}"
        message = f"{where}: expected {expected}"
        if got is not None:
            message += f", got {got[:80]!r}" + ("..." if len(got) > 80 else "")
        super().__init__(message)


def resolve(path: PathLike) -> Path | None:
    """Return ``path`` if it exists, else ``path.gz`` if that exists, else None."""
    path = Path(path)
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def open_binary(path: PathLike) -> IO[bytes]:
    """Open a file for binary reading, decompressing ``.gz`` files."""
    path = Path(path)
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


BOM = "\ufeff"


def iter_lines(path: PathLike, start: int = 1) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line, without its line ending and without the file's byte-order
    mark; invalid UTF-8 raises."""
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=start):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(path, number, "UTF-8 text", f"invalid byte at column {err.start + 1}") from None
            if number == start:
                text = text.removeprefix(BOM)
            yield number, text.rstrip("\r\n") if text.endswith("\n") else text


def count_lines(path: PathLike) -> int:
    """Number of lines (a last line without a newline counts), read in 1 MiB chunks."""
    count, last = 0, b"\n"
    with open_binary(path) as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def require_nonempty(path: PathLike, what: str) -> None:
    """Raise DataFormatError if ``path`` holds no line at all (a byte-order mark alone is no line)."""
    with open_binary(path) as handle:
        if not handle.read(4).removeprefix(BOM.encode("utf-8")):
            raise DataFormatError(path, 1, what, "an empty file")


def split_labels(line: str) -> list[str]:
    """The label names of a label-list line: split at runs of Unicode whitespace (the one rule of every reader)."""
    return line.split()


def iter_label_lines(path: PathLike) -> Iterator[tuple[int, list[str]]]:
    """Raw-text layout labels: ``(line_number, [label, ...])`` per document; an empty line means no label."""
    for number, line in iter_lines(path):
        yield number, split_labels(line)


# ----------------------------------------------------------------------------------------------- sparse (XC) format


@dataclass
class SparseXC:
    """A split in CSR form: features (``feature_*``) and positive labels (``label_*``), one row per document."""

    feature_indptr: np.ndarray  # int64 [N+1]
    feature_indices: np.ndarray  # int64 [nnz_f]
    feature_values: np.ndarray  # float32 [nnz_f]
    label_indptr: np.ndarray  # int64 [N+1]
    label_indices: np.ndarray  # int64 [nnz_l]
    label_values: np.ndarray  # float32 [nnz_l] (1 in the single-file form, the ``v`` of ``l:v`` in the split form)
    num_features: int
    num_labels: int

    @property
    def num_docs(self) -> int:
        return len(self.feature_indptr) - 1


def _header(path: PathLike, fields: tuple[str, ...]) -> tuple[Iterator[tuple[int, str]], list[int]]:
    """Read the header line of an XC file; return the remaining line iterator and the header integers."""
    lines = iter_lines(path)
    expected = f"a header line '{' '.join(fields)}' ({len(fields)} integers)"
    try:
        number, line = next(lines)
    except StopIteration:
        raise DataFormatError(path, 1, expected, "an empty file") from None
    parts = line.split()
    if len(parts) != len(fields) or not all(p.isdecimal() for p in parts):
        raise DataFormatError(path, number, expected, line)
    return lines, [int(p) for p in parts]


def _parse_pairs(
    path: PathLike, number: int, text: str, bound: int, what: str, ids: array, values: array
) -> None:
    """Append the ``id:value`` pairs of ``text`` to ``ids``/``values``, checking ``0 <= id < bound``."""
    tokens = text.split()
    try:
        pairs = [token.split(":") for token in tokens]
        new_ids = [int(p[0]) for p in pairs]
        new_values = [float(p[1]) for p in pairs]
        well_formed = all(len(p) == 2 for p in pairs) and all(map(math.isfinite, new_values))
    except (ValueError, IndexError):
        well_formed = False
    if not well_formed:
        bad = next(t for t in tokens if not _is_pair(t))
        raise DataFormatError(path, number, f"'{what}:value' pairs (integer {what}, finite number value)", bad)
    if new_ids and (min(new_ids) < 0 or max(new_ids) >= bound):
        bad_id = next(i for i in new_ids if not 0 <= i < bound)
        raise DataFormatError(path, number, f"{what} ids in [0, {bound}) as the header says", str(bad_id))
    ids.extend(new_ids)
    values.extend(new_values)


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _is_pair(token: str) -> bool:
    parts = token.split(":")
    if len(parts) != 2:
        return False
    try:
        int(parts[0])
        return math.isfinite(float(parts[1]))
    except ValueError:
        return False


def _parse_label_list(path: PathLike, number: int, text: str, bound: int, ids: array) -> None:
    """Append comma-separated label ids (``l1,l2,...``) to ``ids``."""
    try:
        new_ids = [int(t) for t in text.split(",")]
    except ValueError:
        bad = next(t for t in text.split(",") if not _is_int(t))
        raise DataFormatError(path, number, "comma-separated integer label ids 'l1,l2,...'", bad) from None
    if min(new_ids) < 0 or max(new_ids) >= bound:
        bad_id = next(i for i in new_ids if not 0 <= i < bound)
        raise DataFormatError(path, number, f"label ids in [0, {bound}) as the header says", str(bad_id))
    ids.extend(new_ids)


def _check_count(path: PathLike, declared: int, found: int) -> None:
    """The header (line 1) must agree with the number of data lines that follow it."""
    if found != declared:
        raise DataFormatError(path, 1, f"{declared} data lines after the header, as it declares", f"{found} lines")


def _csr(indptr: array, indices: array, values: array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.frombuffer(indptr, dtype=np.int64).copy(),
        np.frombuffer(indices, dtype=np.int64).copy(),
        np.frombuffer(values, dtype=np.float32).copy(),
    )


def read_xc_single(path: PathLike) -> SparseXC:
    """Read the single-file XC format: header ``N F L``, then ``l1,l2,... f:v f:v`` per point.

    A point without labels starts with a space; a point without features has no space after its labels.
    """
    lines, (num_docs, num_features, num_labels) = _header(path, ("num_points", "num_features", "num_labels"))
    f_ptr, f_idx, f_val = array("q", [0]), array("q"), array("f")
    l_ptr, l_idx = array("q", [0]), array("q")
    for number, line in lines:
        labels, _, features = line.partition(" ")
        if labels:
            _parse_label_list(path, number, labels, num_labels, l_idx)
        _parse_pairs(path, number, features, num_features, "feature", f_idx, f_val)
        f_ptr.append(len(f_idx))
        l_ptr.append(len(l_idx))
    _check_count(path, num_docs, len(f_ptr) - 1)
    feature_indptr, feature_indices, feature_values = _csr(f_ptr, f_idx, f_val)
    label_indptr, label_indices, _ = _csr(l_ptr, l_idx, array("f"))
    return SparseXC(
        feature_indptr,
        feature_indices,
        feature_values,
        label_indptr,
        label_indices,
        np.ones(len(label_indices), dtype=np.float32),
        num_features,
        num_labels,
    )


def read_xc_matrix(path: PathLike, columns: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Read one sparse matrix of the split XC form: header ``N C``, then ``c:v c:v`` per row.

    ``columns`` names the column kind ("feature" or "label") for error messages. Returns CSR arrays and ``C``.
    """
    lines, (num_rows, num_cols) = _header(path, ("num_points", f"num_{columns}s"))
    ptr, idx, val = array("q", [0]), array("q"), array("f")
    for number, line in lines:
        _parse_pairs(path, number, line, num_cols, columns, idx, val)
        ptr.append(len(idx))
    _check_count(path, num_rows, len(ptr) - 1)
    return (*_csr(ptr, idx, val), num_cols)


def read_xc_split(features_path: PathLike, labels_path: PathLike) -> SparseXC:
    """Read the split XC form: ``*_X_Xf.txt`` (features) and ``*_X_Y.txt`` (labels) of the same points."""
    f_ptr, f_idx, f_val, num_features = read_xc_matrix(features_path, "feature")
    l_ptr, l_idx, l_val, num_labels = read_xc_matrix(labels_path, "label")
    if len(f_ptr) != len(l_ptr):
        raise DataFormatError(
            labels_path, 1, f"as many points as {features_path} ({len(f_ptr) - 1})", f"{len(l_ptr) - 1} points"
        )
    return SparseXC(f_ptr, f_idx, f_val, l_ptr, l_idx, l_val, num_features, num_labels)


# ------------------------------------------------------------------------------------------------------- LF format


def iter_json_lines(path: PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each JSON object line, checking the ``required`` keys."""
    seen = False
    for number, line in iter_lines(path):
        seen = True
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, number, "one JSON object per line", f"{err.msg}: {line}") from None
        if not isinstance(record, dict) or any(key not in record for key in required):
            raise DataFormatError(path, number, f"a JSON object with keys {list(required)}", line)
        yield number, record
    if not seen:
        raise DataFormatError(path, 1, f"JSON lines with keys {list(required)}", "an empty file")


def lf_targets(path: PathLike, number: int, record: dict, num_labels: int) -> list[int]:
    """The ``target_ind`` of an LF record, checked to be integer ids in ``[0, num_labels)``."""
    targets = record["target_ind"]
    if not isinstance(targets, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < num_labels
                                                for t in targets):
        raise DataFormatError(path, number, f"'target_ind' as a list of label ids in [0, {num_labels})", str(targets))
    return targets


def read_filter_pairs(path: PathLike, num_docs: int | None = None, num_labels: int | None = None) -> np.ndarray:
    """Read ``doc_index label_index`` lines (reciprocal pairs to drop before scoring) as an int64 [n, 2] array.

    Blank lines are skipped; an empty file means no pair. Indices are checked against the bounds when given.
    """
    pairs = array("q")
    for number, line in iter_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(p.isdecimal() for p in parts):
            raise DataFormatError(path, number, "'doc_index label_index' (two non-negative integers)", line)
        doc, label = int(parts[0]), int(parts[1])
        if (num_docs is not None and doc >= num_docs) or (num_labels is not None and label >= num_labels):
            raise DataFormatError(path, number, f"doc_index < {num_docs} and label_index < {num_labels}", line)
        pairs.extend((doc, label))
    return np.frombuffer(pairs, dtype=np.int64).reshape(-1, 2).copy()
