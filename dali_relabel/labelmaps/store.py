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
import errno
import logging
import math
import os
import resource
import shutil
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from tqdm import tqdm

from dali_relabel import _checks
from dali_relabel._paths import check_relative_paths
from dali_relabel.files import atomic_path

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
    "open_h5",
    "read_header",
    "read_paths",
    "scan_file",
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
# Room for HDF5's own metadata when estimating the bytes a write adds to a file.
_METADATA_BYTES = 64 << 10
# A variable-length string costs its bytes plus this in HDF5's global heap, which grows by
# collections of at least _HEAP_COLLECTION bytes.
_HEAP_OBJECT_BYTES = 16
_HEAP_COLLECTION = 4096
_UNLIMITED = resource.RLIM_INFINITY
# cudaHostRegisterDefault: with unified addressing (every 64-bit platform CUDA supports) the
# registered memory is page-locked, mapped and portable to every device, as cudaHostAlloc's.
_CUDA_HOST_REGISTER_DEFAULT = 0


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
    if min(values.shape[1:]) < 1:
        raise ValueError(f"values: expected [N, K, H, W] with K, H, W >= 1, found {values.shape}")
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
    check_relative_paths(paths.tolist())
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
    """Creates every dataset of the format at full size, and the root attributes.

    Contiguous datasets get their file space at once (HDF5 allocates it lazily otherwise, at
    the first write or flush): a full disk then fails here, before any row is marked
    written, and later writes stay inside the file (see `_reserve`).
    """
    shape = (num_rows, topk, height, width)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    contiguous = {"dcpl": dcpl}
    layout = contiguous if compression is None else {
        "chunks": (1, topk, height, width), "compression": compression, "shuffle": True
    }
    f.create_dataset("values", shape=shape, dtype=np.float16, **layout)
    f.create_dataset("indices", shape=shape, dtype=_index_dtype(len(classes)), **layout)
    f.create_dataset("labels", shape=(num_rows,), dtype=np.int64, **contiguous)
    f.create_dataset("paths", shape=(num_rows,), dtype=_STRING, **contiguous)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=_STRING)
    if with_sizes:
        f.create_dataset(_SIZES, shape=(num_rows, 2), dtype=np.int32, **contiguous)
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


def _heap_bytes(strings: Sequence[str]) -> int:
    """At most the bytes that storing `strings` adds to HDF5's global heap."""
    return _HEAP_COLLECTION + sum(len(text.encode("utf-8")) + _HEAP_OBJECT_BYTES
                                  for text in strings)


def _fixed_bytes(num_rows: int, topk: int, height: int, width: int, classes: list[str], *,
                 compression: str | None, with_sizes: bool) -> int:
    """At most the size of a new file before any path is stored (the uncompressed size of
    the maps when compressed: an upper bound)."""
    row = 8 + h5py.string_dtype().itemsize + (8 if with_sizes else 0) + 1  # + /written
    cells = topk * height * width * (2 + np.dtype(_index_dtype(len(classes))).itemsize)
    return (num_rows * (row + cells) + _heap_bytes(classes)
            + len(classes) * h5py.string_dtype().itemsize + _METADATA_BYTES)


def _space_problem(path: str, *, end: int, growth: int) -> str | None:
    """Why `path` cannot grow by `growth` bytes to a size of `end` bytes, or None if it can.

    Checked before HDF5 writes: HDF5 does not recover from a failed write (the file is left
    inconsistent, and the library may crash at exit).
    """
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != _UNLIMITED and end > limit:
        return (f"no space left for the file: {end} bytes would exceed the file-size limit "
                f"(ulimit -f) of {limit} bytes")
    stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free = stat.f_bavail * stat.f_frsize
    if growth > free:
        return f"no space left on device ({growth} more bytes needed, {free} free)"
    return None


