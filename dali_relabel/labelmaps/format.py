"""The label-map file, format version 1: its constants, its metadata, and the checks that
opening a file runs.

One HDF5 file holds the top-k ReLabel label maps of a whole dataset (Yun et al.,
"Re-labeling ImageNet: from Single to Multi-Labels, from Global to Localized Labels",
CVPR 2021):

    /values    float16  [N, K, H, W]   annotator logits
    /indices   int16    [N, K, H, W]   class of each value (int32 when C > 32767)
    /labels    int64    [N]            original single label, -1 if unknown
    /paths     utf-8    [N]            image path relative to the image root, '/' separated
    /classes   utf-8    [C]            class names, index order
    /sizes     int32    [N, 2]         optional: each image's (height, width) as decoded
    attrs: format="dali-relabel-labelmaps", version=1, num_classes=C, topk=K, height=H,
           width=W, value_kind="logits", plus free-form provenance attributes.

/values and /indices are contiguous by default so that readers can memory-map them. Files
written by `LabelMapWriter` also keep a `/written` uint8 [N] mask (all ones once complete).
/sizes carries the attribute `adjust_orientation` (0 or 1): whether its sizes are those with
the EXIF orientation applied.

A label-map file is input from elsewhere, so opening one checks it before anything is
loaded: format, version, attributes, dtypes, shapes, that every dataset is stored in the
file itself (no external link, external storage or virtual dataset, no filter but gzip,
lzf, shuffle and fletcher32), that the data it declares is there, that its metadata fits
in memory, and that /paths and /sizes hold valid rows. Every problem, including whatever
HDF5 raises on a damaged file, is a `LabelMapError` naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from dali_relabel import _system
from dali_relabel._paths import check_relative_paths

__all__ = [
    "FORMAT",
    "VERSION",
    "DatasetLayout",
    "LabelMapError",
    "LabelMapHeader",
    "open_h5",
    "read_header",
    "read_paths",
]

FORMAT = "dali-relabel-labelmaps"
VERSION = 1
VALUE_KIND = "logits"
# Root attributes defined by the format; every other root attribute is provenance.
FORMAT_ATTRS = ("format", "version", "num_classes", "topk", "height", "width", "value_kind")
GEOMETRY_ATTRS = ("num_classes", "topk", "height", "width")
DATASETS = ("values", "indices", "labels", "paths", "classes")
STRING = h5py.string_dtype("utf-8")
SIZES = "sizes"
WRITTEN = "written"
ORIENTATION_ATTR = "adjust_orientation"
INT16_MAX_CLASSES = int(np.iinfo(np.int16).max)
INT32_MAX = int(np.iinfo(np.int32).max)
REPORTED_ROWS = 5
# The filters a label-map file may use (compression="gzip"/"lzf" with shuffle; fletcher32
# only checks the data). Any other filter changes what is read (scale-offset, n-bit) or
# needs a plugin.
ALLOWED_FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_SHUFFLE: "shuffle",
                   h5py.h5z.FILTER_FLETCHER32: "fletcher32", 32000: "lzf"}
# The errors h5py (and HDF5 under it) raises on a damaged file: a message of its own for
# each, none of which says so.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError,
             AttributeError, OverflowError, SystemError)
# Memory a dataset read whole takes beyond its bytes: each string becomes a Python str
# (about 49 bytes plus its text) held by an array and a list, checked as one joined text
# and in a set for uniqueness; integers are read and converted once.
_STR_OBJECT_BYTES = 49 + 8 + 8 + 56
_STR_COPIES = 4
_GUESSED_STRING_LENGTH = 64
_INTEGER_COPIES = 3


class LabelMapError(ValueError):
    """A label-map file is missing, unreadable, corrupt, inconsistent or incomplete, or was
    modified in place while in use.

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


