"""The label-map store: one HDF5 file of top-k ReLabel label maps (format version 1).

ReLabel (Yun et al., "Re-labeling ImageNet: from Single to Multi-Labels, from Global to
Localized Labels", CVPR 2021) supervises every random crop with a target pooled from a
per-image label map produced by a machine annotator. This module writes, reads and validates
the single file that holds those maps for a whole dataset, keeping the top-k classes per cell:

    /values    float16  [N, K, H, W]   annotator logits
    /indices   int16    [N, K, H, W]   class of each value (int32 when C > 32767)
    /labels    int64    [N]            original single label, -1 if unknown
    /paths     utf-8    [N]            image path relative to the image root, '/' separated
    /classes   utf-8    [C]            class names, index order
    /sizes     int32    [N, 2]         optional: each image's (height, width) as decoded
    attrs: format="dali-relabel-labelmaps", version=1, num_classes=C, topk=K, height=H,
           width=W, value_kind="logits", plus free-form provenance attributes.

/values and /indices are contiguous by default so that readers can memory-map them: one copy
in the page cache serves every process of a node. Files written by `LabelMapWriter` also keep
a `/written` uint8 [N] mask (all ones once complete). /sizes lets a loader plan every crop
window before decoding; its attribute `adjust_orientation` (0 or 1) says whether the sizes
are those with the EXIF orientation applied. `add_sizes` adds it to an existing file.

`write_labelmaps` writes a whole file at once, `LabelMapWriter` fills one in by rows (and
resumes after an interruption), `LabelMapStore.open` validates and loads one, and
`read_header` validates the metadata without loading any data.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from tqdm import tqdm

from dali_relabel._utils import atomic_path, check_positive_int

__all__ = [
    "FORMAT",
    "VERSION",
    "PLACEMENTS",
    "DatasetLayout",
    "LabelMapError",
    "LabelMapHeader",
    "LabelMapStore",
    "LabelMapWriter",
    "add_sizes",
    "read_header",
    "write_labelmaps",
]

logger = logging.getLogger(__name__)

FORMAT = "dali-relabel-labelmaps"
VERSION = 1
VALUE_KIND = "logits"
PLACEMENTS = ("mmap", "memory", "pinned", "device")
COMPRESSIONS = (None, "gzip", "lzf")
# Root attributes defined by the format; every other root attribute is provenance.
FORMAT_ATTRS = ("format", "version", "num_classes", "topk", "height", "width", "value_kind")
_GEOMETRY_ATTRS = ("num_classes", "topk", "height", "width")
_DATASETS = ("values", "indices", "labels", "paths", "classes")
_STRING = h5py.string_dtype("utf-8")
_SIZES = "sizes"
_ORIENTATION_ATTR = "adjust_orientation"
_INT16_MAX_CLASSES = int(np.iinfo(np.int16).max)
_SCAN_CHUNK_BYTES = 64 << 20
_REPORTED_ROWS = 5


class LabelMapError(ValueError):
    """A label-map file is missing, unreadable, inconsistent or incomplete.

    The message names the file, the dataset or attribute concerned, and what was expected
    versus what was found.
    """


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """How one array dataset is stored in the file.

    Attributes:
        dtype: Element type as stored.
        shape: Dataset shape.
        nbytes: Size of the data uncompressed, in bytes.
        storage_bytes: Bytes the data occupies in the file (smaller when compressed).
        offset: Byte offset of the data in the file when stored contiguous; None when chunked
            (or, in a partial file, not yet allocated).
        compression: Compression filter name, or None.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    storage_bytes: int
    offset: int | None
    compression: str | None

    @property
    def contiguous(self) -> bool:
        """Whether the data is one contiguous byte range (and so can be memory-mapped)."""
        return self.offset is not None


@dataclasses.dataclass(frozen=True)
class LabelMapHeader:
    """The validated metadata of a label-map file; no data loaded.

    Attributes:
        path: The file.
        num_rows: N, the number of images.
        num_classes: C.
        topk: K, classes kept per cell.
        height: H of the label maps.
        width: W of the label maps.
        attrs: All root attributes as plain Python values.
        layout: Storage of "values" and "indices".
        file_size: Size of the file in bytes.
        sizes_adjust_orientation: None when the file has no /sizes; else whether its image
            sizes have the EXIF orientation applied.
    """

    path: str
    num_rows: int
    num_classes: int
    topk: int
    height: int
    width: int
    attrs: dict[str, Any]
    layout: dict[str, DatasetLayout]
    file_size: int
    sizes_adjust_orientation: bool | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        """The free-form root attributes (everything the format itself does not define)."""
        return {key: value for key, value in self.attrs.items() if key not in FORMAT_ATTRS}

    @property
    def mmappable(self) -> bool:
        """Whether /values and /indices are contiguous, as placement "mmap" requires."""
        return all(layout.contiguous for layout in self.layout.values())


