"""The embedded default dataset: a synthetic ImageNet in miniature with exact label maps.

ReLabel (Yun et al., "Re-labeling ImageNet: from Single to Multi-Labels, from Global to
Localized Labels", CVPR 2021) starts from two observations: ImageNet images often hold several
objects, and a random crop often misses the one the single label names. A localized
multi-label map then gives every crop its own right target. This module builds a small
dataset on which that premise holds by construction and the label maps are known exactly, so
the loaders, the trainer and the paper's factor analysis run without ImageNet, without an
annotator and without a GPU.

Scenes: every image holds 1-4 objects (`objects`) of distinct classes at random places and
sizes (`main_side` for the labelled one, `other_side` for the others; they may overlap, later
ones hide earlier ones) on a textured background (smooth low-saturation colour
blotches plus pixel noise). Width and height are drawn independently from `image_size`, so the
label map is stretched over the image as an annotator's whole-image 475x475 resize stretches
it. Files are real JPEGs (PIL, quality 90) in ImageFolder layout.

Classes: class i is (shape, colour, texture) = (SHAPES[i % 7], COLOURS[i % 8],
TEXTURES[i % 5]); the three lengths are coprime, so 280 classes are distinct and any two of
the first 35 differ in at least two of the three attributes. A class is named after them,
e.g. "c00_red_plain_disc"; the fixed-width index prefix makes sorted names index order.

Original label: the class of the object with the largest visible area, as ImageNet's label
names the main object. Scenes are drawn so that it is the largest by a margin of 25% and every
object keeps at least half of its area visible; the image lies in that class's folder.

Label maps: the map's map_size x map_size cells split the image evenly (cell rows follow the
image's vertical axis, as docs/design.md defines). coverage[c, h, w] is the visible area of
class c inside cell (h, w) over the cell's area, exact from the pixel masks (each pixel a unit
square). The stored logits are LOGIT_SCALE * coverage; a class absent from a cell has logit 0,
as every class outside the top-k has after densifying. With LOGIT_SCALE = 10 a crop lying
inside one object gets the target weight e^10 / (e^10 + C - 1), 0.9996 for C = 10; a crop
covering a fraction f of an object gives it logit 10 f; a crop of background alone gets the
uniform target. Pooled over the whole image (the mean of the cells) the largest logit is the
original label's whenever topk >= 4 (the default is 5), so "global_single" targets equal
"original" ones here, as in the paper's factor analysis. The top-k classes of every cell are
stored (ties broken towards lower class indices), in the HDF5 format of `dali_relabel.labelmaps`.

Validation: the same generator with its own seed stream; folder = original label; the full
label set (sorted class indices present in each image) goes to a JSON list of lists in sorted
file order, the format of the public ReaL labels.

Randomness: image n of class c in a split draws from its own generator seeded with
(seed, split, c, n), so the same seed gives byte-identical JPEGs, and an image does not
depend on how many others are made. The defaults (800 images) take 2-3 s in one process.

Layout (the whole folder is built under a temporary name and renamed into place;
manifest.json is written last):

    root/train/<class>/train_<n>.JPEG     root/val/<class>/val_<n>.JPEG
    root/train_labelmaps.h5               root/val_real_labels.json       root/manifest.json
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dali_relabel import _checks
from dali_relabel.files import OutputError, open_input, write_failure
from dali_relabel.labelmaps.writer import write_labelmaps
from dali_relabel.tools.jobs import utc_now

__all__ = [
    "COLOURS",
    "LOGIT_SCALE",
    "MAX_CLASSES",
    "SHAPES",
    "TEXTURES",
    "SyntheticDataset",
    "class_names",
    "default_cache_dir",
    "make_synthetic_imagenet",
]

logger = logging.getLogger(__name__)

GENERATOR = "dali_relabel.tools.synthetic"
# Part of the parameters (and so of the cache folder's name): bump when the files change
# (3: the label-map file records the image sizes).
GENERATOR_VERSION = 3
# Stored logit = LOGIT_SCALE * coverage of the cell by the class (see the module docstring).
LOGIT_SCALE = 10.0
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "star")
COLOURS = {
    "red": (225, 35, 35),
    "green": (30, 185, 50),
    "blue": (45, 75, 235),
    "yellow": (240, 215, 30),
    "magenta": (215, 40, 215),
    "cyan": (30, 210, 225),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
}
TEXTURES = ("plain", "striped", "checked", "dotted", "gridded")
MAX_CLASSES = math.lcm(len(SHAPES), len(COLOURS), len(TEXTURES))
MIN_IMAGE_SIDE = 32
JPEG_QUALITY = 90
# Default scenes: objects per image, and object sides over the image's shorter side for the
# labelled (largest) object and for the others.
OBJECTS = (1, 4)
MAIN_SIDE = (0.5, 0.85)
OTHER_SIDE = (0.22, 0.5)
# The labelled object's visible area exceeds every other one's by this factor, and every
# object keeps at least MIN_VISIBLE of its own area visible.
LARGEST_MARGIN = 1.25
MIN_VISIBLE = 0.5
# Failed draws before a scene is retried with one object fewer (one object always succeeds).
ATTEMPTS_PER_OBJECT = 8
# Texture: the darker pixels of a pattern are the colour times DARK.
DARK = 0.45
# Background: grey level, blotch contrast (grey and tint), blotch size (px), pixel noise.
BACKGROUND_GREY = (60.0, 170.0)
BACKGROUND_CONTRAST = 30.0
BACKGROUND_TINT = 10.0
BACKGROUND_BLOTCH = 16
PIXEL_NOISE = 5.0
# Per-object brightness jitter.
BRIGHTNESS = (0.8, 1.0)
_SPLITS = {"train": 0, "val": 1}
_MANIFEST = "manifest.json"
_LABELMAPS = "train_labelmaps.h5"
_REAL_LABELS = "val_real_labels.json"


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """A built synthetic dataset: where its parts are.

    Attributes:
        root: The dataset folder.
        train_root: ImageFolder of the training JPEGs (folder = original label's class).
        val_root: ImageFolder of the validation JPEGs (folder = original label's class).
        labelmaps: HDF5 label-map file of the training images, /paths relative to
            train_root (dali_relabel.labelmaps format).
        real_labels: JSON list of lists of class indices (every class in the image, sorted),
            one per validation image in sorted file-name order (the same as the sorted
            relative-path, ImageFolder, order), as the public ReaL labels are.
        classes: Class names in index order; also the folder names (sorted == index order).
    """

    root: str
    train_root: str
    val_root: str
    labelmaps: str
    real_labels: str
    classes: list[str]


@dataclasses.dataclass(frozen=True)
class _Scene:
    """One rendered image with the exact coverage of its objects.

    Attributes:
        pixels: [H, W, 3] uint8.
        classes: [n] class of each object; classes[0] is the original label.
        coverage: [n, M, M] share of each map cell covered by each object's visible part.
    """

    pixels: np.ndarray
    classes: np.ndarray
    coverage: np.ndarray


def class_names(num_classes: int) -> list[str]:
    """The names of classes 0..num_classes-1, e.g. "c00_red_plain_disc"; sorted == index
    order.

    Args:
        num_classes: C, at most MAX_CLASSES.

    Raises:
        ValueError: num_classes out of range.
    """
    _checks.check_int("num_classes", num_classes, 2, MAX_CLASSES)
    width = max(2, len(str(num_classes - 1)))
    colours = list(COLOURS)
    return [f"c{i:0{width}d}_{colours[i % len(colours)]}_{TEXTURES[i % len(TEXTURES)]}_"
            f"{SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def default_cache_dir() -> str:
    """The parent of cached datasets: $DALI_RELABEL_CACHE/synthetic when that variable is
    set, else $XDG_CACHE_HOME/dali-relabel/synthetic (default ~/.cache/...)."""
    base = os.environ.get("DALI_RELABEL_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "dali-relabel")
    return os.path.join(base, "synthetic")


def _cell_weights(pixels: int, cells: int) -> np.ndarray:
    """[cells, pixels]: overlap of pixel p (the interval [p, p+1)) with cell c (the interval
    [c, c+1) * pixels/cells), over the cell's length; every row sums to 1."""
    edges = np.arange(cells + 1) * (pixels / cells)
    starts = np.arange(pixels)
    overlap = (np.minimum(edges[1:, None], starts[None, :] + 1)
               - np.maximum(edges[:-1, None], starts[None, :]))
    return np.clip(overlap, 0.0, None) * (cells / pixels)


def _coverage(masks: np.ndarray, map_size: int) -> np.ndarray:
    """[n, M, M]: share of each of the M x M cells that each of the masks [n, H, W] covers."""
    height, width = masks.shape[1:]
    rows, cols = _cell_weights(height, map_size), _cell_weights(width, map_size)
    return rows @ masks.astype(np.float64) @ cols.T


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """[side, side] bool: the shape filling a square of `side` pixels (pixel centres)."""
    centres = (np.arange(side) + 0.5) / side * 2.0 - 1.0
    v, u = np.meshgrid(centres, centres, indexing="ij")  # v downwards, u rightwards
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.85
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (abs(u) <= (v + 0.9) * 0.55)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if shape == "cross":
        return (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 0.95)
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.0
    # star: five rounded points, one up
    return np.sqrt(r2) <= 0.6 + 0.4 * np.cos(5.0 * (np.arctan2(v, u) + np.pi / 2))


def _texture(texture: str, side: int) -> np.ndarray:
    """[side, side] float32 brightness factors (1 or DARK) of a texture, in object pixels."""
    y, x = np.mgrid[:side, :side]
    if texture == "plain":
        dark = np.zeros((side, side), dtype=bool)
    elif texture == "striped":
        dark = (x + y) // 4 % 2 == 1
    elif texture == "checked":
        dark = (x // 5 + y // 5) % 2 == 1
    elif texture == "dotted":
        dark = (x % 6 - 2.5) ** 2 + (y % 6 - 2.5) ** 2 <= 3.0
    else:  # gridded
        dark = (x % 7 < 2) | (y % 7 < 2)
    return np.where(dark, DARK, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 3] float32: smooth low-saturation blotches (bicubic upsampled)."""
    grid = (max(2, height // BACKGROUND_BLOTCH + 1), max(2, width // BACKGROUND_BLOTCH + 1))
    grey = rng.uniform(*BACKGROUND_GREY) + rng.normal(0.0, BACKGROUND_CONTRAST, (*grid, 1))
    coarse = grey + rng.normal(0.0, BACKGROUND_TINT, (*grid, 3))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)


def _render_scene(rng: np.random.Generator, *, label: int, num_classes: int,
                  image_size: tuple[int, int], map_size: int, objects: tuple[int, int],
                  main_side: tuple[float, float], other_side: tuple[float, float]) -> _Scene:
    """Draws one scene whose largest visible object has class `label`."""
    width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    short = min(width, height)
    others = rng.permutation(np.delete(np.arange(num_classes), label))
    num_others = int(rng.integers(objects[0] - 1, objects[1]))
    attempt = 0
    while True:
        count = max(0, num_others - attempt // ATTEMPTS_PER_OBJECT)
        classes = np.concatenate([[label], others[:count]]).astype(np.int64)
        sides = [round(rng.uniform(*main_side) * short)]
        sides += [round(rng.uniform(*other_side) * short) for _ in range(count)]
        lefts = [int(rng.integers(0, width - s + 1)) for s in sides]
        tops = [int(rng.integers(0, height - s + 1)) for s in sides]
        order = rng.permutation(len(classes))  # back to front
        owner = np.full((height, width), -1, dtype=np.int64)
        masks = [_shape_mask(SHAPES[c % len(SHAPES)], s) for c, s in zip(classes, sides)]
        for i in order:
            window = owner[tops[i]:tops[i] + sides[i], lefts[i]:lefts[i] + sides[i]]
            window[masks[i]] = i
        visible = np.bincount(owner[owner >= 0], minlength=len(classes))
        full = np.array([mask.sum() for mask in masks])
        if (np.all(visible >= MIN_VISIBLE * full)
                and np.all(visible[0] >= LARGEST_MARGIN * visible[1:])):
            break
        attempt += 1

    pixels = _background(rng, height, width)
    colours = list(COLOURS.values())
    for i in order:
        c, s = classes[i], sides[i]
        colour = np.array(colours[c % len(colours)], dtype=np.float32) * rng.uniform(*BRIGHTNESS)
        shade = _texture(TEXTURES[c % len(TEXTURES)], s)[masks[i]]
        window = pixels[tops[i]:tops[i] + s, lefts[i]:lefts[i] + s]
        window[masks[i]] = shade[:, None] * colour
    pixels += rng.normal(0.0, PIXEL_NOISE, pixels.shape).astype(np.float32)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    visible_masks = owner[None] == np.arange(len(classes))[:, None, None]
    return _Scene(pixels=pixels, classes=classes, coverage=_coverage(visible_masks, map_size))


def _label_map(scene: _Scene, *, num_classes: int, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k logits ([K, M, M] float16) and classes ([K, M, M] int16) of a scene's map."""
    dense = np.zeros((num_classes, *scene.coverage.shape[1:]))
    dense[scene.classes] = scene.coverage
    indices = np.argsort(-dense, axis=0, kind="stable")[:topk]
    values = LOGIT_SCALE * np.take_along_axis(dense, indices, axis=0)
    return values.astype(np.float16), indices.astype(np.int16)


def _dataset(root: str, classes: list[str]) -> SyntheticDataset:
    return SyntheticDataset(
        root=root, train_root=os.path.join(root, "train"), val_root=os.path.join(root, "val"),
        labelmaps=os.path.join(root, _LABELMAPS), real_labels=os.path.join(root, _REAL_LABELS),
        classes=classes)


def _read_manifest(root: str) -> dict[str, Any] | None:
    """The manifest of a complete synthetic dataset at root, or None."""
    try:  # a FIFO named manifest.json is refused, not waited on
        with open_input(os.path.join(root, _MANIFEST), argument="root") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    params = manifest.get("params") if isinstance(manifest, dict) else None
    return manifest if isinstance(params, dict) and params.get("generator") == GENERATOR else None


def _reusable(root: str, params: dict[str, Any], classes: list[str]) -> SyntheticDataset | None:
    """The dataset at root if it is complete and was made with exactly `params`."""
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("params") != params:
        return None
    dataset = _dataset(root, classes)
    parts = (dataset.train_root, dataset.val_root, dataset.labelmaps, dataset.real_labels)
    return dataset if all(os.path.exists(part) for part in parts) else None


def _file_names(split: str, per_class: int, classes: list[str]) -> list[tuple[int, str]]:
    """(label, relative path) of every image of a split, in sorted (ImageFolder) order.

    File names are numbered across the split (as ImageNet's ILSVRC2012_val_NNNNNNNN), so
    sorting by file name gives the same order: the order of the ReaL-style label sets.
    """
    width = max(4, len(str(len(classes) * per_class - 1)))
    return sorted(((label, f"{name}/{split}_{label * per_class + n:0{width}d}.JPEG")
                   for label, name in enumerate(classes) for n in range(per_class)),
                  key=lambda item: item[1])


def _build(folder: str, *, params: dict[str, Any], classes: list[str], progress: bool) -> float:
    """Writes the whole dataset into `folder` (the manifest last); returns the seconds taken."""
    start = time.perf_counter()
    num_classes, topk, map_size = params["num_classes"], params["topk"], params["map_size"]
    image_size = tuple(params["image_size"])
    splits = {split: _file_names(split, params[f"{split}_per_class"], classes)
              for split in _SPLITS}
    for split in _SPLITS:
        for name in classes:
            os.makedirs(os.path.join(folder, split, name))  # folder too, honouring the umask
    values, indices, sizes, real_labels = [], [], [], []
    total = sum(len(files) for files in splits.values())
    with tqdm(total=total, desc="synthetic ImageNet", unit="img",
              disable=None if progress else True) as bar:
        for split, files in splits.items():
            for n, (label, relative) in enumerate(files):
                rng = np.random.default_rng([params["seed"], _SPLITS[split], label, n])
                scene = _render_scene(rng, label=label, num_classes=num_classes,
                                      image_size=image_size, map_size=map_size,
                                      objects=tuple(params["objects"]),
                                      main_side=tuple(params["main_side"]),
                                      other_side=tuple(params["other_side"]))
                Image.fromarray(scene.pixels).save(os.path.join(folder, split, relative),
                                                   format="JPEG", quality=JPEG_QUALITY)
                if split == "train":
                    value, index = _label_map(scene, num_classes=num_classes, topk=topk)
                    sizes.append(scene.pixels.shape[:2])
                    values.append(value)
                    indices.append(index)
                else:
                    real_labels.append(sorted(int(c) for c in scene.classes))
                bar.update()
    train = splits["train"]
    write_labelmaps(os.path.join(folder, _LABELMAPS), np.stack(values), np.stack(indices),
                    np.array([label for label, _ in train]), [path for _, path in train],
                    classes, sizes=np.array(sizes), generator=GENERATOR,
                    generator_version=GENERATOR_VERSION,
                    seed=params["seed"], parameters=json.dumps(params, sort_keys=True),
                    annotator="exact object coverage", logit_scale=LOGIT_SCALE,
                    value_definition=f"logit = {LOGIT_SCALE:g} * share of the cell covered")
    with open(os.path.join(folder, _REAL_LABELS), "w", encoding="utf-8") as f:
        json.dump(real_labels, f)
    seconds = time.perf_counter() - start
    manifest = dict(params=params, classes=classes, logit_scale=LOGIT_SCALE,
                    train_images=len(train), val_images=len(splits["val"]),
                    generation_seconds=round(seconds, 3), created=utc_now())
    with open(os.path.join(folder, _MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return seconds


def _install(folder: str, root: str, params: dict[str, Any],
             classes: list[str]) -> SyntheticDataset:
    """Renames the finished `folder` onto root, replacing an older synthetic dataset there."""
    try:
        os.rename(folder, root)  # atomic; also replaces an empty directory
        return _dataset(root, classes)
    except OSError:
        pass
    dataset = _reusable(root, params, classes)
    if dataset is not None:  # another process finished the same dataset meanwhile
        shutil.rmtree(folder)
        return dataset
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=os.path.dirname(root))
    os.rename(root, os.path.join(old, "dataset"))
    os.rename(folder, root)
    shutil.rmtree(old)
    logger.info("replaced the synthetic dataset made with other parameters at %s", root)
    return _dataset(root, classes)


def make_synthetic_imagenet(
    root: str | os.PathLike | None = None,
    *,
    num_classes: int = 10,
    train_per_class: int = 60,
    val_per_class: int = 20,
    image_size: tuple[int, int] = (96, 160),
    map_size: int = 15,
    topk: int = 5,
    seed: int = 0,
    objects: tuple[int, int] = OBJECTS,
    main_side: tuple[float, float] = MAIN_SIDE,
    other_side: tuple[float, float] = OTHER_SIDE,
    progress: bool = True,
) -> SyntheticDataset:
    """Builds (or reuses) a synthetic ImageNet in miniature with exact ReLabel label maps.

    See the module docstring for what the images and maps hold. The dataset is built in a
    temporary folder beside `root` and renamed into place, so an interrupted build never
    looks complete; a complete dataset with the same parameters at `root` is reused as is.
    Several processes may call this at once (e.g. every rank of torchrun): each builds and
    the first rename wins.

    Example:
        ds = make_synthetic_imagenet()
        loader = ReLabelLoader(ds.train_root, ds.labelmaps, 64, device="cpu")
        val = ValLoader(ds.val_root, 64, device="cpu", classes=ds.classes)

    Args:
        root: Dataset folder; None: a folder named after a hash of the parameters under
            `default_cache_dir()` ($DALI_RELABEL_CACHE/synthetic, else
            ~/.cache/dali-relabel/synthetic). An existing folder must be empty or hold a
            synthetic dataset (replaced when made with other parameters).
        num_classes: C, from 2 to MAX_CLASSES (280) (default: 10).
        train_per_class: Training images per class folder (default: 60).
        val_per_class: Validation images per class folder (default: 20).
        image_size: (min, max) of the image width and of its height, drawn independently,
            in pixels, min >= 32 (default: (96, 160)).
        map_size: M, the label maps are M x M, 1 <= M <= image_size[0] (default: 15, as the
            paper's).
        topk: K, classes kept per map cell, 1 <= K <= C (default: 5, as the paper's).
        seed: Seed of all randomness, >= 0; the same seed gives byte-identical files
            (default: 0).
        objects: (min, max) objects per image, of distinct classes, 1 <= min <= max, min <=
            num_classes (max is capped at num_classes); a scene whose objects cannot
            all be placed (each at least half visible, the labelled one the largest) after a
            few draws keeps fewer (default: (1, 4)).
        main_side: (min, max) side of the labelled object's square box over the image's
            shorter side, in (0, 1] (default: (0.5, 0.85)).
        other_side: (min, max) side of the other objects' boxes likewise (default:
            (0.22, 0.5)). Smaller objects and more of them make a harder data set, on which
            random crops miss the labelled object more often (`benchmarks/ablation.py`).
        progress: Show a progress bar while generating (only on a terminal) (default: True).

    Returns:
        Where the dataset's parts are.

    Raises:
        ValueError: An argument is invalid (the message names it), or `root` exists and is
            neither empty nor a synthetic dataset.
        OutputError: Writing failed (e.g. no space left): one line naming `root`; nothing
            is left behind.
    """
    _checks.check_int("num_classes", num_classes, 2, MAX_CLASSES)
    _checks.check_int("train_per_class", train_per_class, 1)
    _checks.check_int("val_per_class", val_per_class, 1)
    low, high = _checks.check_int_pair("image_size", image_size, MIN_IMAGE_SIDE)
    _checks.check_int("map_size", map_size, 1, low)
    _checks.check_int("topk", topk, 1, num_classes)
    _checks.check_int("seed", seed, 0)
    objects = _checks.check_int_pair("objects", objects, 1)
    if objects[0] > num_classes:
        raise ValueError(f"objects must be (min, max) with min <= num_classes = {num_classes} "
                         f"(the objects of an image have distinct classes), got {objects!r}")
    objects = (objects[0], min(objects[1], num_classes))
    main_side = _checks.check_range("main_side", main_side, 0.0, 1.0)
    other_side = _checks.check_range("other_side", other_side, 0.0, 1.0)
    params = dict(generator=GENERATOR, generator_version=GENERATOR_VERSION,
                  num_classes=int(num_classes), train_per_class=int(train_per_class),
                  val_per_class=int(val_per_class), image_size=[low, high],
                  map_size=int(map_size), topk=int(topk), seed=int(seed),
                  objects=list(objects), main_side=list(main_side),
                  other_side=list(other_side))
    if root is None:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        root = os.path.join(default_cache_dir(), digest)
    root = os.path.abspath(os.fspath(root))
    classes = class_names(num_classes)

    dataset = _reusable(root, params, classes)
    if dataset is not None:
        logger.info("reusing the synthetic dataset at %s", root)
        return dataset
    if os.path.exists(root) and (not os.path.isdir(root) or (
            os.listdir(root) and _read_manifest(root) is None)):
        raise ValueError(f"root: {root!r} exists and is neither empty nor a synthetic dataset; "
                         f"choose another folder")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    folder = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        seconds = _build(folder, params=params, classes=classes, progress=progress)
        dataset = _install(folder, root, params, classes)
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):  # e.g. a full disk
            raise OutputError(write_failure(root, e)) from e
        raise
    logger.info("synthetic ImageNet at %s: %d training and %d validation images in %d classes, "
                "generated in %.1f s", root, num_classes * train_per_class,
                num_classes * val_per_class, num_classes, seconds)
    return dataset
