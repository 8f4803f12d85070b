"""The label-map store: a validated label-map file, loaded where the loaders read it.

`LabelMapStore.open` validates a file (see `format.read_header`) and places its maps:
memory-mapped from the file ("mmap", shared through the page cache by every process of a
node), read into memory ("memory"), page-locked in place ("pinned") or on a GPU ("device").

A store in use must not change under its reader: replace a label-map file by writing the new
one beside it and renaming it onto the old name (as `dali-relabel index` and the writers
do); running jobs then keep reading the old file. A file modified in place (truncated,
rewritten, a `cp` onto it) changes what a memory map reads, and a truncated one ends the
process with SIGBUS at the next read beyond its end: `LabelMapStore.check_unchanged` tells.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
import weakref
from typing import Any

import numpy as np
import torch

from dali_relabel import _checks
from dali_relabel.labelmaps.format import (
    SIZES,
    DatasetLayout,
    LabelMapError,
    LabelMapHeader,
    check_memory,
    opened,
    read_header,
    read_header_and_paths,
)
from dali_relabel.labelmaps.scan import scan_rows

__all__ = ["PLACEMENTS", "LabelMapStore"]

PLACEMENTS = ("mmap", "memory", "pinned", "device")
# cudaHostRegisterDefault: with unified addressing (every 64-bit platform CUDA supports) the
# registered memory is page-locked, mapped and portable to every device, as cudaHostAlloc's.
_CUDA_HOST_REGISTER_DEFAULT = 0
_REPLACE_ADVICE = ("replace a label-map file by writing the new one beside it and renaming it "
                   "onto the old name (as `dali-relabel index` does): running jobs then keep "
                   "reading the old one")


@dataclasses.dataclass(frozen=True)
class _Identity:
    """What tells a file apart from itself modified: where it lives, its size and its
    modification time (not the status-change time: replacing the file by rename changes
    that of the old file, whose link count drops)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> _Identity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def changes(self, other: _Identity) -> str:
        """What differs from `other`, for messages."""
        if self.size != other.size:
            return f"size {other.size} -> {self.size} bytes"
        return "contents rewritten (modification time changed)"