def plain(value: Any) -> Any:
    """Converts an HDF5 attribute value to a plain Python value."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def index_dtype(num_classes: int) -> type:
    """The dtype /indices is written with for `num_classes` classes."""
    return np.int16 if num_classes <= INT16_MAX_CLASSES else np.int32


def first_line(error: BaseException) -> str:
    """The first line of an error's message (HDF5's run over several), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def corrupt(path: str, error: BaseException, what: str = "") -> LabelMapError:
    """The error for whatever h5py raised reading `path` (`what` of it, e.g. "dataset
    /values"): one line, naming the file."""
    return LabelMapError(f"{path}: {what + ': ' if what else ''}corrupt or not a label-map "
                         f"file ({type(error).__name__}: {first_line(error)})")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Turns every error h5py raises in the block into a LabelMapError that names `path`
    and says "corrupt or not a label-map file"; LabelMapErrors pass unchanged."""
    try:
        yield
    except LabelMapError:
        raise
    except H5_ERRORS as e:
        raise corrupt(path, e) from e


def is_lock_error(error: BaseException | None) -> bool:
    """Whether an error from opening an HDF5 file means another process holds its lock."""
    return isinstance(error, OSError) and (
        error.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(error))


def open_h5(path: str, mode: str = "r") -> h5py.File:
    """Opens an HDF5 file with h5py, with errors that name the file and say what to do.

    Args:
        path: The file.
        mode: h5py's mode: "r", "r+" or "w".

    Raises:
        LabelMapError: The file is missing or not a regular file (modes "r", "r+"), locked
            by another process (a running job, or the loader workers of one just killed:
            HDF5 locks a file while it is open, and forked processes inherit the lock),
            not readable, or not HDF5 ("corrupt or not a label-map file").
    """
    if mode != "w":
        try:
            if not os.path.isfile(path):
                raise LabelMapError(f"{path}: no such file" if not os.path.exists(path) else
                                    f"{path}: not a regular file (expected a label-map file)")
        except (OSError, ValueError) as e:  # a name too long, a NUL in it
            raise LabelMapError(f"{path}: cannot open it ({getattr(e, 'strerror', None) or e})"
                                ) from e
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if is_lock_error(e):
            raise LabelMapError(
                f"{path}: is locked by another process (a running job, or workers of one "
                f"that was just killed); wait for it to finish, then rerun") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.ENAMETOOLONG,
                       errno.EROFS) or mode == "w":
            raise LabelMapError(f"{path}: cannot open it ({e.strerror or first_line(e)})") from e
        raise corrupt(path, e) from e
    except H5_ERRORS as e:
        raise corrupt(path, e) from e


@contextlib.contextmanager
def opened(path: str, mode: str = "r") -> Iterator[h5py.File]:
    """`open_h5` for a `with` block: whatever h5py raises in the block or when closing the
    file becomes a LabelMapError (see `reading`)."""
    f = open_h5(path, mode)
    with reading(path):
        try:
            yield f
        finally:
            f.close()


def _layout(ds: h5py.Dataset) -> DatasetLayout:
    return DatasetLayout(
        dtype=ds.dtype,
        shape=ds.shape,
        nbytes=ds.size * ds.dtype.itemsize,
        storage_bytes=ds.id.get_storage_size(),
        offset=ds.id.get_offset() if ds.chunks is None else None,
        compression=ds.compression,
    )


def _check_storage(path: str, name: str, ds: h5py.Dataset) -> None:
    """Refuses a dataset whose data lives outside the file or passes through an unexpected
    filter: reading it would read another file (or another dataset's data)."""
    plist = ds.id.get_create_plist()
    storage = plist.get_layout()
    where = f"{path}: dataset /{name}"
    if storage == h5py.h5d.VIRTUAL:
        raise LabelMapError(f"{where}: is a virtual dataset (its data lives in other "
                            f"datasets or files); label-map files hold their data themselves")
    if plist.get_external_count():
        files = ", ".join(plist.get_external(i)[0].decode("utf-8", "replace")
                          for i in range(plist.get_external_count()))
        raise LabelMapError(f"{where}: keeps its data in external file(s) {files!r}; "
                            f"label-map files hold their data themselves")
    if storage not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
        raise LabelMapError(f"{where}: unknown storage layout {storage}")
    for i in range(plist.get_nfilters()):
        code, _, _, filter_name = plist.get_filter(i)
        if code not in ALLOWED_FILTERS:
            raise LabelMapError(
                f"{where}: uses the HDF5 filter {filter_name.decode('utf-8', 'replace')!r} "
                f"(id {code}); label-map files use only {', '.join(ALLOWED_FILTERS.values())}")


def dataset(f: h5py.File, path: str, name: str) -> h5py.Dataset:
    """Dataset /`name` of the open file, stored in the file itself, or a LabelMapError.

    The link is checked before it is followed: an external link would open another file
    and a soft link another dataset of this one.
    """
    key = name.encode()
    if not f.id.links.exists(key):
        raise LabelMapError(f"{path}: missing dataset /{name}")
    kind = f.id.links.get_info(key).type
    if kind == h5py.h5l.TYPE_EXTERNAL:
        target, inside = (part.decode("utf-8", "replace") for part in f.id.links.get_val(key))
        raise LabelMapError(f"{path}: /{name} is an external link to {target!r}:{inside}; "
                            f"label-map files hold their data themselves (not following it)")
    if kind != h5py.h5l.TYPE_HARD:
        link = "soft" if kind == h5py.h5l.TYPE_SOFT else "user-defined"
        raise LabelMapError(f"{path}: /{name} is a {link} link; expected a dataset (not "
                            f"following it)")
    try:
        ds = f[name]
    except H5_ERRORS as e:
        raise corrupt(path, e, f"dataset /{name} cannot be opened") from e
    if not isinstance(ds, h5py.Dataset):
        raise LabelMapError(f"{path}: /{name}: expected a dataset, found a group")
    _check_storage(path, name, ds)
    return ds


def check_memory(path: str, what: str, num_bytes: int, *, advice: str = "") -> None:
    """Refuses to read `num_bytes` of `what` (e.g. "dataset /labels") when the memory is
    not there (see `_system.available_memory`)."""
    available = _system.available_memory()
    if num_bytes > available:
        raise LabelMapError(f"{path}: {what}: reading it needs about "
                            f"{_system.format_bytes(num_bytes)} of memory ({num_bytes} bytes), "
                            f"{_system.format_bytes(available)} are available{advice}")


def memory_bytes(ds: h5py.Dataset) -> int:
    """About the memory a dataset read whole takes while it is read and checked: Python
    strings for string data (their length as stored, or a guess for variable-length ones),
    a few copies for numbers. The declared size counts, not the bytes stored: a compressed
    dataset of a few MB may declare hundreds of millions of rows."""
    string = h5py.check_string_dtype(ds.dtype)
    if string is None:
        return _INTEGER_COPIES * ds.size * ds.dtype.itemsize
    length = string.length or _GUESSED_STRING_LENGTH
    return ds.size * (_STR_OBJECT_BYTES + _STR_COPIES * length)


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
    storage = ds.id.get_create_plist().get_layout()
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


def _check_attrs(path: str, attrs: dict[str, Any]) -> tuple[int, int, int, int]:
    """The root attributes' (num_classes, topk, height, width), checked."""
    if attrs.get("format") != FORMAT:
        raise LabelMapError(f"{path}: attribute 'format': expected {FORMAT!r}, found "
                            f"{attrs.get('format')!r} (not a dali-relabel label-map file)")
    version = attrs.get("version")
    if version != VERSION or isinstance(version, bool):
        newer = " (written by a newer dali-relabel; upgrade)" if (
            isinstance(version, int) and version > VERSION) else ""
        raise LabelMapError(f"{path}: attribute 'version': found version {version!r}, this "
                            f"library reads version {VERSION}{newer}")
    for name in GEOMETRY_ATTRS:
        value = attrs.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LabelMapError(f"{path}: attribute {name!r}: expected a positive integer, "
                                f"found {value!r}")
    if attrs.get("value_kind") != VALUE_KIND:
        raise LabelMapError(f"{path}: attribute 'value_kind': expected {VALUE_KIND!r}, found "
                            f"{attrs.get('value_kind')!r}")
    return tuple(attrs[name] for name in GEOMETRY_ATTRS)


def _check_dtypes(path: str, num_classes: int, datasets: dict[str, h5py.Dataset]) -> None:
    values, indices = datasets["values"], datasets["indices"]
    if values.dtype not in (np.float16, np.float32):
        raise LabelMapError(f"{path}: dataset /values: expected dtype float16 (or float32), "
                            f"found {values.dtype}")
    if indices.dtype not in (np.int16, np.int32, np.int64) or (
            np.iinfo(indices.dtype).max < num_classes - 1):
        raise LabelMapError(f"{path}: dataset /indices: expected int16/int32/int64 able to hold "
                            f"{num_classes} classes, found {indices.dtype}")
    for name in ("labels", SIZES, WRITTEN):
        ds = datasets.get(name)
        if ds is not None and ds.dtype.kind not in "iu":
            raise LabelMapError(f"{path}: dataset /{name}: expected an integer dtype, found "
                                f"{ds.dtype}")
    for name in ("paths", "classes"):
        if h5py.check_string_dtype(datasets[name].dtype) is None:
            raise LabelMapError(f"{path}: dataset /{name}: expected utf-8 strings, found "
                                f"{datasets[name].dtype}")


def check_sizes_rows(path: str, sizes: np.ndarray) -> None:
    """Refuses /sizes rows whose height or width is < 1 or beyond int32 (the loaders hold
    sizes as int32: a larger value would wrap)."""
    bad = np.flatnonzero(((sizes < 1) | (sizes > INT32_MAX)).any(axis=1))
    if bad.size:
        raise LabelMapError(
            f"{path}: dataset /sizes: {bad.size} rows hold a height or width outside "
            f"[1, {INT32_MAX}] (int32), found [{sizes.min()}, {sizes.max()}], first rows "
            f"{bad[:REPORTED_ROWS].tolist()}; rewrite it with `dali-relabel index`")


def read_header_and_paths(f: h5py.File, path: str, *,
                          complete: bool = True) -> tuple[LabelMapHeader, list[str] | None]:
    """Runs the cheap checks on an open file; returns its header and, for a complete file,
    its checked /paths (reading N strings is cheap, and a file is input, not trusted).

    Args:
        f: The open file.
        path: The file's path, for messages.
        complete: False for a writer's partial file: rows may be unwritten and data may not
            be allocated yet; /paths is then neither checked nor returned.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem; whatever
            h5py raises on a damaged file becomes "corrupt or not a label-map file".
    """
    with reading(path):
        return _read_header_and_paths(f, path, complete=complete)


def _read_header_and_paths(f: h5py.File, path: str, *,
                           complete: bool) -> tuple[LabelMapHeader, list[str] | None]:
    attrs = {key: plain(value) for key, value in f.attrs.items()}
    num_classes, topk, height, width = _check_attrs(path, attrs)
    missing = [f"/{name}" for name in DATASETS if not f.id.links.exists(name.encode())]
    if missing:
        raise LabelMapError(f"{path}: missing dataset(s) {', '.join(missing)}")
    datasets = {name: dataset(f, path, name) for name in DATASETS}
    for name in (WRITTEN, SIZES):
        if f.id.links.exists(name.encode()):
            datasets[name] = dataset(f, path, name)
    _check_dtypes(path, num_classes, datasets)

    values = datasets["values"]
    if values.ndim != 4 or values.shape[1:] != (topk, height, width) or values.shape[0] < 1:
        raise LabelMapError(f"{path}: dataset /values: expected shape [N, {topk}, {height}, "
                            f"{width}] (N >= 1, K, H, W from the attributes), found "
                            f"{list(values.shape)}")
    num_rows = values.shape[0]
    expected_shapes = {"indices": values.shape, "labels": (num_rows,), "paths": (num_rows,),
                       "classes": (num_classes,), WRITTEN: (num_rows,), SIZES: (num_rows, 2)}
    for name, shape in expected_shapes.items():
        ds = datasets.get(name)
        if ds is not None and ds.shape != shape:
            raise LabelMapError(f"{path}: dataset /{name}: expected shape {list(shape)} "
                                f"(N={num_rows}, C={num_classes}), found {list(ds.shape)}")

    file_size = os.path.getsize(path)
    for name, ds in datasets.items():
        # A writer creates /classes and /written complete.
        _check_stored(path, name, ds, file_size,
                      required=complete or name in ("classes", WRITTEN))
    # Readers read every dataset but the maps whole: all of it must fit at once.
    whole = [name for name in datasets if name not in ("values", "indices")]
    check_memory(path, f"the metadata (/{', /'.join(whole)}) of {num_rows} rows",
                 sum(memory_bytes(datasets[name]) for name in whole))
    written, sizes = datasets.get(WRITTEN), datasets.get(SIZES)
    if complete and written is not None:
        unwritten = num_rows - int(np.count_nonzero(written[()]))
        if unwritten:
            raise LabelMapError(f"{path}: dataset /written: {unwritten} of {num_rows} rows were "
                                f"never written (incomplete file from an interrupted writer)")
    if complete and sizes is not None:
        check_sizes_rows(path, sizes[()])
    image_paths = None
    if complete:
        image_paths = datasets["paths"].asstr()[()].tolist()
        try:
            check_relative_paths(image_paths, name=f"{path}: dataset /paths")
        except ValueError as e:
            raise LabelMapError(str(e)) from e
    header = LabelMapHeader(
        path=path, num_rows=num_rows, num_classes=num_classes, topk=topk, height=height,
        width=width, attrs=attrs, file_size=file_size,
        layout={"values": _layout(values), "indices": _layout(datasets["indices"])},
        sizes_adjust_orientation=None if sizes is None else bool(
            sizes.attrs.get(ORIENTATION_ATTR, 0)),
    )
    return header, image_paths


def read_header_of(f: h5py.File, path: str, *, complete: bool = True) -> LabelMapHeader:
    """The header of an open file after the cheap checks (see `read_header_and_paths`)."""
    return read_header_and_paths(f, path, complete=complete)[0]


def read_header(path: str | os.PathLike) -> LabelMapHeader:
    """Validates a label-map file's metadata without loading its maps.

    Checks format, version, attributes, datasets (stored in the file itself, with the
    expected filters only), dtypes, shapes, that every dataset's declared shape is backed
    by data in the file, that the metadata fits in memory, that every row was written,
    that /sizes holds heights and widths in [1, 2**31 - 1] and that /paths holds unique,
    relative, normalized paths (see `relative_path_problem`).

    Args:
        path: The file.

    Returns:
        The file's header.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem.
    """
    path = os.fspath(path)
    with opened(path) as f:
        return read_header_of(f, path)


def read_paths(path: str | os.PathLike) -> list[str]:
    """A label-map file's /paths, checked like `read_header` checks it; no map is loaded.

    Raises:
        LabelMapError: Naming the file, the dataset or attribute, and the problem.
    """
    path = os.fspath(path)
    with opened(path) as f:
        return read_header_and_paths(f, path)[1]
