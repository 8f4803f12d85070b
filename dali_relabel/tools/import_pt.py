"""Import the official ReLabel release (naver-ai/relabel_imagenet) into one label-map file.

Yun et al. ("Re-labeling ImageNet: from Single to Multi-Labels, from Global to Localized
Labels", CVPR 2021) released their ImageNet label maps as a tree shaped like the ImageNet
train folder, one `.pt` tensor per image: `SRC/n01440764/n01440764_10026.pt` holds the maps
of `train/n01440764/n01440764_10026.JPEG` as a tensor [2, K, H, W] = [2, 5, 15, 15]:
[0] the top-k values (logits), [1] their class indices (stored as numbers of the same dtype).

Layouts. The official training code builds the crop box as (y1, x1, y2, x2) and hands it to
torchvision's roi_align, which reads (x1, y1, x2, y2): the official targets sample row
x and column y of the stored map. This project's LabelPooling has one convention (rows =
the image's vertical axis), so layout "official" (the default) stores every map transposed
(H and W swapped): the targets of this project's loaders then equal the official training
targets exactly. Layout "hw" stores the maps as given, for trees that follow the picture's
orientation.

The rows follow the ImageFolder order of the image tree; an image `DIR/NAME.EXT` matches
`SRC/DIR/STEM.pt` with STEM = NAME up to its first '.', as the official loader looks it up.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

import dali_relabel
from dali_relabel import _checks
from dali_relabel.files import check_output_path
from dali_relabel.images.files import find_images, read_image_sizes
from dali_relabel.images.rule import file_kind, name_problem
from dali_relabel.labelmaps.writer import LabelMapWriter
from dali_relabel.tools.jobs import (
    PARTIAL_SUFFIX,
    check_complete,
    check_resumable,
    default_workers,
    utc_now,
)

__all__ = ["LAYOUTS", "ImportReport", "import_pt", "pt_path"]

logger = logging.getLogger(__name__)

LAYOUTS = ("official", "hw")
_CHUNK = 1024
_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What an import matched.

    Attributes:
        rows: Images written (those that have a map).
        images_without_maps: Relative paths of images that have no `.pt` file.
        maps_without_images: Relative paths (under SRC) of `.pt` files with no image.
        complete_before: Whether an earlier run of the same import had already completed
            the output (and nothing was written now).
    """

    rows: int
    images_without_maps: list[str]
    maps_without_images: list[str]
    complete_before: bool = False


def pt_path(image_path: str) -> str:
    """The relative `.pt` path of a relative image path, as the official loader forms it."""
    folder, _, name = image_path.rpartition("/")
    stem = name.split(".", 1)[0]
    return f"{folder}/{stem}.pt" if folder else f"{stem}.pt"


def _find_maps(src: str) -> set[str]:
    """The relative paths of the `.pt` files under `src` that are regular files (or links
    to them) with names an image list can hold; others are skipped with a warning (a FIFO
    would block torch.load forever)."""
    if not os.path.isdir(src):
        raise ValueError(f"src {src}: not a directory")
    found, skipped = set(), []

    def refuse(error: OSError) -> None:
        raise ValueError(f"src: cannot list the folder {error.filename!r} "
                         f"({error.strerror or error})") from error

    for folder, _, files in os.walk(src, onerror=refuse):
        relative = os.path.relpath(folder, src).replace(os.sep, "/")
        prefix = "" if relative == "." else f"{relative}/"
        for name in files:
            if not name.endswith(".pt"):
                continue
            path = os.path.join(folder, name)
            try:
                problem = None if os.path.isfile(path) else (
                    f"{file_kind(os.stat(path).st_mode)}, not a regular file")
            except OSError as e:
                problem = f"cannot tell what it is ({e.strerror or e})"
            problem = problem or name_problem(prefix + name)
            if problem:
                skipped.append(f"{prefix + name!r} ({problem})")
            else:
                found.add(prefix + name)
    if skipped:
        logger.warning("%s: skipped %d .pt file(s) that cannot be read: %s", src, len(skipped),
                       _listing(skipped))
    return found


