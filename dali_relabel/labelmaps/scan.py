"""The full scan of a label-map file: every row read, a chunk of rows at a time.

Opening a file (`read_header`) runs the cheap checks only; the scan also looks at the data:
NaN/inf in /values, /indices outside [0, C), /labels outside [-1, C). `dali-relabel info
--full` runs it on a file, `LabelMapStore.validate(full=True)` on an open store.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from tqdm import tqdm

from dali_relabel.labelmaps.format import (
    REPORTED_ROWS,
    LabelMapError,
    LabelMapHeader,
    opened,
    read_header_of,
)

__all__ = ["scan_file"]

# Rows are read in chunks of about this many bytes of /values.
SCAN_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass
class _Tally:
    """Count and first rows of one kind of problem found by a full scan."""

    what: str
    count: int = 0
    rows: list[int] = dataclasses.field(default_factory=list)

    def add(self, bad: torch.Tensor, start: int) -> None:
        """Adds a chunk's mask `bad` (Tensor[n, M] bool) whose first row is `start`."""
        self.count += int(bad.sum())
        if len(self.rows) < REPORTED_ROWS:
            rows = bad.any(dim=1).nonzero().flatten()[: REPORTED_ROWS - len(self.rows)]
            self.rows.extend((rows + start).tolist())

    def __str__(self) -> str:
        return f"{self.what}: {self.count} entries, first rows {self.rows}"


def scan_file(path: str | os.PathLike, *, progress: bool = True) -> LabelMapHeader:
    """Validates a label-map file and scans every row, reading a chunk of rows at a time
    (never the whole file into memory).

    The scan looks for NaN/inf in /values, /indices outside [0, C) and /labels outside
    [-1, C); /sizes is checked whole by the metadata checks that come first.

    Args:
        path: The file.
        progress: Show a progress bar (only on a terminal).

    Returns:
        The file's header.

    Raises:
        LabelMapError: The file is invalid or damaged; the scan's problems are listed with
            their counts and first offending rows.
    """
    path = os.fspath(path)
    with opened(path) as f:
        header = read_header_of(f, path)
        scan_rows(path, header.num_classes, header.num_rows, f["values"], f["indices"],
                  f["labels"], progress=progress)
    return header


def scan_rows(path: str, num_classes: int, num_rows: int, values: Any, indices: Any,
              labels: Any, *, progress: bool) -> None:
    """The full scan over rows of tensors or h5py datasets, a chunk of rows at a time.

    Raises:
        LabelMapError: Listing each problem with its count and first offending rows.
    """
    tallies = (_Tally("/values: NaN/inf"),
               _Tally(f"/indices: class outside [0, {num_classes})"),
               _Tally(f"/labels: label outside [-1, {num_classes})"))
    row_bytes = math.prod(values.shape[1:]) * values.dtype.itemsize
    step = max(1, SCAN_CHUNK_BYTES // row_bytes)
    with tqdm(total=num_rows, unit="row", desc=f"scanning {os.path.basename(path)}",
              disable=None if progress else True) as bar:
        for start in range(0, num_rows, step):
            chunk = slice(start, min(num_rows, start + step))
            value, index, label = (torch.as_tensor(data[chunk])
                                   for data in (values, indices, labels))
            n = len(value)
            index, label = index.reshape(n, -1), label.reshape(n, 1)
            tallies[0].add(~torch.isfinite(value.reshape(n, -1)), start)
            tallies[1].add((index < 0) | (index >= num_classes), start)
            tallies[2].add((label < -1) | (label >= num_classes), start)
            bar.update(n)
    problems = [str(tally) for tally in tallies if tally.count]
    if problems:
        raise LabelMapError(f"{path}: full scan found problems: {'; '.join(problems)}")
