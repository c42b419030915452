"""Readers of the XMC file formats: parsed CSR arrays against hand-built ones, shipped data against SOURCE.md, and
one clear error (file + 1-based line) per kind of bad input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from datamodules.formats import (
    DataFormatError,
    count_lines,
    iter_json_lines,
    iter_lines,
    lf_targets,
    read_filter_pairs,
    read_xc_single,
    read_xc_split,
)
from xmc_dst.paths import shipped_dir

SINGLE = "4 6 5\n0,3 0:1 2:0.5\n 1:2 5:0.25\n4\n1,2,0 3:1.5\n"
# Expected CSR of SINGLE, written out by hand.
FEATURE_INDPTR = [0, 2, 4, 4, 5]
FEATURE_INDICES = [0, 2, 1, 5, 3]
FEATURE_VALUES = [1.0, 0.5, 2.0, 0.25, 1.5]
LABEL_INDPTR = [0, 2, 2, 3, 6]
LABEL_INDICES = [0, 3, 4, 1, 2, 0]


def write(path: Path, text: str | bytes) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def assert_csr(data, feature_indptr, feature_indices, feature_values, label_indptr, label_indices) -> None:
    np.testing.assert_array_equal(data.feature_indptr, feature_indptr)
    np.testing.assert_array_equal(data.feature_indices, feature_indices)
    np.testing.assert_allclose(data.feature_values, feature_values)
    np.testing.assert_array_equal(data.label_indptr, label_indptr)
    np.testing.assert_array_equal(data.label_indices, label_indices)


@pytest.mark.parametrize("name", ["train.txt", "train.txt.gz"])
def test_single_file_format_parses_to_hand_built_csr(tmp_path: Path, name: str) -> None:
    data = read_xc_single(write(tmp_path / name, SINGLE))
    assert (data.num_docs, data.num_features, data.num_labels) == (4, 6, 5)
    assert_csr(data, FEATURE_INDPTR, FEATURE_INDICES, FEATURE_VALUES, LABEL_INDPTR, LABEL_INDICES)
    assert data.feature_indptr.dtype == np.int64 and data.feature_values.dtype == np.float32


def test_split_format_parses_to_hand_built_csr(tmp_path: Path) -> None:
    features = write(tmp_path / "trn_X_Xf.txt", "4 6\n0:1 2:0.5\n1:2 5:0.25\n\n3:1.5\n")
    labels = write(tmp_path / "trn_X_Y.txt.gz", "4 5\n0:1 3:1\n\n4:1\n1:1 2:0.5 0:1\n")
    data = read_xc_split(features, labels)
    assert_csr(data, FEATURE_INDPTR, FEATURE_INDICES, FEATURE_VALUES, LABEL_INDPTR, LABEL_INDICES)
    np.testing.assert_allclose(data.label_values, [1, 1, 1, 1, 0.5, 1])


def test_split_format_point_counts_must_agree(tmp_path: Path) -> None:
    features = write(tmp_path / "a_X_Xf.txt", "2 3\n0:1\n1:1\n")
    labels = write(tmp_path / "a_X_Y.txt", "1 3\n0:1\n")
    with pytest.raises(DataFormatError, match=r"a_X_Y\.txt:1: expected as many points"):
        read_xc_split(features, labels)


BAD_SINGLE = [
    ("2 3 2\n0 0:1\n1 1:x\n", 3, "feature:value"),  # malformed value
    ("2 3 2\n0 0:1\n1 1\n", 3, "feature:value"),  # pair without colon
    ("2 3 2\n0 0:1\na,1 1:1\n", 3, "label ids"),  # malformed label id
    ("2 3 2\n0 0:1\n1 7:1\n", 3, r"feature ids in \[0, 3\)"),  # feature id beyond the header's F
    ("2 3 2\n0 0:1\n2 1:1\n", 3, r"label ids in \[0, 2\)"),  # label id beyond the header's L
    ("3 3 2\n0 0:1\n1 1:1\n", 1, "3 data lines"),  # header says more points than the body has
    ("1 3 2\n0 0:1\n1 1:1\n", 1, "1 data lines"),  # ... or fewer
    ("2 3\n0 0:1\n1 1:1\n", 1, "header line"),  # header with a missing field
    ("", 1, "header line"),  # empty file
    (b"2 3 2\n0 0:1\n1 1:1 \xff\n", 3, "UTF-8"),  # invalid UTF-8
]


@pytest.mark.parametrize(("content", "line", "expected"), BAD_SINGLE)
def test_bad_single_file_input_names_file_and_line(tmp_path: Path, content, line: int, expected: str) -> None:
    path = write(tmp_path / "bad.txt", content)
    with pytest.raises(DataFormatError, match=expected) as info:
        read_xc_single(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == path and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: expected ")


def test_bad_split_file_header_disagrees_with_body(tmp_path: Path) -> None:
    features = write(tmp_path / "x_X_Xf.txt", "2 3\n0:1\n")
    labels = write(tmp_path / "x_X_Y.txt", "2 3\n0:1\n1:1\n")
    with pytest.raises(DataFormatError, match=r"x_X_Xf\.txt:1: expected 2 data lines"):
        read_xc_split(features, labels)


def test_lines_split_only_on_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "t.txt", "one\u2028still one\r\ntwo\x85two\nthree")
    assert list(iter_lines(path)) == [(1, "one\u2028still one"), (2, "two\x85two"), (3, "three")]
    assert count_lines(path) == 3
    assert count_lines(write(tmp_path / "u.txt", "a\n\nb\n")) == 3
    assert count_lines(write(tmp_path / "e.txt", "")) == 0


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "texts.txt.gz", b"fine\nalso fine\nbad \xc3\x28 byte\n")
    with pytest.raises(DataFormatError, match=r"texts\.txt\.gz:3: expected UTF-8 text"):
        list(iter_lines(path))


def test_filter_pairs(tmp_path: Path) -> None:
    pairs = read_filter_pairs(write(tmp_path / "filter_labels_test.txt", "0 5\n3 1\n\n3 2\n"))
    np.testing.assert_array_equal(pairs, [[0, 5], [3, 1], [3, 2]])
    assert pairs.dtype == np.int64
    assert read_filter_pairs(write(tmp_path / "empty.txt", "")).shape == (0, 2)
    with pytest.raises(DataFormatError, match=r"f\.txt:2: expected 'doc_index label_index'"):
        read_filter_pairs(write(tmp_path / "f.txt", "0 5\n3\n"))
    with pytest.raises(DataFormatError, match=r"g\.txt:1: expected doc_index < 4 and label_index < 5"):
        read_filter_pairs(write(tmp_path / "g.txt", "0 5\n"), num_docs=4, num_labels=5)


def test_json_lines_errors(tmp_path: Path) -> None:
    good = {"uid": "u", "title": "t", "content": "", "target_ind": [1, 2], "target_rel": [1.0, 1.0]}
    path = write(tmp_path / "trn.json.gz", json.dumps(good) + "\n" + "{not json\n")
    records = iter_json_lines(path, ("title", "target_ind"))
    number, record = next(records)
    assert (number, lf_targets(path, number, record, 3)) == (1, [1, 2])
    with pytest.raises(DataFormatError, match=r"trn\.json\.gz:2: expected one JSON object per line"):
        next(records)
    with pytest.raises(DataFormatError, match=r":1: expected 'target_ind' as a list of label ids in \[0, 2\)"):
        lf_targets(path, 1, good, 2)
    missing = write(tmp_path / "tst.json", json.dumps({"title": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"tst\.json:1: expected a JSON object with keys"):
        list(iter_json_lines(missing, ("title", "target_ind")))
    with pytest.raises(DataFormatError, match=r"lbl\.json:1: .*an empty file"):
        list(iter_json_lines(write(tmp_path / "lbl.json", ""), ("title",)))


def _source_numbers(name: str) -> dict[str, float]:
    """Statistics stated in a shipped dataset's SOURCE.md."""
    text = (shipped_dir(name) / "SOURCE.md").read_text(encoding="utf-8")
    number = r"([\d,]+)"
    docs = re.search(rf"train {number} points, test {number}, {number} features, {number} labels", text)
    occurrences = re.search(rf"{number} train \(([\d.]+) labels/point\), {number} test \(([\d.]+)\)", text)
    as_int = [int(g.replace(",", "")) for g in docs.groups()]
    return {
        "train": as_int[0],
        "test": as_int[1],
        "features": as_int[2],
        "labels": as_int[3],
        "train_occurrences": int(occurrences.group(1).replace(",", "")),
        "train_avg": float(occurrences.group(2)),
        "test_occurrences": int(occurrences.group(3).replace(",", "")),
        "test_avg": float(occurrences.group(4)),
    }


@pytest.mark.parametrize("name", ["bibtex", "delicious"])
def test_shipped_bow_statistics_match_source_md(name: str) -> None:
    expected = _source_numbers(name)
    directory = shipped_dir(name)
    for split in ("train", "test"):
        data = read_xc_single(directory / f"{split}.txt.gz")
        assert data.num_docs == expected[split]
        assert (data.num_features, data.num_labels) == (expected["features"], expected["labels"])
        assert len(data.label_indices) == expected[f"{split}_occurrences"]
        assert round(len(data.label_indices) / data.num_docs, 2) == expected[f"{split}_avg"]
        assert data.label_indices.max() < data.num_labels and data.feature_indices.max() < data.num_features
    for kind, count in (("label", expected["labels"]), ("feature", expected["features"])):
        assert count_lines(directory / f"{kind}_names.txt.gz") == count


def test_shipped_delicious_keeps_points_without_labels() -> None:
    data = read_xc_single(shipped_dir("delicious") / "train.txt.gz")
    assert int((np.diff(data.label_indptr) == 0).sum()) == 10  # SOURCE.md: 10 train points have no label
