"""Writing label-map files: whole (`write_labelmaps`), row by row and resumably
(`LabelMapWriter`), and adding the images' sizes to one (`add_sizes`).

Nothing written is lost: a file is written under another name and renamed into place, so a
reader never sees a half-written file; `LabelMapWriter` marks a row written only once its
data is flushed, so an interrupted job resumes where it stopped. The disk space a write
needs is checked before HDF5 writes (HDF5 does not recover from a failed write: the file is
left inconsistent, and the library may crash at exit) and reserved where the file system
allows it; a write that fails anyway is one line naming the file and "no space left".
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from dali_relabel import _checks
from dali_relabel.files import atomic_path, write_failure
from dali_relabel.labelmaps.format import (
    FORMAT,
    H5_ERRORS,
    ORIENTATION_ATTR,
    SIZES,
    STRING,
    VALUE_KIND,
    VERSION,
    WRITTEN,
    LabelMapError,
    index_dtype,
    is_lock_error,
    open_h5,
    read_header,
    read_header_of,
    reading,
)
from dali_relabel.labelmaps.rows import (
    as_numpy,
    check_attrs,
    check_classes,
    check_compression,
    check_rows,
    check_sizes,
)

__all__ = ["LabelMapWriter", "add_sizes", "write_labelmaps"]

logger = logging.getLogger(__name__)

# Room for HDF5's own metadata when estimating the bytes a write adds to a file.
METADATA_BYTES = 64 << 10
# A variable-length string costs its bytes plus this in HDF5's global heap, which grows by
# collections of at least _HEAP_COLLECTION bytes.
_HEAP_OBJECT_BYTES = 16
_HEAP_COLLECTION = 4096
_UNLIMITED = resource.RLIM_INFINITY

# The partial files this process's open writers write (real paths): one writer per file.
_active_lock = threading.Lock()
_active: set[str] = set()


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
    f.create_dataset("indices", shape=shape, dtype=index_dtype(len(classes)), **layout)
    f.create_dataset("labels", shape=(num_rows,), dtype=np.int64, **contiguous)
    f.create_dataset("paths", shape=(num_rows,), dtype=STRING, **contiguous)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=STRING)
    if with_sizes:
        f.create_dataset(SIZES, shape=(num_rows, 2), dtype=np.int32, **contiguous)
        f[SIZES].attrs[ORIENTATION_ATTR] = int(adjust_orientation)
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
    cells = topk * height * width * (2 + np.dtype(index_dtype(len(classes))).itemsize)
    return (num_rows * (row + cells) + _heap_bytes(classes)
            + len(classes) * h5py.string_dtype().itemsize + METADATA_BYTES)


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
        LabelMapError: No space left for the file (nothing is left behind).
    """
    classes = check_classes(classes)
    check_compression(compression)
    check_attrs(attrs)
    rows = check_rows(values, indices, labels, paths, num_classes=len(classes), sizes=sizes)
    num_rows, topk, height, width = rows.values.shape
    if num_rows == 0:
        raise ValueError("values: expected at least one row")
    path = os.fspath(path)
    size = _fixed_bytes(num_rows, topk, height, width, classes, compression=compression,
                        with_sizes=sizes is not None) + _heap_bytes(rows.paths)
    problem = _space_problem(path, end=size, growth=size)
    if problem:
        raise LabelMapError(f"{path}: {problem}")
    try:
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
    except LabelMapError:
        raise
    except (OSError, RuntimeError) as e:
        raise LabelMapError(write_failure(path, e)) from e
    logger.info("wrote %s: %d label maps [%d, %d, %d]", path, num_rows, topk, height, width)


