"""Files the tools and the trainer write: checked before the work starts, written to a
temporary name and renamed, so that a reader never sees a half-written file and a killed job
leaves nothing behind but a temporary that the next write removes."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_path", "check_output_path"]

logger = logging.getLogger(__name__)


def check_output_path(path: Any, *, argument: str, directory: bool = False) -> str:
    """Checks, before any work starts, that an output can be written at `path`.

    Args:
        path: The output file (or folder, with `directory`).
        argument: The argument or option that named it, for messages.
        directory: `path` is a folder the tool creates if needed (with its parents); else a
            file, whose folder must exist.

    Returns:
        The path as a str.

    Raises:
        ValueError: Naming `argument` and the problem: empty, an existing folder where a
            file is expected (or a file where a folder is), a missing or non-writable folder.
    """
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{argument}: expected a {'folder' if directory else 'file'} path, "
                         f"found {path!r}")
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{argument}: {path} exists and is not a folder")
        parent = os.path.abspath(path)
        while not os.path.exists(parent):  # the folder that the tool's makedirs starts in
            parent = os.path.dirname(parent)
    else:
        if os.path.isdir(path):
            raise ValueError(f"{argument}: {path} is a folder; expected a file path")
        if path.endswith(("/", os.sep)):
            raise ValueError(f"{argument}: {path} names a folder; expected a file path")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"{argument}: the folder {parent} of {path} does not exist")
    if not os.path.isdir(parent):
        raise ValueError(f"{argument}: {parent} is not a folder, cannot create {path} in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{argument}: the folder {parent} is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_temporaries(path: str) -> None:
    """Removes the temporaries of `path` left by writers that died (their PID is gone)."""
    prefix = f"{path}.tmp-"
    for tmp in glob.glob(f"{glob.escape(path)}.tmp-*"):
        pid = tmp[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
            logger.info("removed %s, left by an interrupted write", tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside `path` to write to; renamed onto `path` when the block
    succeeds and removed when it fails, so a reader never sees a half-written file.

    The temporary is `f"{path}.tmp-{pid}"`. Temporaries of the same `path` left by a
    process that no longer runs (killed mid-write) are removed first; one writer per target
    is expected, so a live process's temporary is left alone.
    """
    path = os.fspath(path)
    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
