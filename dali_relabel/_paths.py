"""The rule for the image paths a label-map file and a path list may hold: relative,
normalized, '/'-separated, unique, so that joined to any root each names a file inside it."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["check_relative_paths", "relative_path_problem"]

# A Windows drive ("C:", "C:\\x") at the start of a path.
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")  # NUL is checked apart
_SHOWN_DUPLICATES = 3


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
