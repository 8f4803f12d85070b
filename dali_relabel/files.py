"""Files the tools and the trainer write: checked before the work starts, written to a
temporary name and renamed, so that a reader never sees a half-written file and a killed job
leaves nothing behind but a temporary that the next write removes."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import stat
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["OutputError", "atomic_output", "atomic_path", "check_output_path", "open_input",
           "write_failure"]

# What HDF5 and others say, in their own words, when a write meets a full disk or the
# file-size limit (ulimit -f).
_NO_SPACE_SIGNS = ("errno = 28", "errno = 27", "No space left", "File too large")

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


class OutputError(OSError):
    """Writing an output file failed; the message is one line that names the file and says
    why (e.g. "no space left on device")."""


def write_failure(path: str, error: BaseException) -> str:
    """One line on a failed write of `path`: "PATH: writing failed: no space left on device
    (or the file-size limit)" for a full disk or ulimit -f, else the error's first line
    (HDF5's messages run over several)."""
    text = str(getattr(error, "strerror", None) or error).strip()
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
            sign in str(error) for sign in _NO_SPACE_SIGNS):
        return f"{path}: writing failed: no space left on device (or the file-size limit)"
    return f"{path}: writing failed ({text.splitlines()[0] if text else type(error).__name__})"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """`atomic_path` for the tools' outputs: an OSError in the block or at the rename (a
    full disk, the file-size limit, a folder made read-only meanwhile) becomes an
    OutputError of one line naming `path` (see `write_failure`); nothing is left behind."""
    path = os.fspath(path)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(write_failure(path, e)) from e


def open_input(path: str | os.PathLike, *, argument: str, what: str = "file",
               encoding: str = "utf-8") -> IO[str]:
    """Opens a text input file (a list, a name file) for reading, refusing anything but a
    regular file before a read can block: a FIFO would wait for a writer forever.

    Raises:
        ValueError: "{argument}: cannot read the {what} {path} (why)".
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        raise ValueError(f"{argument}: cannot read the {what} {path} "
                         f"({getattr(e, 'strerror', None) or e})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{argument}: cannot read the {what} {path} (not a regular "
                             f"file)")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return open(fd, encoding=encoding)
    except BaseException:
        os.close(fd)
        raise


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