def _reserve(path: str, size: int) -> None:
    """Gives the first `size` bytes of `path` their disk blocks, so that writing into them
    cannot fail for lack of space (HDF5's early allocation leaves a sparse file).

    Raises:
        LabelMapError: No space left (or the file-size limit reached).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG):
            return  # the file system cannot reserve space; writes find out instead
        raise LabelMapError(f"{path}: no space left for the file's {size} bytes "
                            f"({e.strerror})") from e
    finally:
        os.close(fd)


def _write_failure(path: str, error: BaseException) -> str:
    """One line on an HDF5 write error (its messages run over several lines)."""
    text = str(error)
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG) or any(
            sign in text for sign in ("errno = 28", "errno = 27", "No space left",
                                      "File too large")):
        return f"{path}: writing failed: no space left on device (or the file-size limit)"
    return f"{path}: writing failed ({text.splitlines()[0] if text else type(error).__name__})"


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
    size = _fixed_bytes(num_rows, topk, height, width, classes, compression=compression,
                        with_sizes=sizes is not None) + _heap_bytes(rows.paths)
    problem = _space_problem(path, end=size, growth=size)
    if problem:
        raise LabelMapError(f"{path}: {problem}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _create_datasets(
            f, num_rows=num_rows, topk=topk, height=height, width=width, classes=classes,
            compression=compression, attrs=attrs, with_sizes=sizes is not None,
            adjust_orientation=adjust_orientation,
        )
        f.flush()
        _reserve(tmp, f.id.get_filesize())
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
    growth = header.file_size + sizes.nbytes + _METADATA_BYTES
    problem = _space_problem(path, end=growth, growth=growth)
    if problem:
        raise LabelMapError(f"{path}: {problem}")
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
            _checks.check_int(name, value, 1)
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
        try:
            problem = _space_problem(self.partial_path, end=self._file.id.get_filesize()
                                     + _METADATA_BYTES, growth=_METADATA_BYTES)
            if problem:
                raise LabelMapError(f"{self.partial_path}: {problem}")
            self._file.attrs.update(attrs)
            self._file.flush()
            _reserve(self.partial_path, self._file.id.get_filesize())
            self._written = self._file["written"][()].astype(bool)
            # Every written row's path, to refuse a path given to two rows when it is
            # written rather than when the finished file is opened.
            stored = self._file["paths"].asstr()[()] if self._written.any() else []
            self._row_of_path = {stored[row]: int(row) for row in np.flatnonzero(self._written)}
        except BaseException:
            self._file.close()
            self._file = None
            raise
        logger.info("%s: %d of %d rows written", self.partial_path, self.num_written, num_rows)

    def _create(self, classes: list[str], compression: str | None) -> h5py.File:
        topk, height, width = self._map_shape
        size = _fixed_bytes(self.num_rows, topk, height, width, classes,
                            compression=compression, with_sizes=self.with_sizes)
        problem = _space_problem(self.partial_path, end=size, growth=size)
        if problem:
            raise LabelMapError(f"{self.partial_path}: {problem}; nothing was written")
        f = open_h5(self.partial_path, "w")
        try:
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
            f = open_h5(self.partial_path, "r+")
        except LabelMapError as e:
            if _is_lock_error(e.__cause__):
                raise
            raise LabelMapError(f"{e}, probably damaged by an interrupted write; {restart}") from e
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
        order = np.argsort(rows, kind="stable")
        steps = np.diff(rows[order])
        if np.any(steps == 0):
            raise ValueError("rows: row ids must be distinct")
        data = _check_rows(values, indices, labels, paths, num_classes=self.num_classes,
                           map_shape=self._map_shape, sizes=sizes)
        if len(data.values) != len(rows):
            raise ValueError(f"values: expected {len(rows)} rows (one per row id), found "
                             f"{len(data.values)}")
        rewritten = {int(row): self._file["paths"].asstr()[row]
                     for row in rows[self._written[rows]]}
        for row, path in zip(rows.tolist(), data.paths):
            other = self._row_of_path.get(path)
            if other is not None and other != row and other not in rewritten:
                raise ValueError(f"paths: {path!r} of row {row} is already the path of row "
                                 f"{other}; paths must be unique")
        growth = _heap_bytes(data.paths)
        if self._file["values"].chunks is not None:  # compressed: at most the raw bytes
            growth += data.values.nbytes + data.indices.nbytes
        problem = _space_problem(
            self.partial_path, end=self._file.id.get_filesize() + growth + _METADATA_BYTES,
            growth=growth + _METADATA_BYTES)
        if problem:
            raise LabelMapError(
                f"{self.partial_path}: {problem}; the {self.num_written} of {self.num_rows} "
                f"rows written so far are kept: make room and rerun to continue")
        # The sorted row ids split into runs of consecutive ids, each written as one slice.
        runs = np.split(order, np.flatnonzero(steps != 1) + 1) if rows.size else []
        try:
            for run in runs:
                start = int(rows[run[0]])
                for name, array in data.arrays().items():
                    self._file[name][start:start + len(run)] = array[run]
            self._file.flush()
            for run in runs:
                start = int(rows[run[0]])
                self._file["written"][start:start + len(run)] = 1
            self._file.flush()
        except (OSError, RuntimeError) as e:
            raise LabelMapError(f"{_write_failure(self.partial_path, e)}; rerun to continue "
                                f"from the rows written before") from e
        for old_path in rewritten.values():
            self._row_of_path.pop(old_path, None)
        self._row_of_path.update(zip(data.paths, rows.tolist()))
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


def _is_lock_error(error: BaseException | None) -> bool:
    """Whether an error from opening an HDF5 file means another process holds its lock."""
    return isinstance(error, OSError) and (
        error.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(error))


def open_h5(path: str, mode: str = "r") -> h5py.File:
    """Opens an HDF5 file with h5py, with errors that name the file and say what to do.

    Args:
        path: The file.
        mode: h5py's mode: "r", "r+" or "w".

    Raises:
        LabelMapError: The file is missing (modes "r", "r+"), locked by another process (a
            running job, or the loader workers of one just killed: HDF5 locks a file while
            it is open, and forked processes inherit the lock), or not HDF5.
    """
    if mode != "w" and not os.path.isfile(path):
        raise LabelMapError(f"{path}: no such file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if _is_lock_error(e):
            raise LabelMapError(
                f"{path}: is locked by another process (a running job, or workers of one "
                f"that was just killed); wait for it to finish, then rerun") from e
        raise LabelMapError(f"{path}: not a readable HDF5 file "
                            f"({str(e).splitlines()[0] if str(e) else e})") from e


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


def _available_memory() -> int:
    """Bytes of memory this process can still get: the kernel's MemAvailable, less when a
    cgroup (container) limit is lower."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _check_memory(path: str, name: str, num_bytes: int, *, advice: str = "") -> None:
    """Refuses to read `num_bytes` of dataset /`name` when the memory is not there."""
    available = _available_memory()
    if num_bytes > available:
        raise LabelMapError(f"{path}: dataset /{name}: reading it needs {num_bytes} bytes of "
                            f"memory, {available} are available{advice}")