class _Rows(NamedTuple):
    """Validated rows, converted to the stored dtypes."""

    values: np.ndarray
    indices: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    sizes: np.ndarray | None

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets to write, by name (/sizes only when given)."""
        return {name: array for name, array in self._asdict().items() if array is not None}


def _plain(value: Any) -> Any:
    """Converts an HDF5 attribute value to a plain Python value."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _index_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= _INT16_MAX_CLASSES else np.int32


def _check_sizes(sizes: Any, num_rows: int) -> np.ndarray:
    """Image sizes as int32 [n, 2] (height, width), each >= 1."""
    sizes = _as_numpy(sizes)
    if sizes.shape != (num_rows, 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"sizes: expected an integer array [{num_rows}, 2] of image (height, "
                         f"width), found {sizes.dtype} {sizes.shape}")
    if sizes.size and (sizes.min() < 1 or sizes.max() > np.iinfo(np.int32).max):
        raise ValueError(f"sizes: expected image heights and widths >= 1, found "
                         f"[{sizes.min()}, {sizes.max()}]")
    return sizes.astype(np.int32)


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if not classes or not all(isinstance(name, str) and name for name in classes):
        raise ValueError("classes: expected a non-empty sequence of non-empty class names")
    if len(set(classes)) != len(classes):
        raise ValueError("classes: class names must be unique")
    return classes


def _check_compression(compression: str | None) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression: expected one of {COMPRESSIONS}, found {compression!r}")


def _check_attrs(attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if key in FORMAT_ATTRS:
            raise ValueError(f"attribute {key!r} is set by the format and cannot be passed")
        if not isinstance(value, (str, int, float)):
            raise ValueError(
                f"attribute {key!r}: expected str, int or float, found {type(value).__name__}"
            )


def _check_rows(
    values: Any,
    indices: Any,
    labels: Any,
    paths: Sequence[str],
    *,
    num_classes: int,
    map_shape: tuple[int, int, int] | None = None,
    sizes: Any = None,
) -> _Rows:
    """Validates a block of rows and converts it to the stored dtypes.

    Args:
        values (Tensor[n, K, H, W] | ndarray): Logits, any float dtype.
        indices (Tensor[n, K, H, W] | ndarray): Class indices in [0, num_classes).
        labels (Tensor[n] | ndarray): Original labels in [-1, num_classes).
        paths: n relative image paths.
        num_classes: C.
        map_shape: Required (K, H, W), or None to accept the shape of `values`.
        sizes (Tensor[n, 2] | ndarray | None): Image (height, width) of each row.

    Returns:
        The rows as float16 values, int16/int32 indices, int64 labels, an object array of
        paths and int32 sizes (or None).

    Raises:
        ValueError: Naming the offending argument.
    """
    values, indices, labels = _as_numpy(values), _as_numpy(indices), _as_numpy(labels)
    if values.ndim != 4 or not np.issubdtype(values.dtype, np.floating):
        raise ValueError(
            f"values: expected a float array [N, K, H, W], found {values.dtype} {values.shape}"
        )
    n = values.shape[0]
    if map_shape is not None and values.shape[1:] != map_shape:
        raise ValueError(
            f"values: expected [N, K, H, W] with (K, H, W) = {map_shape}, found {values.shape}"
        )
    if indices.shape != values.shape or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices: expected an integer array of shape {values.shape} like values, "
            f"found {indices.dtype} {indices.shape}"
        )
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected an integer array of shape ({n},), found {labels.dtype} "
            f"{labels.shape}"
        )
    paths = np.array(list(paths), dtype=object)
    if paths.shape != (n,):
        raise ValueError(f"paths: expected {n} paths (one per row of values), found {len(paths)}")
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not path or path.startswith("/"):
            raise ValueError(f"paths[{i}]: expected a non-empty relative path, found {path!r}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(
            f"indices: expected class indices in [0, {num_classes}), found "
            f"[{indices.min()}, {indices.max()}]"
        )
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(
            f"labels: expected labels in [-1, {num_classes}), found "
            f"[{labels.min()}, {labels.max()}]"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        values16 = values.astype(np.float16)
    bad = values16.size - int(np.count_nonzero(np.isfinite(values16)))
    if bad:
        raise ValueError(f"values: {bad} entries are NaN/inf or overflow float16 (|x| > 65504)")
    indices = indices.astype(_index_dtype(num_classes))
    sizes = None if sizes is None else _check_sizes(sizes, n)
    return _Rows(values16, indices, labels.astype(np.int64), paths, sizes)


def _create_datasets(
    f: h5py.File,
    *,
    num_rows: int,
    topk: int,
    height: int,
    width: int,
    classes: list[str],
    compression: str | None,
    attrs: dict[str, Any],
    with_sizes: bool = False,
    adjust_orientation: bool = False,
) -> None:
    """Creates every dataset of the format at full size, and the root attributes."""
    shape = (num_rows, topk, height, width)
    layout = {} if compression is None else {
        "chunks": (1, topk, height, width), "compression": compression, "shuffle": True
    }
    f.create_dataset("values", shape=shape, dtype=np.float16, **layout)
    f.create_dataset("indices", shape=shape, dtype=_index_dtype(len(classes)), **layout)
    f.create_dataset("labels", shape=(num_rows,), dtype=np.int64)
    f.create_dataset("paths", shape=(num_rows,), dtype=_STRING)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=_STRING)
    if with_sizes:
        f.create_dataset(_SIZES, shape=(num_rows, 2), dtype=np.int32)
        f[_SIZES].attrs[_ORIENTATION_ATTR] = int(adjust_orientation)
    f.attrs.update({
        "format": FORMAT,
        "version": VERSION,
        "num_classes": len(classes),
        "topk": topk,
        "height": height,
        "width": width,
        "value_kind": VALUE_KIND,
        **attrs,
    })


