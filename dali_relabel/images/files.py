"""Image files on disk: ImageFolder listing, start-up checks and image sizes from headers.

The epoch plan needs every image's height and width before decoding. A label-map file can
store them (/sizes, written by `dali-relabel index`); otherwise they are read here from the
image headers, a few kilobytes per file, in parallel.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dali_relabel._system import cpu_share

__all__ = ["IMAGE_EXTENSIONS", "check_image_files", "find_images", "open_rgb_image",
           "read_image_sizes", "without_pil_pixel_limit"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SHOWN = 5
# EXIF orientations 5-8 rotate by 90 degrees: the decoded image's height and width swap.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Header reads wait on storage more than on the CPU: more threads than cores pay off.
_THREADS_PER_CPU = 4
_MAX_THREADS = 32
_CHUNK = 256

_pil_limit_lock = threading.Lock()


def find_images(image_root: str) -> tuple[list[str], list[str]]:
    """Image files of an ImageFolder tree: (relative paths, class names), both sorted.

    Paths are '/' separated and ordered by class folder, then file name, as torchvision's
    ImageFolder orders them.
    """
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(image_root) if entry.is_dir())
    paths = []
    for name in classes:
        for folder, _, files in sorted(os.walk(os.path.join(image_root, name))):
            relative = os.path.relpath(folder, image_root).replace(os.sep, "/")
            paths.extend(f"{relative}/{file}" for file in sorted(files)
                         if file.lower().endswith(IMAGE_EXTENSIONS))
    return paths, classes


def _problem(entry: os.DirEntry | None) -> str | None:
    """Why a listed path cannot be read as an image file, or None if it can."""
    if entry is None:
        return "missing"
    if entry.is_dir():
        return "a directory"
    if not entry.is_file():
        return "a dangling link" if entry.is_symlink() else "not a regular file"
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
        FileNotFoundError: Naming the count, the first bad paths and what is wrong with them.
    """
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].append(name)
    bad = []
    for folder, names in by_folder.items():
        try:
            with os.scandir(os.path.join(image_root, folder)) as listing:
                entries = {entry.name: entry for entry in listing}
        except (FileNotFoundError, NotADirectoryError):
            entries = {}
        for name in names:
            problem = _problem(entries.get(name))
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
    """(height, width) as a decoder sees the image, or why the header cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if adjust_orientation and image.getexif().get(
                    _EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return height, width


def read_image_sizes(image_root: str, paths: Sequence[str], *,
                     adjust_orientation: bool = False, num_threads: int | None = None,
                     progress: bool = True) -> np.ndarray:
    """Reads every image's (height, width) from its header, in parallel.

    Args:
        image_root: The folder the paths are relative to.
        paths: Relative, '/' separated image paths.
        adjust_orientation: Report the size with the EXIF orientation applied (as DALI
            decodes with adjust_orientation=True); else the size as stored.
        num_threads: Reading threads (default: 4 per CPU of this process's share, at most 32).
        progress: Show a progress bar (on a terminal).

    Returns:
        ndarray[len(paths), 2] int32.

    Raises:
        ValueError: Naming the files whose header cannot be read.
    """
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
                    bad.append(f"{paths[i]} ({result})")
                else:
                    sizes[i] = result
            bar.update(len(results))
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(paths)} images under {image_root!r} have no readable image "
            f"header; first: {', '.join(bad[:_SHOWN])}. Find every bad file with "
            f"`dali-relabel verify` and pass the list as exclude=.")
    return sizes


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
