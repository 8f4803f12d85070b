"""What makes a file a usable image: one rule, for every tool and the loaders' checks.

A usable image is

- listed under a name that a label-map file and a path list can hold (relative, no control
  characters: see `relative_path_problem`);
- a regular file (or a link to one): a FIFO named `x.JPEG` would block its reader forever,
  a device would never end;
- readable and not empty;
- in a format the loaders' decoder (DALI's) decodes, told by its content, not its name:
  JPEG (MPO too), PNG, BMP, TIFF, PNM (PPM, PGM, PBM), JPEG 2000 and WebP. Checked with
  DALI 2.4 on these very formats: GIF, ICO, TGA and PCX files fail to decode, while a
  1 x 1 pixel JPEG, PNG, BMP, TIFF or WebP decodes;
- small enough to decode in the memory available: its header declares its size, checked
  before any pixel is decoded (a 1 kB file may declare 30000 x 30000 pixels).

`dali-relabel verify` also decodes every file with DALI itself: a truncated or corrupt file
passes this rule and fails there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from dali_relabel import _system
from dali_relabel._paths import relative_path_problem

__all__ = ["DALI_FORMATS", "ImageHeader", "check_decode_memory", "decode_bytes", "file_kind",
           "header_of", "name_problem", "open_image_file", "read_image_header",
           "without_pil_pixel_limit"]

# PIL's format names of what DALI decodes, with the name a message gives.
DALI_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF",
                "PPM": "PNM", "JPEG2000": "JPEG 2000", "WEBP": "WebP"}
# EXIF orientations 5-8 rotate by 90 degrees: the decoded image's height and width swap.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Bytes per pixel of a decoded PIL image by mode (RGB is kept as 4 bytes), and of the RGB
# copy every tool converts it to.
_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "I;16": 2, "I;16B": 2,
                    "I;16L": 2, "I": 4, "F": 4, "RGB": 4, "RGBA": 4, "RGBX": 4, "CMYK": 4,
                    "YCbCr": 4, "LAB": 4, "HSV": 4}
_RGB_PIXEL_BYTES = 4

# without_pil_pixel_limit's blocks in progress (in any thread) and the limit they lifted.
_pil_limit_lock = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: int | None = None


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, after the rule's checks.

    Attributes:
        path: The file.
        format: PIL's name of the format, e.g. "JPEG".
        width: Width in pixels, as stored.
        height: Height in pixels, as stored.
        mode: PIL's mode of the decoded pixels, e.g. "RGB".
        transposed: Whether its EXIF orientation swaps height and width (False when the
            orientation was not read).
    """

    path: str
    format: str
    width: int
    height: int
    mode: str
    transposed: bool

    def size(self, adjust_orientation: bool = False) -> tuple[int, int]:
        """(height, width) as a decoder sees it, with or without the EXIF orientation."""
        if adjust_orientation and self.transposed:
            return self.width, self.height
        return self.height, self.width


def name_problem(relative: str) -> str | None:
    """Why an image cannot be listed under the relative path `relative` (a label-map file
    and a path list cannot hold it: a TAB or a line break in a name), or None."""
    problem = relative_path_problem(relative)
    return None if problem is None else f"a name no image list can hold ({problem})"


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a FIFO", "a directory", ..."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def open_image_file(path: str) -> BinaryIO:
    """Opens an image file for reading, refusing anything but a regular file before a read
    can block (a FIFO would wait for a writer forever).

    Raises:
        ValueError: Naming the file and the problem: missing, not readable, a name too
            long, not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the image ({e.strerror or e})") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: {file_kind(mode)}, not an image file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def without_pil_pixel_limit() -> Iterator[None]:
    """Lifts PIL's decompression-bomb limit while the block runs, so that images of any size
    open, as DALI (the loaders' and `verify`'s decoder) opens them; the memory an image
    needs is checked by `check_decode_memory` instead. Blocks may nest and run in several
    threads at once: the limit comes back when the last one ends."""
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def header_of(path: str, image: Image.Image, *, orientation: bool = False) -> ImageHeader:
    """The checked header of an image PIL opened from `path`; with `orientation`, its EXIF
    orientation is read too.

    Raises:
        ValueError: A format DALI does not decode (named), or no pixels.
    """
    if image.format not in DALI_FORMATS:
        raise ValueError(f"{path}: a {image.format or 'unknown'} image (by its content), which "
                         f"the loaders' decoder does not decode; expected "
                         f"{', '.join(sorted(set(DALI_FORMATS.values())))}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{path}: the image declares {width} x {height} pixels")
    transposed = orientation and image.getexif().get(
        _EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS
    return ImageHeader(path=path, format=image.format, width=width, height=height,
                       mode=image.mode, transposed=bool(transposed))


def read_image_header(path: str, *, orientation: bool = True) -> ImageHeader:
    """Reads an image file's header (a few kB) and applies the rule to it: a regular,
    non-empty file in a format the loaders decode. Any declared size is read (PIL's
    decompression-bomb limit is lifted meanwhile): `check_decode_memory` judges it.
    `orientation=False` skips reading the EXIF orientation.

    Raises:
        ValueError: Naming the file and the problem.
    """
    with open_image_file(path) as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ValueError(f"{path}: empty file (0 bytes)")
        try:
            with without_pil_pixel_limit(), Image.open(file) as image:
                return header_of(path, image, orientation=orientation)
        except (UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot read the image header ({e})") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            if isinstance(e, ValueError) and str(e).startswith(path):
                raise
            raise ValueError(f"{path}: cannot read the image header ({type(e).__name__}: "
                             f"{e})") from e


def decode_bytes(width: int, height: int, mode: str) -> int:
    """About the memory decoding an image of that size and PIL mode takes, with the RGB
    copy the tools make of it."""
    return width * height * (_PIL_PIXEL_BYTES.get(mode, 4) + _RGB_PIXEL_BYTES)


def check_decode_memory(header: ImageHeader) -> None:
    """Refuses, before decoding, an image whose declared size does not fit in the memory
    available (see `_system.available_memory`).

    Raises:
        ValueError: One line naming the file, its declared size and the memory.
    """
    need = decode_bytes(header.width, header.height, header.mode)
    available = _system.available_memory()
    if need > available:
        raise ValueError(f"{header.path}: the image declares {header.width} x {header.height} "
                         f"pixels; decoding it needs about {_system.format_bytes(need)} of "
                         f"memory, {_system.format_bytes(available)} are available")
