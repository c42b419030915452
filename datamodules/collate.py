"""Batch construction: padded token ids or CSR features, and labels as CSR positives (never a dense label matrix).

Text batches are gathered from the memory-mapped Arrow table a whole batch at a time (``__getitems__``) and turned
into tensors with vectorised numpy, so no per-document Python lists are built.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from .formats import SparseXC


def _ragged(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Flattened values and per-row lengths of a list column."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, lengths


def _offsets(lengths: np.ndarray) -> torch.Tensor:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return torch.from_numpy(offsets)


class ArrowRows(Dataset):
    """A torch Dataset over a Hugging Face ``datasets.Dataset`` whose batches are Arrow tables.

    It keeps the ``datasets.Dataset`` (memory-mapped, pickled by file reference for DataLoader workers).
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> pa.Table:
        return self.dataset[[int(index)]]

    def __getitems__(self, indices: list[int]) -> pa.Table:
        return self.dataset[[int(i) for i in indices]]


class TextCollate:
    """Turn Arrow rows (``input_ids``, ``label_ids``, ``doc_index``) into the text batch dict.

    ``input_ids``/``attention_mask`` are padded to the longest document in the batch, capped at ``max_length``.
    With ``lexical``, the rows' ``lexical_ids``/``lexical_values`` become ``lexical_ids``, ``lexical_values`` and
    ``lexical_offsets`` (CSR).
    """

    def __init__(self, pad_token_id: int, max_length: int, lexical: bool = False) -> None:
        self.pad_token_id, self.max_length, self.lexical = pad_token_id, max_length, lexical

    def __call__(self, rows: pa.Table | list[pa.Table]) -> dict[str, torch.Tensor]:
        table = pa.concat_tables(rows) if isinstance(rows, list) else rows
        tokens, lengths = _ragged(table.column("input_ids"))
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        position = np.arange(len(tokens), dtype=np.int64) - starts
        keep = position < self.max_length
        row = np.repeat(np.arange(len(lengths)), lengths)
        width = int(min(lengths.max(initial=0), self.max_length))
        input_ids = torch.full((len(lengths), max(width, 1)), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        index = (torch.from_numpy(row[keep]), torch.from_numpy(position[keep]))
        input_ids[index] = torch.from_numpy(tokens[keep])
        attention_mask[index] = 1
        labels, label_lengths = _ragged(table.column("label_ids"))
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "label_ids": torch.from_numpy(labels),
            "label_offsets": _offsets(label_lengths),
            "doc_index": torch.from_numpy(table.column("doc_index").to_numpy().astype(np.int64)),
        }
        if self.lexical:
            ids, lengths = _ragged(table.column("lexical_ids"))
            values = pc.list_flatten(table.column("lexical_values")).to_numpy(zero_copy_only=False)
            batch.update(lexical_ids=torch.from_numpy(ids), lexical_offsets=_offsets(lengths),
                         lexical_values=torch.from_numpy(values.astype(np.float32)))
        return batch


def gather_csr(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``rows`` of a CSR matrix as (indices, values, offsets)."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    position = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return indices[position], values[position], offsets


class SparseRows(Dataset):
    """A torch Dataset of row numbers into a :class:`SparseXC` split; :class:`BowCollate` gathers the rows."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int:
        return int(self.rows[index])

    def __getitems__(self, indices: list[int]) -> np.ndarray:
        return self.rows[np.asarray(indices, dtype=np.int64)]


class BowCollate:
    """Turn row numbers of a :class:`SparseXC` split into the bag-of-words batch dict (all CSR)."""

    def __init__(self, data: SparseXC) -> None:
        self.data = data

    def __call__(self, rows: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        d = self.data
        f_idx, f_val, f_off = gather_csr(d.feature_indptr, d.feature_indices, d.feature_values, rows)
        l_idx, _, l_off = gather_csr(d.label_indptr, d.label_indices, d.label_values, rows)
        return {
            "feature_ids": torch.from_numpy(f_idx),
            "feature_values": torch.from_numpy(f_val),
            "feature_offsets": torch.from_numpy(f_off),
            "label_ids": torch.from_numpy(l_idx),
            "label_offsets": torch.from_numpy(l_off),
            "doc_index": torch.from_numpy(rows.copy()),
        }
