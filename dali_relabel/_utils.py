"""Small helpers shared by the library's modules: argument checks, the CPU share rule,
atomic writes and the rule for the image paths a label-map file may hold."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "check_output_path",
    "check_positive_int",
    "check_relative_paths",
    "cpu_share",
    "open_rgb_image",
    "relative_path_problem",
    "without_pil_pixel_limit",
]

logger = logging.getLogger(__name__)

# A Windows drive ("C:", "C:\\x") at the start of a path.
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")  # NUL is checked apart
_SHOWN_DUPLICATES = 3

_pil_limit_lock = threading.Lock()


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


def relative_path_problem(path: Any) -> str | None:
    """What makes `path` unfit as an image path under an image root, or None if it is fit.

    An image path is a non-empty str, relative and normalized: '/'-separated components,
    none of them empty, '.' or '..', no leading '/', no backslash at the start, no drive
    ("C:"), and no control characters (a list file holds one path per line, TAB-separated).
    Joined to any root it names a file inside that root.
    """
    if not isinstance(path, str):
        return f"expected a str, found {type(path).__name__}"
    if not path:
        return "empty path"
    if any(ord(char) < 0x20 or char == "\x7f" for char in path):
        return "control character in the path"
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return "absolute path (expected a path relative to the image root)"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"not normalized (component {part!r}; expected 'dir/name' without '', " \
                   "'.' or '..' components)"
    return None


def _maybe_bad(paths: Sequence[Any]) -> bool:
    """False only when every path is fit; a few scans of the joined paths in C, so that
    a million paths take a fraction of a second (the loop naming a bad row is slower)."""
    try:
        joined = "\0".join(paths)
    except TypeError:
        return True
    # Rows delimited by '/' like components: an empty path, a leading or trailing '/' and
    # an empty component all show as "//", and '.' or '..' as "/./" or "/../".
    components = f"/{joined.replace(chr(0), '/')}/"
    return (joined.count("\0") != len(paths) - 1 or _CONTROL.search(joined) is not None
            or "//" in components or "/./" in components or "/../" in components
            or joined.startswith("\\") or "\0\\" in joined
            or (":" in joined and any(_DRIVE.match(path) for path in paths)))


def check_relative_paths(paths: Sequence[Any], name: str = "paths") -> None:
    """Checks image paths with `relative_path_problem` and that they are unique.

    Args:
        paths: The paths, one per row.
        name: What to call them in the message, e.g. "paths" or "file.h5: dataset /paths".

    Raises:
        ValueError: Naming the first bad row, or the first duplicated paths.
    """
    suspect = _maybe_bad(paths)
    for row, path in enumerate(paths if suspect else ()):
        problem = relative_path_problem(path)
        if problem is not None:
            raise ValueError(f"{name}[{row}]: {problem}, found {path!r}")
    if len(set(paths)) != len(paths):
        seen: dict[str, int] = {}
        duplicates = []
        for row, path in enumerate(paths):
            if path in seen:
                duplicates.append(f"rows {seen[path]} and {row}: {path!r}")
                if len(duplicates) == _SHOWN_DUPLICATES:
                    break
            seen.setdefault(path, row)
        raise ValueError(f"{name}: paths must be unique, found {'; '.join(duplicates)}")


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


@contextlib.contextmanager
def without_pil_pixel_limit() -> Iterator[None]:
    """Lifts PIL's decompression-bomb limit for the block (one block at a time), so that
    images of any size open, as DALI (the loaders' and `verify`'s decoder) opens them."""
    from PIL import Image

    with _pil_limit_lock:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def open_rgb_image(path: str) -> Any:
    """Decodes an image file to an RGB PIL image, without applying its EXIF orientation.

    Images of any size are decoded, as DALI (the loaders' and `verify`'s decoder) decodes
    them: PIL's decompression-bomb limit is lifted for this call.

    Raises:
        ValueError: Naming the file and why it cannot be decoded.
    """
    from PIL import Image

    try:
        with without_pil_pixel_limit(), Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e
    except MemoryError as e:
        raise ValueError(f"{path}: cannot read the image (too large to decode in the memory "
                         f"available)") from e
