"""Small helpers shared by the library's modules: argument checks and the CPU share rule."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["atomic_path", "check_positive_int", "cpu_share"]


def check_positive_int(name: str, value: Any) -> int:
    """`value` as an int; raises ValueError naming `name` unless it is an integer >= 1."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, found {value!r}")
    return int(value)


def cpu_share(limit: int | None = None) -> int:
    """This process's share of the CPUs it may run on (torchrun's local processes split
    them), at least 1 and at most `limit` when given."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, len(os.sched_getaffinity(0)) // max(1, local_world))
    return share if limit is None else min(limit, share)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name beside `path` to write to; renamed onto `path` when the block
    succeeds and removed when it fails, so a reader never sees a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