def add_sizes(path: str | os.PathLike, sizes: Any, *, adjust_orientation: bool = False) -> None:
    """Adds (or replaces) the /sizes dataset of an existing label-map file, safely.

    The file is copied beside itself, the copy gets /sizes and is renamed onto `path`: an
    interruption leaves the file as it was (the copy needs the file's size in free disk
    space for a moment). Processes that have the old file open keep reading it. When `path`
    is a symbolic link (e.g. to a shared store), the file it points to is rewritten so,
    beside itself, and the link is kept.

    Args:
        path: A complete label-map file.
        sizes (Tensor[N, 2] | ndarray): Each row's image (height, width) as decoded.
        adjust_orientation: Whether the sizes have the EXIF orientation applied.

    Raises:
        LabelMapError: The file is invalid, or cannot be rewritten (no space left, a
            folder that is not writable), named.
        ValueError: `sizes` is not [N, 2] of integers in [1, 2**31 - 1].
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    if target != os.path.abspath(path):
        logger.info("%s is a link to %s: storing the sizes in %s", path, target, target)
    header = read_header(target)
    sizes = check_sizes(sizes, header.num_rows)
    folder = os.path.dirname(target)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LabelMapError(f"{target}: cannot rewrite it, its folder {folder} is not "
                            f"writable (the file is rewritten through a copy beside it)")
    growth = header.file_size + sizes.nbytes + METADATA_BYTES
    problem = _space_problem(target, end=growth, growth=growth)
    if problem:
        raise LabelMapError(f"{target}: {problem}")
    try:
        with atomic_path(target) as tmp:
            shutil.copy2(target, tmp)
            with h5py.File(tmp, "r+") as f:
                if SIZES in f:
                    del f[SIZES]
                f.create_dataset(SIZES, data=sizes)
                f[SIZES].attrs[ORIENTATION_ATTR] = int(adjust_orientation)
            read_header(tmp)
    except LabelMapError:
        raise
    except (OSError, RuntimeError) as e:
        raise LabelMapError(f"{write_failure(target, e)}; the file is unchanged") from e
    logger.info("%s: stored the sizes of %d images", target, header.num_rows)


def _claim(partial_path: str) -> str:
    """Registers a writer of `partial_path`; refuses a second one in this process (HDF5
    lets one process open a file twice, and two writers would overwrite each other)."""
    key = os.path.realpath(partial_path)
    with _active_lock:
        if key in _active:
            raise LabelMapError(f"{partial_path}: another LabelMapWriter of this process is "
                                f"writing it; close that one first (one writer per file)")
        _active.add(key)
    return key


def _release(key: str) -> None:
    with _active_lock:
        _active.discard(key)


class LabelMapWriter:
    """Fills in a label-map file row by row, in any order, resumably.

    Rows go to `f"{path}.partial"`, created with every dataset at full size and a `/written`
    uint8 [N] mask. If that file already exists with the same geometry and classes it is
    reopened and writing resumes (`missing()` lists what is left). `close()` renames the
    partial file onto `path` once every row is written; otherwise it keeps it for a later run.
    One writer per file: a second writer of the same path in this process is refused while
    the first is open (HDF5's lock refuses one in another process).

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
            started with a different geometry or classes; another writer of this process
            writes the same file.
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
        self._file: h5py.File | None = None
        for name, value in (("num_rows", num_rows), ("num_classes", num_classes),
                            ("topk", topk), ("height", height), ("width", width)):
            _checks.check_int(name, value, 1)
        classes = check_classes(classes)
        if len(classes) != num_classes:
            raise ValueError(
                f"classes: expected num_classes={num_classes} names, found {len(classes)}"
            )
        check_compression(compression)
        check_attrs(attrs)
        self.path = _checks.check_path_arg("path", path)
        self.partial_path = f"{self.path}.partial"
        self.num_rows = int(num_rows)
        self.num_classes = int(num_classes)
        self._map_shape = (int(topk), int(height), int(width))
        self.with_sizes = bool(with_sizes)
        self._adjust_orientation = bool(adjust_orientation)
        self._release = weakref.finalize(self, _release, _claim(self.partial_path))
        try:
            if os.path.exists(self.partial_path):
                self._file = self._reopen(classes)
            else:
                self._file = self._create(classes, compression)
            problem = _space_problem(self.partial_path, end=self._file.id.get_filesize()
                                     + METADATA_BYTES, growth=METADATA_BYTES)
            if problem:
                raise LabelMapError(f"{self.partial_path}: {problem}")
            with reading(self.partial_path):
                self._file.attrs.update(attrs)
                self._file.flush()
                _reserve(self.partial_path, self._file.id.get_filesize())
                self._written = self._file[WRITTEN][()].astype(bool)
                # Every written row's path, to refuse a path given to two rows when it is
                # written rather than when the finished file is opened.
                stored = self._file["paths"].asstr()[()] if self._written.any() else []
                self._row_of_path = {stored[row]: int(row)
                                     for row in np.flatnonzero(self._written)}
        except BaseException:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._release()
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
            f.create_dataset(WRITTEN, data=np.zeros(self.num_rows, dtype=np.uint8))
            f.flush()
        except BaseException as e:
            f.close()
            os.remove(self.partial_path)
            if isinstance(e, (OSError, RuntimeError)):
                raise LabelMapError(f"{write_failure(self.partial_path, e)}; nothing was "
                                    f"written") from e
            raise
        return f

    def _reopen(self, classes: list[str]) -> h5py.File:
        restart = f"delete {self.partial_path} to restart"
        try:
            f = open_h5(self.partial_path, "r+")
        except LabelMapError as e:
            if is_lock_error(e.__cause__):
                raise
            raise LabelMapError(f"{e}, probably damaged by an interrupted write; {restart}") from e
        try:
            with reading(self.partial_path):
                header = read_header_of(f, self.partial_path, complete=False)
                if WRITTEN not in f:
                    raise LabelMapError(f"{self.partial_path}: dataset /written is missing")
                found_classes = f["classes"].asstr()[()].tolist()
                has_sizes = SIZES in f
                sizes_oriented = has_sizes and bool(f[SIZES].attrs.get(ORIENTATION_ATTR, 0))
        except LabelMapError as e:
            f.close()
            raise LabelMapError(f"{e}; the partial file cannot be resumed, {restart}") from e
        expected = (self.num_rows, self.num_classes, *self._map_shape)
        found = (header.num_rows, header.num_classes, header.topk, header.height, header.width)
        names = ("num_rows", "num_classes", "topk", "height", "width")
        mismatches = [f"{name}={got} (this writer: {want})"
                      for name, got, want in zip(names, found, expected) if got != want]
        if found_classes != classes:
            mismatches.append("different class names")
        if has_sizes != self.with_sizes:
            mismatches.append(f"/sizes {'present' if has_sizes else 'absent'}")
        elif self.with_sizes and sizes_oriented != self._adjust_orientation:
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
            LabelMapError: Writing failed (e.g. no space left); the rows written before
                are kept.
        """
        if self._file is None:
            raise ValueError(f"{self.partial_path}: the writer is closed")
        rows = as_numpy(rows)
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
        data = check_rows(values, indices, labels, paths, num_classes=self.num_classes,
                          map_shape=self._map_shape, sizes=sizes)
        if len(data.values) != len(rows):
            raise ValueError(f"values: expected {len(rows)} rows (one per row id), found "
                             f"{len(data.values)}")
        with reading(self.partial_path):
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
            self.partial_path, end=self._file.id.get_filesize() + growth + METADATA_BYTES,
            growth=growth + METADATA_BYTES)
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
                self._file[WRITTEN][start:start + len(run)] = 1
            self._file.flush()
        except H5_ERRORS as e:
            raise LabelMapError(f"{write_failure(self.partial_path, e)}; rerun to continue "
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
        try:
            self._file.close()
        finally:
            self._file = None
            self._release()
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
