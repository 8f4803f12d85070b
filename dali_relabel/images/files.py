"""Image files on disk: ImageFolder listing, start-up checks and image sizes from headers.

The epoch plan needs every image's height and width before decoding. A label-map file can
store them (/sizes, written by `dali-relabel index`); otherwise they are read here from the
image headers, a few kilobytes per file, in parallel. What counts as a usable image file is
`rule.py`'s one rule, applied by every function here.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from dali_relabel import _checks
from dali_relabel._system import cpu_share
from dali_relabel.images.rule import (
    check_decode_memory,
    file_kind,
    header_of,
    name_problem,
    open_image_file,
    read_image_header,
    without_pil_pixel_limit,
)

__all__ = ["IMAGE_EXTENSIONS", "check_image_files", "find_images", "open_rgb_image",
           "read_image_sizes", "without_pil_pixel_limit"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SHOWN = 5
# Header reads wait on storage more than on the CPU: more threads than cores pay off.
_THREADS_PER_CPU = 4
_MAX_THREADS = 32
_CHUNK = 256


def _folder_error(argument: str, folder: str, error: OSError) -> Exception:
    """The error for a folder that cannot be listed, naming it and why."""
    why = error.strerror or str(error)
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return FileNotFoundError(f"{argument} {folder!r} is not a directory ({why})")
    return ValueError(f"{argument}: cannot list the folder {folder!r} ({why})")


def _listing(items: Sequence[tuple[str, str]]) -> str:
    shown = ", ".join(f"{path!r} ({why})" for path, why in items[:_SHOWN])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "")


def find_images(image_root: str, *,
                skipped: list[tuple[str, str]] | None = None) -> tuple[list[str], list[str]]:
    """Image files of an ImageFolder tree: (relative paths, class names), both sorted.

    Paths are '/' separated and ordered by class folder, then file name, as torchvision's
    ImageFolder orders them. Only files with an image extension that are regular files (or
    links to them) and whose relative path an image list can hold (no TAB, line break or
    other control character) are listed: a FIFO, a device or a dangling link named like an
    image, or a name with a control character, is skipped with a warning that names it, so
    that every tool lists the same images.

    Args:
        image_root: The tree's root: one folder per class.
        skipped: If given, each skipped file is appended as (relative path, why).

    Raises:
        FileNotFoundError: `image_root` is not a directory.
        ValueError: A folder of the tree cannot be listed (no read permission, a name too
            long), named.
    """
    image_root = _checks.check_path_arg("image_root", image_root, kind="folder")
    try:
        with os.scandir(image_root) as listing:
            classes = sorted(entry.name for entry in listing if _is_dir(entry))
    except OSError as e:
        raise _folder_error("image_root", image_root, e) from e
    folders: list[tuple[str, list[os.DirEntry]]] = []
    for name in classes:
        pending = [name]
        while pending:
            relative = pending.pop()
            try:
                with os.scandir(os.path.join(image_root, relative)) as listing:
                    entries = list(listing)
            except OSError as e:
                raise _folder_error("image_root", os.path.join(image_root, relative), e) from e
            # Into real folders only, as os.walk without followlinks.
            pending.extend(f"{relative}/{entry.name}" for entry in entries
                           if entry.is_dir(follow_symlinks=False))
            folders.append((relative, entries))
    paths, refused = [], []
    # Sorted by folder, then name: torchvision's sorted(os.walk(...)) order.
    for relative, entries in sorted(folders, key=lambda item: item[0]):
        for entry in sorted(entries, key=lambda entry: entry.name):
            if entry.is_dir(follow_symlinks=False) or not entry.name.lower().endswith(
                    IMAGE_EXTENSIONS):
                continue
            path = f"{relative}/{entry.name}"
            problem = _entry_problem(entry) or name_problem(path)
            if problem:
                refused.append((path, problem))
            else:
                paths.append(path)
    if refused:
        logger.warning("%s: skipped %d image file(s) that no tool can use: %s", image_root,
                       len(refused), _listing(refused))
        if skipped is not None:
            skipped.extend(refused)
    return paths, classes


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _entry_problem(entry: os.DirEntry) -> str | None:
    """Why a directory entry named like an image is not a regular file, or None."""
    try:
        if entry.is_file():
            return None
        if entry.is_dir():
            return "a directory"
        if entry.is_symlink() and not os.path.exists(entry.path):
            return "a dangling link"
        return f"{file_kind(entry.stat().st_mode)}, not a regular file"
    except OSError as e:
        return f"cannot tell what it is ({e.strerror or e})"


def _problem(entry: os.DirEntry | None) -> str | None:
    """Why a listed path cannot be read as an image file, or None if it can."""
    if entry is None:
        return "missing"
    problem = _entry_problem(entry)
    if problem:
        return problem
    if not os.access(entry.path, os.R_OK):
        return "not readable"
    return None


def check_image_files(image_root: str, paths: Sequence[str], source: str) -> None:
    """Checks that every path names a readable regular file under `image_root`.

    One directory listing per folder, so it takes seconds for ImageNet.

    Args:
        image_root: The folder the paths are relative to.
        paths: Relative, '/' separated image paths.
        source: Where the paths came from, for the message.

    Raises:
        FileNotFoundError: Naming the count, the first bad paths and what is wrong with them
            (missing, a folder that cannot be listed and why, not a regular file, not
            readable).
    """
    try:
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    except ValueError as e:  # a NUL in the name
        raise FileNotFoundError(f"image_root {image_root!r}: {e}") from e
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].append(name)
    bad = []
    for folder, names in by_folder.items():
        unlisted = None
        try:
            with os.scandir(os.path.join(image_root, folder)) as listing:
                entries = {entry.name: entry for entry in listing}
        except (FileNotFoundError, NotADirectoryError):
            entries = {}
        except OSError as e:  # no read permission, a name too long, ...
            entries, unlisted = {}, f"its folder cannot be listed: {e.strerror or e}"
        for name in names:
            problem = unlisted or _problem(entries.get(name))
            if problem:
                bad.append(f"{folder}/{name} ({problem})" if folder else f"{name} ({problem})")
    if bad:
        hint = (" (no listed image exists: is image_root the folder the store's /paths are "
                "relative to?)" if len(bad) == len(paths) else "")
        raise FileNotFoundError(
            f"{len(bad)} of {len(paths)} images listed in {source} are missing or not "
            f"readable files under {image_root!r}{hint}; first: {', '.join(bad[:_SHOWN])}. "
            "Pass exclude= to train without them.")


def _header_size(path: str, adjust_orientation: bool) -> tuple[int, int] | str:
    """(height, width) as a decoder sees the image, or why the file is not a usable
    image (see `rule.py`)."""
    try:
        return read_image_header(path, orientation=adjust_orientation).size(adjust_orientation)
    except ValueError as error:
        return str(error).removeprefix(f"{path}: ")


def read_image_sizes(image_root: str, paths: Sequence[str], *,
                     adjust_orientation: bool = False, num_threads: int | None = None,
                     progress: bool = True) -> np.ndarray:
    """Reads every image's (height, width) from its header, in parallel.

    Every file is held to the rule of `rule.py` (a regular file, in a format the loaders
    decode), as the other tools hold it.

    Args:
        image_root: The folder the paths are relative to.
        paths: Relative, '/' separated image paths.
        adjust_orientation: Report the size with the EXIF orientation applied (as DALI
            decodes with adjust_orientation=True); else the size as stored.
        num_threads: Reading threads, >= 1 (default: 4 per CPU of this process's share, at
            most 32).
        progress: Show a progress bar (on a terminal).

    Returns:
        ndarray[len(paths), 2] int32.

    Raises:
        ValueError: A bad num_threads, or naming the files whose header cannot be read.
    """
    if num_threads is not None:
        _checks.check_int("num_threads", num_threads, 1)
    threads = num_threads or min(_MAX_THREADS, _THREADS_PER_CPU * cpu_share())
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    bad = []
    starts = range(0, len(paths), _CHUNK)

    def read_chunk(start: int) -> list[tuple[int, int] | str]:
        return [_header_size(os.path.join(image_root, path), adjust_orientation)
                for path in paths[start:start + _CHUNK]]

    with without_pil_pixel_limit(), concurrent.futures.ThreadPoolExecutor(threads) as pool, \
            tqdm(total=len(paths), unit="img", desc="reading image sizes",
                 disable=None if progress else True) as bar:
        for start, results in zip(starts, pool.map(read_chunk, starts)):
            for i, result in enumerate(results, start):
                if isinstance(result, str):
                    bad.append(f"{paths[i]!r} ({result})")
                else:
                    sizes[i] = result
            bar.update(len(results))
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(paths)} images under {image_root!r} have no readable image "
            f"header (or are not usable image files); first: {', '.join(bad[:_SHOWN])}. Find "
            f"every bad file with `dali-relabel verify` and pass the list as exclude=.")
    return sizes


def open_rgb_image(path: str) -> Any:
    """Decodes an image file to an RGB PIL image, without applying its EXIF orientation.

    The file is held to the rule of `rule.py`: a regular file (never blocking on a FIFO),
    in a format the loaders decode, whose declared size fits in the memory available
    (checked before decoding). Images of any size that fits are decoded, as DALI (the
    loaders' and `verify`'s decoder) decodes them: PIL's decompression-bomb limit is lifted
    for this call.

    Raises:
        ValueError: Naming the file and why it cannot be decoded.
    """
    from PIL import Image

    with open_image_file(path) as file:
        try:
            with without_pil_pixel_limit(), Image.open(file) as image:
                check_decode_memory(header_of(path, image))
                return image.convert("RGB")
        except ValueError as e:
            if str(e).startswith(f"{path}: "):
                raise
            raise ValueError(f"{path}: cannot read the image ({e})") from e
        except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot read the image ({e})") from e
        except MemoryError as e:
            raise ValueError(f"{path}: cannot read the image (too large to decode in the "
                             f"memory available)") from e
