"""Bookkeeping shared by the jobs that make label-map files (annotate, import-pt).

Making the ReLabel label maps of a dataset (Yun et al., "Re-labeling ImageNet: from Single to
Multi-Labels, from Global to Localized Labels", CVPR 2021) runs for hours, so both jobs write
through the resumable `LabelMapWriter`. The writer checks that a partial file has the same
geometry and classes; this module adds the checks that make resuming safe for a whole job:
the rows already written belong to the same images, and were made the same way (same model,
same checkpoint, same layout, ...), so one file never mixes two kinds of maps.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dali_relabel._system import cpu_share
from dali_relabel.files import open_input
from dali_relabel.labelmaps.format import (
    H5_ERRORS,
    WRITTEN,
    LabelMapError,
    dataset,
    open_h5,
    plain,
    read_header,
)

__all__ = ["PARTIAL_SUFFIX", "check_complete", "check_resumable", "default_workers",
           "read_name_list", "unwritten_rows", "utc_now"]

# LabelMapWriter keeps an unfinished file at f"{path}{PARTIAL_SUFFIX}".
PARTIAL_SUFFIX = ".partial"
_SHOWN = 5
_MAX_WORKERS = 8


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, for the `date` provenance attribute."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_workers() -> int:
    """Loading workers for this process: its share of the CPUs (torchrun's local processes
    split them), at most 8."""
    return cpu_share(_MAX_WORKERS)


def read_name_list(path: str | os.PathLike, *, argument: str) -> list[str]:
    """Names from a text file, one per line; blank lines and lines that start with '#'
    are skipped (a '#' elsewhere belongs to the name).

    Args:
        path: The file.
        argument: The option that named the file, for messages.

    Raises:
        ValueError: The file is missing, unreadable or lists no names.
    """
    with open_input(path, argument=argument) as f:  # a FIFO is refused, not waited on
        try:
            names = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{argument}: cannot read the file {path} "
                             f"({getattr(e, 'strerror', None) or e})") from e
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise ValueError(f"{argument}: the file {path} lists no names")
    return names


def check_resumable(
    path: str | os.PathLike,
    *,
    paths: Sequence[str],
    identity: dict[str, str | int | float],
) -> dict[str, Any] | None:
    """Checks that a file left by an earlier run of the same job may be continued.

    `path` is a finished file or a writer's partial file. Its written rows must list the same
    image paths as `paths` at the same rows, and its root attributes must equal `identity`
    (the settings that decide what a row holds).

    Args:
        path: The file to check.
        paths: The image path of every row of the job, in row order.
        identity: Provenance attributes that must match, e.g. {"model": "resnet50"}.

    Returns:
        The file's root attributes, or None when `path` does not exist.

    Raises:
        ValueError: The file cannot be continued; the message says why and how to restart.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    restart = f"delete {path} to start again, or rerun with the earlier settings"
    with open_h5(path) as f:  # a lock held by another process is reported as such
        try:
            attrs = {key: plain(value) for key, value in f.attrs.items()}
            stored = dataset(f, path, "paths").asstr()[()]  # in the file: no link followed
            written = _written(f, path, len(stored))
        except H5_ERRORS as e:
            raise LabelMapError(f"{path}: cannot read the file left by an earlier run ({e}); "
                                f"delete it to start again") from e
    changed = [f"{key}={attrs.get(key)!r} (now {value!r})" for key, value in identity.items()
               if attrs.get(key) != value]
    if changed:
        raise ValueError(f"{path}: an earlier run made it with {', '.join(changed)}; {restart}")
    if len(stored) != len(paths):
        raise ValueError(f"{path}: an earlier run listed {len(stored)} images, now there are "
                         f"{len(paths)} (the image folder changed); {restart}")
    expected = np.array(list(paths), dtype=object)
    moved = np.flatnonzero(written & (stored != expected))
    if len(moved):
        first = ", ".join(f"row {row}: {stored[row]} (now {expected[row]})"
                          for row in moved[:_SHOWN])
        raise ValueError(f"{path}: {len(moved)} written rows belong to other images than "
                         f"now (the image folder changed); first: {first}; {restart}")
    return attrs


def unwritten_rows(path: str | os.PathLike, num_rows: int) -> np.ndarray:
    """The rows a writer's partial file still lacks (all when it does not exist), read
    without keeping the file open: a job forks its loading workers before it opens the
    file, since forked processes inherit HDF5's lock on it.

    Args:
        path: The partial file (checked with `check_resumable` first).
        num_rows: Rows of the job.

    Returns:
        Row ids, ascending (int64).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return np.arange(num_rows)
    with open_h5(path) as f:
        try:
            return np.flatnonzero(~_written(f, path, num_rows))
        except H5_ERRORS as e:
            raise LabelMapError(f"{path}: cannot read the file left by an earlier run ({e}); "
                                f"delete it to start again") from e


def _written(f: Any, path: str, num_rows: int) -> np.ndarray:
    """The /written mask of an open file (all True for a finished file), as bool [N]."""
    if WRITTEN not in f:
        return np.ones(num_rows, dtype=bool)
    written = dataset(f, path, WRITTEN)
    if written.shape != (num_rows,):
        raise KeyError(f"/written holds {written.shape} rows, expected ({num_rows},)")
    return written[()].astype(bool)


def check_complete(path: str | os.PathLike, *, paths: Sequence[str],
                   identity: dict[str, str | int | float], argument: str) -> None:
    """Checks that `path`, which exists, is the finished output of this very job: a valid,
    complete label-map file of the same images, made the same way. A job killed after its
    output was renamed into place, but before it said so, is then complete when rerun.

    Raises:
        ValueError: `path` is something else ("{argument}: {path} exists ..."); the message
            says why and to remove it.
    """
    path = os.fspath(path)
    try:
        check_resumable(path, paths=paths, identity=identity)
        read_header(path)  # valid, and every row written
    except ValueError as e:
        raise ValueError(f"{argument}: {path} exists and is not the finished output of this "
                         f"job ({e}); remove it or choose another path") from e