class _Source:
    """The open file a store was read from: a descriptor held for the store's life, so that
    `check_unchanged` looks at the very file the maps came from, whatever its name now
    points to."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:  # not blocking on a FIFO: open_h5 refuses anything but a regular file
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as e:
            raise LabelMapError(f"{path}: no such file") from e
        except OSError as e:
            raise LabelMapError(f"{path}: cannot open it ({e.strerror or e})") from e
        self._close = weakref.finalize(self, os.close, self.fd)
        self.identity = self.now()

    def now(self) -> _Identity:
        return _Identity.of(os.fstat(self.fd))

    def check_same_file(self, f: Any) -> None:
        """Refuses when HDF5 read another file than the descriptor's (the name was pointed
        elsewhere meanwhile), or the file changed while the store was being opened."""
        read = os.fstat(f.id.get_vfd_handle())
        now = self.now()
        if (read.st_dev, read.st_ino) != (now.device, now.inode):
            raise LabelMapError(f"{self.path}: the file was replaced while it was being "
                                f"opened; open it again")
        if now != self.identity:
            raise LabelMapError(f"{self.path}: the file was modified in place while it was "
                                f"being opened ({now.changes(self.identity)}); "
                                f"{_REPLACE_ADVICE}")

    def close(self) -> None:
        self._close()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The device of placement "device": checked before anything is read, so that a missing
    GPU is a ValueError that says so rather than torch's error at the copy."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cuda', 'cuda:1' or 'cpu', "
                         f"got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device must be an available device: {str(device)!r} was asked "
                             f"for but CUDA is not available (no NVIDIA GPU or driver); use "
                             f"device='cpu', or placement='mmap' or 'memory'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device must be an available device: {str(device)!r} was asked "
                             f"for but there are {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cuda' (or 'cuda:N') or 'cpu', got {str(device)!r}")
    return device


def _check_placement_memory(header: LabelMapHeader, device: torch.device | None,
                            device_free: int | None) -> None:
    """Refuses to load /values and /indices where there is no room for them: in memory,
    and in the `device_free` bytes of a GPU when given."""
    num_bytes = sum(layout.nbytes for layout in header.layout.values())
    advice = "; open it with placement='mmap'" if header.mmappable else ""
    check_memory(header.path, "datasets /values and /indices", num_bytes, advice=advice)
    if device_free is not None:
        free = device_free
        if num_bytes > free:
            raise LabelMapError(f"{header.path}: datasets /values and /indices need "
                                f"{num_bytes} bytes on {device}, {free} are free{advice}")


def _memmap(source: _Source, name: str, layout: DatasetLayout) -> torch.Tensor:
    if not layout.contiguous:
        raise LabelMapError(
            f"{source.path}: dataset /{name} is stored chunked ({layout.compression or 'no'} "
            f"compression) and cannot be memory-mapped; open it with placement='memory'"
        )
    # The map is made from the descriptor the store keeps: the file checked, whatever the
    # name points to by now.
    with open(source.fd, "rb", closefd=False) as file:
        array = np.memmap(file, dtype=layout.dtype, mode="r", offset=layout.offset,
                          shape=layout.shape)
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


class LabelMapStore:
    """A validated label-map file, loaded with a chosen placement.

    Open with `LabelMapStore.open(path, placement=...)`. Row i of `values`, `indices`,
    `labels` and `paths` belongs to image `paths[i]`.

    A store must be replaced by rename, never modified in place while in use: write the new
    file beside the old one and rename it onto the old name (`dali-relabel index` and the
    writers do so); readers then keep the file they opened. Truncating or overwriting the
    file in place (a `cp` onto it) changes what a memory-mapped store reads, or kills the
    process with SIGBUS. `check_unchanged()` is a cheap check (one fstat) for loaders to run
    at every epoch start and batch.

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
        source: _Source | None = None,
    ) -> None:
        self.path = header.path
        self.placement = placement
        self.header = header
        self.paths = paths
        self.classes = classes
        self._tensors: dict[str, torch.Tensor | None] | None = {
            "values": values, "indices": indices, "labels": labels, "sizes": sizes
        }
        self._source = source

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
                    cache by every process of a node (read-only: never modify the file in
                    place, replace it by rename); needs contiguous datasets.
                "memory": read into ordinary memory.
                "pinned": read into memory page-locked in place at its exact size, for fast
                    host-to-GPU copies; one copy per process (falls back to ordinary memory
                    with a warning when CUDA is unavailable).
                "device": read and moved to `device`.
            device: Target of placement "device"; default "cuda" if available, else "cpu".

        Returns:
            The store.

        Raises:
            ValueError: Invalid placement, `device` given with another placement, or a
                device that is not available (e.g. "cuda" without a GPU).
            LabelMapError: The file is missing, unreadable, corrupt or invalid; placement
                "mmap" on a chunked (compressed) file; CUDA refused to page-lock the data
                ("pinned"); or the file changed while it was being opened.
        """
        _checks.check_choice("placement", placement, PLACEMENTS)
        if device is not None and placement != "device":
            raise ValueError(f"device must be None unless placement='device', got "
                             f"{device!r} with {placement=!r}")
        target = _resolve_device(device) if placement == "device" else None
        path = _checks.check_path_arg("path", path, kind="label-map file")
        pin = placement == "pinned" and torch.cuda.is_available()
        device_free = (torch.cuda.mem_get_info(target)[0]
                       if target is not None and target.type == "cuda" else None)
        source = _Source(path)
        try:
            with opened(path) as f:
                header, paths = read_header_and_paths(f, path)
                if placement == "mmap":
                    values, indices = (_memmap(source, name, header.layout[name])
                                       for name in ("values", "indices"))
                else:
                    _check_placement_memory(header, target, device_free)
                    values, indices = (_loaded(path, name, f[name][()], pin)
                                       for name in ("values", "indices"))
                labels = _loaded(path, "labels", f["labels"][()].astype(np.int64), pin)
                classes = f["classes"].asstr()[()].tolist()
                sizes = (torch.from_numpy(f[SIZES][()].astype(np.int32)) if SIZES in f
                         else None)
                source.check_same_file(f)
        except BaseException:
            source.close()
            raise
        if placement == "pinned" and not pin:
            warnings.warn("placement='pinned' needs CUDA (torch.cuda.is_available() is "
                          "False); keeping the label maps in ordinary memory", stacklevel=2)
        elif placement == "device":
            values, indices, labels = values.to(target), indices.to(target), labels.to(target)
        return cls(header=header, placement=placement, values=values, indices=indices,
                   labels=labels, paths=paths, classes=classes, sizes=sizes, source=source)

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

    def check_unchanged(self) -> None:
        """Checks, cheaply (one fstat of the file the store was read from), that the file
        was not modified in place since it was opened: same size and modification time
        (the file system's timestamp resolution bounds how soon after the open a rewrite of
        the same size shows).

        A memory-mapped store reads the file for every batch: a file rewritten in place
        silently changes the targets, a truncated one kills the process with SIGBUS.
        Loaders call this at every epoch start and per batch. Replacing the file by rename
        (as `dali-relabel index` does) is safe and not reported: the store keeps reading the
        file it opened. A store built from tensors (not opened from a file) has nothing to
        check.

        Raises:
            LabelMapError: Naming the file and saying it was modified in place.
            ValueError: The store is closed.
        """
        if self._tensors is None:
            raise ValueError(f"{self!r} is closed")
        if self._source is None:
            return
        now = self._source.now()
        if now != self._source.identity:
            raise LabelMapError(f"{self.path}: the label-map file was modified in place while "
                                f"in use ({now.changes(self._source.identity)}); its maps can "
                                f"no longer be trusted: {_REPLACE_ADVICE}")

    def validate(self, full: bool = False, *, progress: bool = True) -> None:
        """Re-runs the metadata checks and, with `full`, scans every row.

        The full scan looks for NaN/inf in /values, /indices outside [0, C) and /labels
        outside [-1, C), in chunks of rows.

        Args:
            full: Also scan the data.
            progress: Show a progress bar for the scan (only on a terminal).

        Raises:
            LabelMapError: Listing each problem with its count and first offending rows, or
                saying the file was modified in place since it was opened.
        """
        self.check_unchanged()
        read_header(self.path)
        if full:
            scan_rows(self.path, self.num_classes, len(self), self.values, self.indices,
                      self.labels, progress=progress)

    def close(self) -> None:
        """Drops the store's references to its tensors and closes the file.

        A memory map is released, and page-locked memory unregistered and freed, once no
        tensor taken from it is alive any more.
        """
        self._tensors = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def __enter__(self) -> LabelMapStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
