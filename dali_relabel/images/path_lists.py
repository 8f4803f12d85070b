"""Path lists: the files `dali-relabel verify` writes and ``exclude=`` reads.

One image per line, its relative path, then optionally a TAB and the reason; lines that start
with '#' are comments. A path may hold '#' and spaces, so nothing else is cut.
"""
import os
from typing import List, Sequence, Tuple, Union

from dali_relabel._paths import relative_path_problem
from dali_relabel.files import atomic_output, open_input

__all__ = ["read_path_list", "write_bad_list"]


def write_bad_list(path: str, bad: Sequence[Tuple[str, str]]) -> None:
    """Write the bad images as a path list (atomically): one per line, the relative path, a
    TAB and the reason (with any line break in the reason turned into a space).

    Args:
        path: The list file to write.
        bad: (relative path, reason) pairs, as `verify_images` returns them.

    Raises:
        ValueError: A path that the list cannot hold (see `relative_path_problem`).
        OutputError: Writing failed (e.g. no space left): one line naming the file; the
            file is left as it was.
    """
    lines = ["# images that failed to decode (dali-relabel verify): path TAB reason; "
             "pass as exclude=\n"]
    for image, reason in bad:
        problem = relative_path_problem(image)
        if problem is not None:
            raise ValueError(f"bad: {problem}, found {image!r}")
        lines.append(f"{image}\t{' '.join(reason.split())}\n")
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def read_path_list(exclude: Union[None, str, os.PathLike, Sequence[str]]) -> List[str]:
    """Relative image paths from a path list file, or from a sequence of paths.

    A file holds one image per line: the relative path, then optionally a TAB and anything
    (the reason `write_bad_list` wrote). Blank lines and lines whose first character is '#'
    are skipped; a '#' elsewhere is part of the path.

    Args:
        exclude: None (no paths), a list file, or the paths themselves.

    Returns:
        The paths, in the order given.

    Raises:
        ValueError: The file is missing or unreadable, or a line holds no relative,
            normalized path (both named).
    """
    if exclude is None:
        return []
    if not isinstance(exclude, (str, os.PathLike)):
        return [str(path) for path in exclude]
    # A FIFO is refused, not waited on.
    with open_input(exclude, argument="exclude", what="path list") as f:
        try:
            lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"exclude: cannot read the path list {os.fspath(exclude)} "
                             f"({getattr(e, 'strerror', None) or e})") from e
    paths = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        path = line.split("\t", 1)[0]
        problem = relative_path_problem(path)
        if problem is not None:
            raise ValueError(f"exclude: {os.fspath(exclude)} line {number}: {problem}, found "
                             f"{path!r}")
        paths.append(path)
    return paths