def _listing(paths: Sequence[str]) -> str:
    more = f", ... ({len(paths)} in all)" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


def _read_map(path: str, *, layout: str, num_classes: int,
              shape: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One official map as (values float32 [K, H, W], indices int64 [K, H, W]), in `layout`.

    Raises:
        ValueError: Naming the file and what is wrong with it.
    """
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a damaged file
        raise ValueError(f"{path}: cannot load it with torch.load ({e})") from e
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[0] != 2:
        found = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{path}: expected a tensor [2, K, H, W] (values, class indices), "
                         f"found {found}")
    if min(tensor.shape[1:]) < 1:
        raise ValueError(f"{path}: expected a tensor [2, K, H, W] with K, H, W >= 1 (at least "
                         f"one class per cell), found {list(tensor.shape)}")
    if shape is not None and tuple(tensor.shape[1:]) != shape:
        raise ValueError(f"{path}: expected [2, {shape[0]}, {shape[1]}, {shape[2]}] like the "
                         f"other maps, found {list(tensor.shape)}")
    values, indices = tensor[0].float(), tensor[1]
    if indices.is_floating_point():
        if not bool(torch.all(indices == indices.round())):
            raise ValueError(f"{path}: the class indices [1] are not whole numbers")
    indices = indices.long()
    if int(indices.min()) < 0 or int(indices.max()) >= num_classes:
        raise ValueError(f"{path}: class indices in [{int(indices.min())}, "
                         f"{int(indices.max())}], expected [0, {num_classes}); pass the "
                         "release's class names (--classes FILE) if the image tree holds "
                         "only some of the classes")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{path}: the values [0] hold NaN or inf")
    if layout == "official":
        values, indices = values.transpose(1, 2), indices.transpose(1, 2)
    return values.contiguous(), indices.contiguous()


def import_pt(
    src: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str = "official",
    classes: Sequence[str] | None = None,
    strict: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> ImportReport:
    """Converts a tree of official `.pt` label maps into one label-map file.

    Only images with a map are written (with `strict`, any mismatch refuses the import).
    An interrupted import continues when rerun with the same arguments.

    Args:
        src: Root of the `.pt` tree (the extracted relabel_imagenet.tar).
        image_root: The matching ImageFolder root (e.g. ImageNet's train folder).
        out: The label-map file to write; must not exist yet, unless an earlier run of the
            same import completed it: then nothing is written (`complete_before`).
        layout: "official" (store each map transposed, so that the targets equal the
            official training code's) or "hw" (store as given).
        classes: Class names in the maps' index order. Default: the class folders of
            `image_root` (ImageNet's sorted synsets, the release's order).
        strict: Refuse when an image has no map or a map has no image.
        num_workers: Threads reading `.pt` files, >= 1 (default: this process's share of
            the CPUs, at most 8).
        progress: Show a progress bar (on a terminal).

    Returns:
        What was matched, and what was not.

    Raises:
        ValueError: A bad argument, a mismatch under `strict`, a malformed `.pt` file (named),
            or an earlier partial import made with other arguments.
        FileNotFoundError: image_root is not a directory.
    """
    _checks.check_choice("layout", layout, LAYOUTS)
    if num_workers is None:
        num_workers = default_workers()
    _checks.check_int("num_workers", num_workers, 1)
    src = _checks.check_path_arg("src", src, kind="folder")
    image_root = _checks.check_path_arg("image_root", image_root, kind="folder")
    out = check_output_path(out, argument="out")
    maps = _find_maps(src)
    images, folders = find_images(image_root)
    names = list(classes) if classes is not None else folders
    by_map: dict[str, str] = {}
    for image in images:
        key = pt_path(image)
        if key in by_map:
            raise ValueError(f"image_root: {by_map[key]} and {image} would both use the map "
                             f"{key}; keep one of them")
        by_map[key] = image
    matched = [image for image in images if pt_path(image) in maps]
    report = ImportReport(rows=len(matched),
                          images_without_maps=[i for i in images if pt_path(i) not in maps],
                          maps_without_images=sorted(maps - by_map.keys()))
    for what, missing in (("images without a map", report.images_without_maps),
                          (f"maps under {src} without an image", report.maps_without_images)):
        if missing:
            logger.warning("%d %s: %s", len(missing), what, _listing(missing))
    unmatched = report.images_without_maps + report.maps_without_images
    if strict and unmatched:
        raise ValueError(f"strict: {len(report.images_without_maps)} images without a map and "
                         f"{len(report.maps_without_images)} maps without an image; first: "
                         f"{_listing(unmatched)}")
    if not matched:
        example = (f"; e.g. the map of {images[0]} would be {os.path.join(src, pt_path(images[0]))}"
                   if images else "")
        raise ValueError(f"src: no .pt file under {src} matches an image under "
                         f"{image_root}{example}")

    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index.get(path.split("/", 1)[0], -1) for path in matched],
                      dtype=np.int64)
    files = [os.path.join(src, pt_path(path)) for path in matched]
    first_values, _ = _read_map(files[0], layout="hw", num_classes=len(names), shape=None)
    topk, height, width = first_values.shape
    if layout == "official" and height != width:
        raise ValueError(f"layout: 'official' reproduces the official targets only for square "
                         f"maps (the official code scales both box axes by the map's width); "
                         f"{files[0]} is {height} x {width}; use --layout hw")
    identity = dict(source="naver-ai/relabel_imagenet .pt", layout=layout,
                    source_dir=os.path.abspath(src))
    if os.path.lexists(out):
        # An earlier run of this very import finished it (and was stopped before it said so).
        check_complete(out, paths=matched, identity=identity, argument="out")
        logger.info("%s: complete from an earlier run of the same import; nothing to do", out)
        return dataclasses.replace(report, complete_before=True)
    earlier = check_resumable(out + PARTIAL_SUFFIX, paths=matched, identity=identity)
    date = earlier["date"] if earlier and "date" in earlier else utc_now()
    # The images' sizes (from their headers) go to /sizes, for the loaders' crop planning.
    sizes = read_image_sizes(image_root, matched, progress=progress)
    with LabelMapWriter(out, num_rows=len(matched), num_classes=len(names), topk=topk,
                        height=height, width=width, classes=names, with_sizes=True,
                        **identity, date=date,
                        software=f"dali-relabel {dali_relabel.__version__} import-pt") as writer:
        todo = writer.missing()
        if writer.num_written:
            logger.info("%s: resuming, %d of %d maps already imported", out,
                        writer.num_written, len(matched))

        def read(rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
            loaded = [_read_map(files[row], layout=layout, num_classes=len(names),
                                shape=(topk, height, width)) for row in rows]
            return (rows, torch.stack([values for values, _ in loaded]),
                    torch.stack([indices for _, indices in loaded]))

        chunks = [todo[start:start + _CHUNK] for start in range(0, len(todo), _CHUNK)]
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool, tqdm(
                total=len(matched), initial=writer.num_written, unit="map", desc="import-pt",
                disable=None if progress else True) as bar:
            # Chunks are read in parallel and written in order; at most two per thread are
            # in flight, which bounds the memory held.
            pending: collections.deque = collections.deque()
            for chunk in [*chunks, None]:
                if chunk is not None:
                    pending.append(pool.submit(read, chunk))
                while pending and (chunk is None or len(pending) >= 2 * num_workers):
                    rows, values, indices = pending.popleft().result()
                    writer.write(rows, values, indices, labels[rows],
                                 [matched[row] for row in rows], sizes=sizes[rows])
                    bar.update(len(rows))
    return report