def write_labelmaps(
    path: str | os.PathLike,
    values: Any,
    indices: Any,
    labels: Any,
    paths: Sequence[str],
    classes: Sequence[str],
    *,
    compression: str | None = None,
    sizes: Any = None,
    adjust_orientation: bool = False,
    **attrs: str | int | float,
) -> None:
    """Writes a complete label-map file in one go.

    The file is written under a temporary name in the same directory and then renamed onto
    `path`, so a reader never sees a half-written file.

    Args:
        path: Destination file (replaced if it exists).
        values (Tensor[N, K, H, W] | ndarray): Annotator logits, any float dtype; stored
            float16.
        indices (Tensor[N, K, H, W] | ndarray): Class of each value, in [0, C); stored int16
            (int32 when C > 32767).
        labels (Tensor[N] | ndarray): Original single labels in [-1, C), -1 if unknown.
        paths: N image paths relative to the image root, '/' separated.
        classes: C class names in index order.
        compression: None (contiguous, memory-mappable), "gzip" or "lzf" (chunked by row,
            for archiving).
        sizes (Tensor[N, 2] | ndarray | None): Each image's (height, width) as decoded;
            stored as /sizes so that loaders can plan crops without reading image headers.
        adjust_orientation: Whether `sizes` have the EXIF orientation applied (as a loader
            with adjust_orientation=True decodes them).
        **attrs: Provenance root attributes (str, int or float), e.g. annotator="...".

    Raises:
        ValueError: An argument is inconsistent; the message names it.
    """
    classes = _check_classes(classes)
    _check_compression(compression)
    _check_attrs(attrs)
    rows = _check_rows(values, indices, labels, paths, num_classes=len(classes), sizes=sizes)
    num_rows, topk, height, width = rows.values.shape
    if num_rows == 0:
        raise ValueError("values: expected at least one row")
    path = os.fspath(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _create_datasets(
            f, num_rows=num_rows, topk=topk, height=height, width=width, classes=classes,
            compression=compression, attrs=attrs, with_sizes=sizes is not None,
            adjust_orientation=adjust_orientation,
        )
        for name, data in rows.arrays().items():
            f[name][...] = data
    logger.info("wrote %s: %d label maps [%d, %d, %d]", path, num_rows, topk, height, width)


def add_sizes(path: str | os.PathLike, sizes: Any, *, adjust_orientation: bool = False) -> None:
    """Adds (or replaces) the /sizes dataset of an existing label-map file, safely.

    The file is copied beside itself, the copy gets /sizes and is renamed onto `path`: an
    interruption leaves the file as it was (the copy needs the file's size in free disk
    space for a moment). Processes that have the old file memory-mapped keep reading it.

    Args:
        path: A complete label-map file.
        sizes (Tensor[N, 2] | ndarray): Each row's image (height, width) as decoded.
        adjust_orientation: Whether the sizes have the EXIF orientation applied.

    Raises:
        LabelMapError: The file is invalid.
        ValueError: `sizes` is not [N, 2] of positive integers.
    """
    path = os.fspath(path)
    header = read_header(path)
    sizes = _check_sizes(sizes, header.num_rows)
    with atomic_path(path) as tmp:
        shutil.copy2(path, tmp)
        with h5py.File(tmp, "r+") as f:
            if _SIZES in f:
                del f[_SIZES]
            f.create_dataset(_SIZES, data=sizes)
            f[_SIZES].attrs[_ORIENTATION_ATTR] = int(adjust_orientation)
        read_header(tmp)
    logger.info("%s: stored the sizes of %d images", path, header.num_rows)


class LabelMapWriter:
    """Fills in a label-map file row by row, in any order, resumably.

    Rows go to `f"{path}.partial"`, created with every dataset at full size and a `/written`
    uint8 [N] mask. If that file already exists with the same geometry and classes it is
    reopened and writing resumes (`missing()` lists what is left). `close()` renames the
    partial file onto `path` once every row is written; otherwise it keeps it for a later run.

    Example:
        with LabelMapWriter("maps.h5", num_rows=len(paths), num_classes=1000, topk=5,
                            height=15, width=15, classes=wnids, annotator="nfnet-f6") as writer:
            for rows in np.array_split(writer.missing(), 1000):
                values, indices = annotate(rows)  # [n, 5, 15, 15] each
                writer.write(rows, values, indices, labels[rows], [paths[i] for i in rows])

    Args:
        path: Final file.
        num_rows: N.
        num_classes: C.
        topk: K.
        height: H.
        width: W.
        classes: C class names in index order.
        compression: None (contiguous), "gzip" or "lzf" (chunked by row).
        with_sizes: Also store /sizes; every `write` then passes the images' sizes.
        adjust_orientation: Whether those sizes have the EXIF orientation applied.
        **attrs: Provenance root attributes (str, int or float).

    Raises:
        ValueError: An argument is invalid.
        LabelMapError: An existing partial file is unreadable (delete it to restart) or was
            started with a different geometry or classes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_rows: int,
        num_classes: int,
        topk: int,
        height: int,
        width: int,
        classes: Sequence[str],
        compression: str | None = None,
        with_sizes: bool = False,
        adjust_orientation: bool = False,
        **attrs: str | int | float,
    ) -> None:
        for name, value in (("num_rows", num_rows), ("num_classes", num_classes),
                            ("topk", topk), ("height", height), ("width", width)):
            check_positive_int(name, value)
        classes = _check_classes(classes)
        if len(classes) != num_classes:
            raise ValueError(
                f"classes: expected num_classes={num_classes} names, found {len(classes)}"
            )
        _check_compression(compression)
        _check_attrs(attrs)
        self.path = os.fspath(path)
        self.partial_path = f"{self.path}.partial"
        self.num_rows = int(num_rows)
        self.num_classes = int(num_classes)
        self._map_shape = (int(topk), int(height), int(width))
        self.with_sizes = bool(with_sizes)
        self._adjust_orientation = bool(adjust_orientation)
        if os.path.exists(self.partial_path):
            self._file: h5py.File | None = self._reopen(classes)
        else:
            self._file = self._create(classes, compression)
        self._file.attrs.update(attrs)
        self._written = self._file["written"][()].astype(bool)
        logger.info("%s: %d of %d rows written", self.partial_path, self.num_written, num_rows)

    def _create(self, classes: list[str], compression: str | None) -> h5py.File:
        f = h5py.File(self.partial_path, "w")
        try:
            topk, height, width = self._map_shape
            _create_datasets(
                f, num_rows=self.num_rows, topk=topk, height=height, width=width,
                classes=classes, compression=compression, attrs={},
                with_sizes=self.with_sizes, adjust_orientation=self._adjust_orientation,
            )
            f.create_dataset("written", data=np.zeros(self.num_rows, dtype=np.uint8))
            f.flush()
        except BaseException:
            f.close()
            os.remove(self.partial_path)
            raise
        return f

    def _reopen(self, classes: list[str]) -> h5py.File:
        restart = f"delete {self.partial_path} to restart"
        try:
            f = h5py.File(self.partial_path, "r+")
        except OSError as e:
            raise LabelMapError(
                f"{self.partial_path}: the partial file is unreadable ({e}), probably damaged "
                f"by an interrupted write; {restart}"
            ) from e
        try:
            header = _read_header(f, self.partial_path, complete=False)
            if "written" not in f:
                raise LabelMapError(f"{self.partial_path}: dataset /written is missing")
            found_classes = f["classes"].asstr()[()].tolist()
        except (LabelMapError, OSError, KeyError) as e:
            f.close()
            raise LabelMapError(f"{e}; the partial file cannot be resumed, {restart}") from e
        expected = (self.num_rows, self.num_classes, *self._map_shape)
        found = (header.num_rows, header.num_classes, header.topk, header.height, header.width)
        names = ("num_rows", "num_classes", "topk", "height", "width")
        mismatches = [f"{name}={got} (this writer: {want})"
                      for name, got, want in zip(names, found, expected) if got != want]
        if found_classes != classes:
            mismatches.append("different class names")
        if (_SIZES in f) != self.with_sizes:
            mismatches.append(f"/sizes {'present' if _SIZES in f else 'absent'}")
        elif self.with_sizes and bool(f[_SIZES].attrs.get(_ORIENTATION_ATTR, 0)) != (
                self._adjust_orientation):
            mismatches.append("sizes of another adjust_orientation")
        if mismatches:
            f.close()
            raise LabelMapError(
                f"{self.partial_path}: cannot resume, the partial file has "
                f"{', '.join(mismatches)}; use the same settings or {restart}"
            )
        return f

    @property
    def num_written(self) -> int:
        """Rows written so far (over all sessions)."""
        return int(np.count_nonzero(self._written))

    @property
    def is_complete(self) -> bool:
        """Whether every row has been written."""
        return bool(self._written.all())

    def missing(self) -> np.ndarray:
        """Row ids not yet written, ascending (int64 [n])."""
        return np.flatnonzero(~self._written)

    def write(
        self,
        rows: Any,
        values: Any,
        indices: Any,
        labels: Any,
        paths: Sequence[str],
        sizes: Any = None,
    ) -> None:
        """Writes rows (any set, any order; rewriting a row replaces it) and flushes.

        The data is flushed before the rows are marked written, so an interrupted job never
        marks a row it did not store.

        Args:
            rows (Tensor[n] | ndarray): Distinct row ids in [0, N).
            values (Tensor[n, K, H, W] | ndarray): Logits, any float dtype.
            indices (Tensor[n, K, H, W] | ndarray): Class indices in [0, C).
            labels (Tensor[n] | ndarray): Original labels in [-1, C).
            paths: n image paths relative to the image root.
            sizes (Tensor[n, 2] | ndarray | None): The images' (height, width); required
                exactly when the writer was made `with_sizes`.

        Raises:
            ValueError: An argument is invalid or the writer is closed.
        """
        if self._file is None:
            raise ValueError(f"{self.partial_path}: the writer is closed")
        rows = _as_numpy(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows: expected a 1-D integer array, found {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise ValueError(f"rows: expected row ids in [0, {self.num_rows}), found "
                             f"[{rows.min()}, {rows.max()}]")
        if (sizes is None) == self.with_sizes:
            raise ValueError(f"sizes: {'required' if self.with_sizes else 'not expected'} "
                             f"(the writer was made with with_sizes={self.with_sizes})")
        data = _check_rows(values, indices, labels, paths, num_classes=self.num_classes,
                           map_shape=self._map_shape, sizes=sizes)
        if len(data.values) != len(rows):
            raise ValueError(f"values: expected {len(rows)} rows (one per row id), found "
                             f"{len(data.values)}")
        order = np.argsort(rows, kind="stable")
        steps = np.diff(rows[order])
        if np.any(steps == 0):
            raise ValueError("rows: row ids must be distinct")
        # The sorted row ids split into runs of consecutive ids, each written as one slice.
        runs = np.split(order, np.flatnonzero(steps != 1) + 1) if rows.size else []
        for run in runs:
            start = int(rows[run[0]])
            for name, array in data.arrays().items():
                self._file[name][start:start + len(run)] = array[run]
        self._file.flush()
        for run in runs:
            start = int(rows[run[0]])
            self._file["written"][start:start + len(run)] = 1
        self._file.flush()
        self._written[rows] = True

    def close(self) -> None:
        """Flushes and closes; renames the file onto `path` if every row is written.

        An incomplete file stays at `partial_path` for a later writer to resume.
        """
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.is_complete:
            os.replace(self.partial_path, self.path)
            logger.info("%s: complete, %d rows", self.path, self.num_rows)
        else:
            logger.warning(
                "%s: %d of %d rows missing; keeping %s to resume",
                self.path, self.num_rows - self.num_written, self.num_rows, self.partial_path,
            )

    def __enter__(self) -> LabelMapWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_h5(path: str) -> h5py.File:
    if not os.path.isfile(path):
        raise LabelMapError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise LabelMapError(f"{path}: not a readable HDF5 file ({e})") from e


def _layout(ds: h5py.Dataset) -> DatasetLayout:
    return DatasetLayout(
        dtype=ds.dtype,
        shape=ds.shape,
        nbytes=ds.size * ds.dtype.itemsize,
        storage_bytes=ds.id.get_storage_size(),
        offset=ds.id.get_offset() if ds.chunks is None else None,
        compression=ds.compression,
    )


def _dataset(f: h5py.File, path: str, name: str) -> h5py.Dataset:
    try:
        ds = f[name]
    except (KeyError, OSError) as e:
        raise LabelMapError(f"{path}: dataset /{name} cannot be opened ({e}); the file is "
                            f"damaged") from e
    if not isinstance(ds, h5py.Dataset):
        raise LabelMapError(f"{path}: /{name}: expected a dataset, found a group")
    return ds


def _read_header(f: h5py.File, path: str, *, complete: bool = True) -> LabelMapHeader:
    """Runs the cheap checks on an open file and returns its header.

    Args:
        f: The open file.
        path: The file's path, for messages.
        complete: False for a writer's partial file: rows may be unwritten and contiguous
            data may not be allocated yet.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem.
    """
    attrs = {key: _plain(value) for key, value in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise LabelMapError(f"{path}: attribute 'format': expected {FORMAT!r}, found "
                            f"{attrs.get('format')!r} (not a dali-relabel label-map file)")
    version = attrs.get("version")
    if version != VERSION or isinstance(version, bool):
        newer = " (written by a newer dali-relabel; upgrade)" if (
            isinstance(version, int) and version > VERSION) else ""
        raise LabelMapError(f"{path}: attribute 'version': found version {version!r}, this "
                            f"library reads version {VERSION}{newer}")
    for name in _GEOMETRY_ATTRS:
        value = attrs.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LabelMapError(f"{path}: attribute {name!r}: expected a positive integer, "
                                f"found {value!r}")
    if attrs.get("value_kind") != VALUE_KIND:
        raise LabelMapError(f"{path}: attribute 'value_kind': expected {VALUE_KIND!r}, found "
                            f"{attrs.get('value_kind')!r}")
    num_classes, topk, height, width = (attrs[name] for name in _GEOMETRY_ATTRS)
    missing = [f"/{name}" for name in _DATASETS if name not in f]
    if missing:
        raise LabelMapError(f"{path}: missing dataset(s) {', '.join(missing)}")
    values, indices, labels, paths, classes = (_dataset(f, path, name) for name in _DATASETS)

    if values.dtype not in (np.float16, np.float32):
        raise LabelMapError(f"{path}: dataset /values: expected dtype float16 (or float32), "
                            f"found {values.dtype}")
    if indices.dtype not in (np.int16, np.int32, np.int64) or (
            np.iinfo(indices.dtype).max < num_classes - 1):
        raise LabelMapError(f"{path}: dataset /indices: expected int16/int32/int64 able to hold "
                            f"{num_classes} classes, found {indices.dtype}")
    if labels.dtype.kind not in "iu":
        raise LabelMapError(f"{path}: dataset /labels: expected an integer dtype, found "
                            f"{labels.dtype}")
    for ds in (paths, classes):
        if h5py.check_string_dtype(ds.dtype) is None:
            raise LabelMapError(f"{path}: dataset {ds.name}: expected utf-8 strings, found "
                                f"{ds.dtype}")

    if values.ndim != 4 or values.shape[1:] != (topk, height, width) or values.shape[0] < 1:
        raise LabelMapError(f"{path}: dataset /values: expected shape [N, {topk}, {height}, "
                            f"{width}] (N >= 1, K, H, W from the attributes), found "
                            f"{list(values.shape)}")
    num_rows = values.shape[0]
    expected_shapes = [(indices, values.shape), (labels, (num_rows,)), (paths, (num_rows,)),
                       (classes, (num_classes,))]
    written = _dataset(f, path, "written") if "written" in f else None
    if written is not None:
        expected_shapes.append((written, (num_rows,)))
    sizes = _dataset(f, path, _SIZES) if _SIZES in f else None
    if sizes is not None:
        if sizes.dtype.kind not in "iu":
            raise LabelMapError(f"{path}: dataset /sizes: expected an integer dtype, found "
                                f"{sizes.dtype}")
        expected_shapes.append((sizes, (num_rows, 2)))
    for ds, shape in expected_shapes:
        if ds.shape != shape:
            raise LabelMapError(f"{path}: dataset {ds.name}: expected shape {list(shape)} "
                                f"(N={num_rows}, C={num_classes}), found {list(ds.shape)}")

    file_size = os.path.getsize(path)
    layout = {"values": _layout(values), "indices": _layout(indices)}
    for name, ds in (("values", values), ("indices", indices)):
        if not complete or ds.chunks is not None:
            continue
        if layout[name].offset is None:
            raise LabelMapError(f"{path}: dataset /{name}: no data stored (never written)")
        end = layout[name].offset + layout[name].nbytes
        if end > file_size:
            raise LabelMapError(f"{path}: dataset /{name}: data ends at byte {end} but the file "
                                f"has {file_size} bytes (truncated file)")
    if complete and written is not None:
        unwritten = num_rows - int(np.count_nonzero(written[()]))
        if unwritten:
            raise LabelMapError(f"{path}: dataset /written: {unwritten} of {num_rows} rows were "
                                f"never written (incomplete file from an interrupted writer)")
    if complete and sizes is not None:
        bad = np.flatnonzero((sizes[()] < 1).any(axis=1))
        if bad.size:
            raise LabelMapError(f"{path}: dataset /sizes: {bad.size} rows hold a height or "
                                f"width < 1, first rows {bad[:_REPORTED_ROWS].tolist()}; "
                                f"rewrite it with `dali-relabel index`")
    return LabelMapHeader(
        path=path, num_rows=num_rows, num_classes=num_classes, topk=topk, height=height,
        width=width, attrs=attrs, layout=layout, file_size=file_size,
        sizes_adjust_orientation=None if sizes is None else bool(
            sizes.attrs.get(_ORIENTATION_ATTR, 0)),
    )


def read_header(path: str | os.PathLike) -> LabelMapHeader:
    """Validates a label-map file's metadata without loading its data.

    Checks format, version, attributes, datasets, dtypes, shapes, that contiguous data lies
    within the file and that every row was written.

    Args:
        path: The file.

    Returns:
        The file's header.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem.
    """
    path = os.fspath(path)
    with _open_h5(path) as f:
        try:
            return _read_header(f, path)
        except OSError as e:
            raise LabelMapError(f"{path}: reading the metadata failed ({e})") from e


def _memmap(path: str, name: str, layout: DatasetLayout) -> torch.Tensor:
    if not layout.contiguous:
        raise LabelMapError(
            f"{path}: dataset /{name} is stored chunked ({layout.compression or 'no'} "
            f"compression) and cannot be memory-mapped; open it with placement='memory'"
        )
    array = np.memmap(path, dtype=layout.dtype, mode="r", offset=layout.offset, shape=layout.shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


@dataclasses.dataclass
class _Tally:
    """Count and first rows of one kind of problem found by a full scan."""

    what: str
    count: int = 0
    rows: list[int] = dataclasses.field(default_factory=list)

    def add(self, bad: torch.Tensor, start: int) -> None:
        """Adds a chunk's mask `bad` (Tensor[n, M] bool) whose first row is `start`."""
        self.count += int(bad.sum())
        if len(self.rows) < _REPORTED_ROWS:
            rows = bad.any(dim=1).nonzero().flatten()[: _REPORTED_ROWS - len(self.rows)]
            self.rows.extend((rows + start).tolist())

    def __str__(self) -> str:
        return f"{self.what}: {self.count} entries, first rows {self.rows}"


class LabelMapStore:
    """A validated label-map file, loaded with a chosen placement.

    Open with `LabelMapStore.open(path, placement=...)`. Row i of `values`, `indices`,
    `labels` and `paths` belongs to image `paths[i]`.

    Attributes:
        path: The file.
        placement: "mmap", "memory", "pinned" or "device".
        header: The file's validated metadata.
        paths: N image paths relative to the image root.
        classes: C class names.
    """

    def __init__(
        self,
        *,
        header: LabelMapHeader,
        placement: str,
        values: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        paths: list[str],
        classes: list[str],
        sizes: torch.Tensor | None = None,
    ) -> None:
        self.path = header.path
        self.placement = placement
        self.header = header
        self.paths = paths
        self.classes = classes
        self._tensors: dict[str, torch.Tensor | None] | None = {
            "values": values, "indices": indices, "labels": labels, "sizes": sizes
        }

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        placement: str = "mmap",
        device: str | torch.device | None = None,
    ) -> LabelMapStore:
        """Validates a label-map file (metadata checks) and loads it.

        Args:
            path: The file.
            placement: Where the values, indices and labels live:
                "mmap": memory-mapped from the file, zero-copy, shared through the page
                    cache by every process of a node (read-only: never modify in place);
                    needs contiguous datasets.
                "memory": read into ordinary memory.
                "pinned": read into page-locked memory for fast host-to-GPU copies (falls
                    back to ordinary memory with a warning when CUDA is unavailable).
                "device": read and moved to `device`.
            device: Target of placement "device"; default "cuda" if available, else "cpu".

        Returns:
            The store.

        Raises:
            ValueError: Invalid placement, or `device` given with another placement.
            LabelMapError: The file is missing, unreadable or invalid; or placement "mmap" on
                a chunked (compressed) file.
        """
        if placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, found {placement!r}")
        if device is not None and placement != "device":
            raise ValueError(f"device: only used with placement='device', found {placement=!r}")
        path = os.fspath(path)
        with _open_h5(path) as f:
            try:
                header = _read_header(f, path)
                if placement == "mmap":
                    values, indices = (_memmap(path, name, header.layout[name])
                                       for name in ("values", "indices"))
                else:
                    values, indices = (torch.from_numpy(f[name][()])
                                       for name in ("values", "indices"))
                labels = torch.from_numpy(f["labels"][()].astype(np.int64))
                paths = f["paths"].asstr()[()].tolist()
                classes = f["classes"].asstr()[()].tolist()
                sizes = (torch.from_numpy(f[_SIZES][()].astype(np.int32)) if _SIZES in f
                         else None)
            except OSError as e:
                raise LabelMapError(f"{path}: reading failed ({e}); the file is damaged") from e
        if placement == "pinned":
            if torch.cuda.is_available():
                values, indices, labels = (t.pin_memory() for t in (values, indices, labels))
            else:
                warnings.warn("placement='pinned' needs CUDA (torch.cuda.is_available() is "
                              "False); keeping the label maps in ordinary memory", stacklevel=2)
        elif placement == "device":
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            values, indices, labels = values.to(device), indices.to(device), labels.to(device)
        return cls(header=header, placement=placement, values=values, indices=indices,
                   labels=labels, paths=paths, classes=classes, sizes=sizes)

    def _tensor(self, name: str) -> torch.Tensor:
        if self._tensors is None:
            raise ValueError(f"{self!r} is closed")
        return self._tensors[name]

    @property
    def values(self) -> torch.Tensor:
        """Annotator logits, Tensor[N, K, H, W] float16 (float32 if stored so)."""
        return self._tensor("values")

    @property
    def indices(self) -> torch.Tensor:
        """Class of each value, Tensor[N, K, H, W] int16 (int32/int64 if stored so)."""
        return self._tensor("indices")

    @property
    def labels(self) -> torch.Tensor:
        """Original single labels, Tensor[N] int64, -1 if unknown."""
        return self._tensor("labels")

    @property
    def sizes(self) -> torch.Tensor | None:
        """Each image's (height, width) as decoded, Tensor[N, 2] int32 on the CPU; None when
        the file has no /sizes (`dali-relabel index` adds it)."""
        return self._tensor("sizes")

    @property
    def sizes_adjust_orientation(self) -> bool | None:
        """Whether `sizes` have the EXIF orientation applied (None without /sizes)."""
        return self.header.sizes_adjust_orientation

    @property
    def num_classes(self) -> int:
        """C."""
        return self.header.num_classes

    @property
    def topk(self) -> int:
        """K."""
        return self.header.topk

    @property
    def height(self) -> int:
        """H."""
        return self.header.height

    @property
    def width(self) -> int:
        """W."""
        return self.header.width

    @property
    def attrs(self) -> dict[str, Any]:
        """All root attributes of the file as plain Python values."""
        return self.header.attrs

    def __len__(self) -> int:
        return self.header.num_rows

    def __repr__(self) -> str:
        state = "closed" if self._tensors is None else f"placement={self.placement!r}"
        return (f"LabelMapStore({self.path!r}, N={len(self)}, C={self.num_classes}, "
                f"K={self.topk}, HxW={self.height}x{self.width}, {state})")

    def validate(self, full: bool = False, *, progress: bool = True) -> None:
        """Re-runs the metadata checks and, with `full`, scans every row.

        The full scan looks for NaN/inf in /values, /indices outside [0, C) and /labels
        outside [-1, C), in chunks of rows.

        Args:
            full: Also scan the data.
            progress: Show a progress bar for the scan (only on a terminal).

        Raises:
            LabelMapError: Listing each problem with its count and first offending rows.
        """
        read_header(self.path)
        if not full:
            return
        values, indices, labels = self.values, self.indices, self.labels
        tallies = (_Tally("/values: NaN/inf"),
                   _Tally(f"/indices: class outside [0, {self.num_classes})"),
                   _Tally(f"/labels: label outside [-1, {self.num_classes})"))
        step = max(1, _SCAN_CHUNK_BYTES // (values[0].numel() * values.element_size()))
        with tqdm(total=len(self), unit="row", desc=f"scanning {os.path.basename(self.path)}",
                  disable=None if progress else True) as bar:
            for start in range(0, len(self), step):
                chunk = slice(start, start + step)
                n = len(values[chunk])
                index = indices[chunk].reshape(n, -1)
                label = labels[chunk].reshape(n, 1)
                tallies[0].add(~torch.isfinite(values[chunk].reshape(n, -1)), start)
                tallies[1].add((index < 0) | (index >= self.num_classes), start)
                tallies[2].add((label < -1) | (label >= self.num_classes), start)
                bar.update(n)
        problems = [str(tally) for tally in tallies if tally.count]
        if problems:
            raise LabelMapError(f"{self.path}: full scan found problems: {'; '.join(problems)}")

    def close(self) -> None:
        """Drops the store's references to its tensors.

        A memory map is released once no tensor taken from it is alive any more.
        """
        self._tensors = None

    def __enter__(self) -> LabelMapStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