def _string_bytes(ds: h5py.Dataset) -> int:
    """About the memory a dataset takes once read (Python strings for string data)."""
    per_item = 64 if h5py.check_string_dtype(ds.dtype) is not None else ds.dtype.itemsize
    return ds.size * per_item


def _check_stored(path: str, name: str, ds: h5py.Dataset, file_size: int, *,
                  required: bool) -> None:
    """Checks that a dataset's declared shape is backed by data in the file, so that a
    small file cannot make a reader allocate what it declares.

    Args:
        path: The file, for messages.
        name: The dataset's name.
        ds: The dataset.
        file_size: The file's size in bytes.
        required: Whether every element must have been written (a complete file); else
            unallocated data is allowed (a writer's partial file).

    Raises:
        LabelMapError: Naming the file and the dataset.
    """
    plist = ds.id.get_create_plist()
    storage = plist.get_layout()
    if storage not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT) or (
            plist.get_external_count()):
        raise LabelMapError(f"{path}: dataset /{name}: stored outside the file (external or "
                            f"virtual storage), which label-map files do not use")
    if storage == h5py.h5d.COMPACT:  # held in the object header: at most 64 kB
        return
    if storage == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        if offset is None:
            if required:
                raise LabelMapError(f"{path}: dataset /{name}: no data stored (never written)")
            return
        end = offset + ds.size * ds.dtype.itemsize
        if end > file_size:
            raise LabelMapError(f"{path}: dataset /{name}: data ends at byte {end} but the file "
                                f"has {file_size} bytes (truncated file, or a shape "
                                f"{list(ds.shape)} the data does not fill)")
        return
    expected = math.prod(-(-size // chunk) for size, chunk in zip(ds.shape, ds.chunks))
    stored = ds.id.get_num_chunks()
    if required and stored < expected:
        raise LabelMapError(f"{path}: dataset /{name}: {stored} of {expected} chunks stored "
                            f"(shape {list(ds.shape)}): rows without data (never written, "
                            f"or a shape the data does not fill)")


def _read_header(f: h5py.File, path: str, *, complete: bool = True) -> LabelMapHeader:
    """Runs the cheap checks on an open file and returns its header (see
    `_read_header_and_paths`)."""
    return _read_header_and_paths(f, path, complete=complete)[0]


def _read_header_and_paths(f: h5py.File, path: str, *,
                           complete: bool = True) -> tuple[LabelMapHeader, list[str] | None]:
    """Runs the cheap checks on an open file; returns its header and, for a complete file,
    its checked /paths (reading N strings is cheap, and a file is input, not trusted).

    Args:
        f: The open file.
        path: The file's path, for messages.
        complete: False for a writer's partial file: rows may be unwritten and data may not
            be allocated yet; /paths is then neither checked nor returned.

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
    stored = {"values": values, "indices": indices, "labels": labels, "paths": paths,
              "classes": classes, "written": written, _SIZES: sizes}
    for name, ds in stored.items():
        if ds is not None:
            # A writer creates /classes and /written complete.
            _check_stored(path, name, ds, file_size,
                          required=complete or name in ("classes", "written"))
            if name not in ("values", "indices"):  # read whole by readers
                _check_memory(path, name, _string_bytes(ds))
    layout = {"values": _layout(values), "indices": _layout(indices)}
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
    image_paths = None
    if complete:
        image_paths = paths.asstr()[()].tolist()
        try:
            check_relative_paths(image_paths, name=f"{path}: dataset /paths")
        except ValueError as e:
            raise LabelMapError(str(e)) from e
    header = LabelMapHeader(
        path=path, num_rows=num_rows, num_classes=num_classes, topk=topk, height=height,
        width=width, attrs=attrs, layout=layout, file_size=file_size,
        sizes_adjust_orientation=None if sizes is None else bool(
            sizes.attrs.get(_ORIENTATION_ATTR, 0)),
    )
    return header, image_paths


def read_header(path: str | os.PathLike) -> LabelMapHeader:
    """Validates a label-map file's metadata without loading its data.

    Checks format, version, attributes, datasets, dtypes, shapes, that every dataset's
    declared shape is backed by data in the file, that every row was written and that
    /paths holds unique, relative, normalized paths (see `relative_path_problem`).

    Args:
        path: The file.

    Returns:
        The file's header.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem.
    """
    path = os.fspath(path)
    with open_h5(path) as f:
        try:
            return _read_header(f, path)
        except OSError as e:
            raise LabelMapError(f"{path}: reading the metadata failed ({e})") from e


def _check_placement_memory(header: LabelMapHeader, placement: str,
                            device: str | torch.device | None) -> None:
    """Refuses to load /values and /indices where there is no room for them."""
    num_bytes = sum(layout.nbytes for layout in header.layout.values())
    advice = "; open it with placement='mmap'" if header.mmappable else ""
    _check_memory(header.path, "values and /indices", num_bytes, advice=advice)
    if placement == "device":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if num_bytes > free:
                raise LabelMapError(f"{header.path}: datasets /values and /indices need "
                                    f"{num_bytes} bytes on {device}, {free} are free{advice}")


def scan_file(path: str | os.PathLike, *, progress: bool = True) -> LabelMapHeader:
    """Validates a label-map file and scans every row, reading a chunk of rows at a time
    (never the whole file into memory).

    The scan looks for NaN/inf in /values, /indices outside [0, C) and /labels outside
    [-1, C).

    Args:
        path: The file.
        progress: Show a progress bar (only on a terminal).

    Returns:
        The file's header.

    Raises:
        LabelMapError: The file is invalid; the scan's problems are listed with their
            counts and first offending rows.
    """
    path = os.fspath(path)
    with open_h5(path) as f:
        try:
            header = _read_header(f, path)
            _scan(path, header.num_classes, header.num_rows, f["values"], f["indices"],
                  f["labels"], progress=progress)
        except OSError as e:
            raise LabelMapError(f"{path}: reading failed ({e}); the file is damaged") from e
    return header


def _scan(path: str, num_classes: int, num_rows: int, values: Any, indices: Any, labels: Any,
          *, progress: bool) -> None:
    """The full scan over rows of tensors or h5py datasets, a chunk of rows at a time."""
    tallies = (_Tally("/values: NaN/inf"),
               _Tally(f"/indices: class outside [0, {num_classes})"),
               _Tally(f"/labels: label outside [-1, {num_classes})"))
    row_bytes = math.prod(values.shape[1:]) * values.dtype.itemsize
    step = max(1, _SCAN_CHUNK_BYTES // row_bytes)
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


def read_paths(path: str | os.PathLike) -> list[str]:
    """A label-map file's /paths, checked like `read_header` checks it; no map is loaded.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem.
    """
    path = os.fspath(path)
    with open_h5(path) as f:
        try:
            return _read_header_and_paths(f, path)[1]
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


def _loaded(path: str, name: str, array: np.ndarray, pin: bool) -> torch.Tensor:
    """Dataset /`name` as read into `array`, as a tensor; page-locked in place with `pin`.

    In place and not with torch's pin_memory(): that copies into torch's caching host
    allocator, which rounds every block up to a power of two (ImageNet's 2.9 GB /values would
    take 4 GB). The registration lasts as long as the memory: tensors and views of the result
    keep `array` alive, and the last of them to go unregisters it before it is freed.

    Each process pins its own copy. Registering the memory map all processes of a node share
    instead needs cudaHostRegisterReadOnly, whose support is a device attribute torch does not
    expose, and a failed attempt would leave a CUDA error for torch's next kernel launch to
    report; so a failure here is an error, not a fallback.
    """
    if pin:
        cudart = torch.cuda.cudart()
        pointer = array.ctypes.data
        error = cudart.cudaHostRegister(pointer, array.nbytes, _CUDA_HOST_REGISTER_DEFAULT)
        if error != cudart.cudaError.success:
            raise LabelMapError(f"{path}: dataset /{name}: page-locking its {array.nbytes} "
                                f"bytes failed ({cudart.cudaGetErrorString(error)}); open it "
                                "with placement='mmap'")
        # Not at interpreter exit: the process's end releases the registration anyway, and
        # CUDA may be shutting down by then.
        weakref.finalize(array, cudart.cudaHostUnregister, pointer).atexit = False
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
                "pinned": read into memory page-locked in place at its exact size, for fast
                    host-to-GPU copies; one copy per process (falls back to ordinary memory
                    with a warning when CUDA is unavailable).
                "device": read and moved to `device`.
            device: Target of placement "device"; default "cuda" if available, else "cpu".

        Returns:
            The store.

        Raises:
            ValueError: Invalid placement, or `device` given with another placement.
            LabelMapError: The file is missing, unreadable or invalid; placement "mmap" on a
                chunked (compressed) file; or CUDA refused to page-lock the data ("pinned").
        """
        if placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, found {placement!r}")
        if device is not None and placement != "device":
            raise ValueError(f"device: only used with placement='device', found {placement=!r}")
        path = os.fspath(path)
        pin = placement == "pinned" and torch.cuda.is_available()
        with open_h5(path) as f:
            try:
                header, paths = _read_header_and_paths(f, path)
                if placement == "mmap":
                    values, indices = (_memmap(path, name, header.layout[name])
                                       for name in ("values", "indices"))
                else:
                    _check_placement_memory(header, placement, device)
                    values, indices = (_loaded(path, name, f[name][()], pin)
                                       for name in ("values", "indices"))
                labels = _loaded(path, "labels", f["labels"][()].astype(np.int64), pin)
                classes = f["classes"].asstr()[()].tolist()
                sizes = (torch.from_numpy(f[_SIZES][()].astype(np.int32)) if _SIZES in f
                         else None)
            except OSError as e:
                raise LabelMapError(f"{path}: reading failed ({e}); the file is damaged") from e
        if placement == "pinned" and not pin:
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
        if full:
            _scan(self.path, self.num_classes, len(self), self.values, self.indices,
                  self.labels, progress=progress)

    def close(self) -> None:
        """Drops the store's references to its tensors.

        A memory map is released, and page-locked memory unregistered and freed, once no
        tensor taken from it is alive any more.
        """
        self._tensors = None

    def __enter__(self) -> LabelMapStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
