"""Look at one label map: a PNG that shows whether the map lines up with its image.

ReLabel (Yun et al., "Re-labeling ImageNet: from Single to Multi-Labels, from Global to
Localized Labels", CVPR 2021) trains each random crop on softmax(RoIAlign(L, crop box)). A map
that is transposed, mirrored or belongs to another image gives plausible-looking but wrong
targets, which no loss curve reveals; a picture does. `show_labelmap` draws:

- the image with the crop boxes;
- heatmaps of the image's two top classes (of the whole-image target) over the image: the
  per-cell probability of the class, upsampled bilinearly, as in the paper's label-map
  figures;
- for every crop, the crop as the loader decodes it (mirrored when flipped) and the top-5
  classes of its pooled target, by name, as a bar chart.

Without a box it takes a few random crops made exactly as `ReLabelLoader` makes them.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from timm.data import ImageNetInfo

from dali_relabel import _checks
from dali_relabel.files import atomic_output, check_output_path
from dali_relabel.images.files import open_rgb_image
from dali_relabel.labelmaps.format import read_header
from dali_relabel.labelmaps import LabelMapStore
from dali_relabel.loading.train_loader import ReLabelLoader
from dali_relabel.ops.label_pooling import label_pooling

__all__ = ["ShownLabelMap", "show_labelmap"]

TOP_CLASSES = 5
HEATMAP_CLASSES = 2
_CROP_PIXELS = 160
_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf")
_NAME_CHARS = 32
MAX_CROPS = 8
# The image is drawn at most this many pixels on its longer side: the figure shows it a
# few hundred pixels wide, and drawing a 13500 x 13500 image whole takes gigabytes.
_DRAWN_PIXELS = 1200


@dataclasses.dataclass(frozen=True)
class ShownLabelMap:
    """The numbers behind a picture made by `show_labelmap`.

    Attributes:
        path: The image's path relative to the image root.
        label: Its original label (-1 if unknown).
        boxes (Tensor[n, 4]): The crops (x1, y1, x2, y2), normalized.
        flip (Tensor[n]): bool, whether each crop was mirrored.
        top_classes (Tensor[n, 5]): The top classes of each crop's target, best first.
        top_probs (Tensor[n, 5]): Their probabilities.
        heatmap_classes: The classes drawn as heatmaps (top-2 of the whole-image target).
        heatmaps (Tensor[2, H, W]): Their per-cell probabilities (rows = the image's
            vertical axis).
    """

    path: str
    label: int
    boxes: torch.Tensor
    flip: torch.Tensor
    top_classes: torch.Tensor
    top_probs: torch.Tensor
    heatmap_classes: list[int]
    heatmaps: torch.Tensor


def _display_names(classes: Sequence[str]) -> list[str]:
    """Class names, each followed by its ImageNet description when it is a WordNet id."""
    info = ImageNetInfo()
    names = []
    for name in classes:
        try:
            name = f"{name} {info.label_name_to_description(name).split(',')[0]}"
        except KeyError:
            pass
        names.append(name[:_NAME_CHARS])
    return names


def _loader_crops(store: LabelMapStore, index: int, image_root: str, *, num_crops: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Random crops of one image made by ReLabelLoader: (boxes, flip, targets, pixels)."""
    # A store holding this image's row num_crops times: one batch of the loader is then
    # num_crops independent crops of the image.
    repeated = LabelMapStore(
        header=dataclasses.replace(store.header, num_rows=num_crops), placement="memory",
        values=store.values[index:index + 1].repeat(num_crops, 1, 1, 1),
        indices=store.indices[index:index + 1].repeat(num_crops, 1, 1, 1),
        labels=store.labels[index:index + 1].repeat(num_crops),
        paths=[store.paths[index]] * num_crops, classes=store.classes)
    loader = ReLabelLoader(image_root, repeated, num_crops, device="cpu",
                           image_size=_CROP_PIXELS, seed=seed, shard_id=0, num_shards=1,
                           num_threads=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                           return_meta=True)
    batch = next(iter(loader))
    pixels = batch.images.permute(0, 2, 3, 1).clamp(0, 255).to(torch.uint8).numpy()
    return batch.boxes, batch.flip, batch.targets, pixels


def _box_crop(image: Image.Image, box: torch.Tensor) -> np.ndarray:
    width, height = image.size
    left, top, right, bottom = (box * torch.tensor([width, height, width, height])).tolist()
    crop = image.crop((round(left), round(top), max(round(right), round(left) + 1),
                       max(round(bottom), round(top) + 1)))
    return np.asarray(crop.resize((_CROP_PIXELS, _CROP_PIXELS), Image.BILINEAR))


def _check_box(box: Sequence[float]) -> torch.Tensor:
    return torch.tensor([_checks.check_box("box", box)], dtype=torch.float32)


def _drawn(image: Image.Image) -> Image.Image:
    """The image as drawn: at most _DRAWN_PIXELS on its longer side."""
    if max(image.size) <= _DRAWN_PIXELS:
        return image
    drawn = image.copy()
    drawn.thumbnail((_DRAWN_PIXELS, _DRAWN_PIXELS), Image.BILINEAR)
    return drawn


def show_labelmap(
    labelmaps: str | os.PathLike,
    image_root: str | os.PathLike,
    index: int,
    out: str | os.PathLike,
    *,
    box: Sequence[float] | None = None,
    num_crops: int = 3,
    seed: int = 0,
) -> ShownLabelMap:
    """Draws an image, its label map and the targets of crops of it to a PNG.

    Args:
        labelmaps: Label-map file.
        image_root: Folder the file's /paths are relative to.
        index: Row of the file (the image) to show.
        out: PNG file to write.
        box: One crop (x1, y1, x2, y2), normalized; default: `num_crops` random crops made
            by ReLabelLoader (RandomResizedCrop, flips).
        num_crops: Number of random crops when no box is given, 1 to 8 (default: 3).
        seed: Seed of the random crops, >= 0 (default: 0).

    Returns:
        The numbers drawn.

    Raises:
        ValueError: A bad argument (named); an image that is not a usable image file or
            does not fit in memory (checked from its header, before decoding).
        LabelMapError: The label-map file is invalid.
        OutputError: Writing the PNG failed (e.g. no space left), in one line.
    """
    labelmaps = _checks.check_path_arg("labelmaps", labelmaps, kind="label-map file")
    image_root = _checks.check_path_arg("image_root", image_root, kind="folder")
    out = check_output_path(out, argument="out")
    _checks.check_int("num_crops", num_crops, 1, MAX_CROPS)
    _checks.check_int("seed", seed, 0, 2 ** 63 - 1)
    boxes = None if box is None else _check_box(box)
    placement = "mmap" if read_header(labelmaps).mmappable else "memory"
    with LabelMapStore.open(labelmaps, placement=placement) as store:
        shown, image, crops, names = _compute(store, index, image_root, boxes=boxes,
                                              num_crops=num_crops, seed=seed)
    label_name = names[shown.label] if shown.label >= 0 else "unknown"
    _draw(shown, _drawn(image), crops, names, out,
          title=f"{os.path.basename(labelmaps)} row {index}: {shown.path} (label: {label_name})")
    return shown


def _compute(store: LabelMapStore, index: int, image_root: str, *,
             boxes: torch.Tensor | None, num_crops: int,
             seed: int) -> tuple[ShownLabelMap, Image.Image, np.ndarray, list[str]]:
    """The numbers to draw, the image, the crops' pixels and the class names to show."""
    labelmaps = store.path
    try:
        _checks.check_int("index", index, 0, len(store) - 1)
    except ValueError as e:
        raise ValueError(f"{e} ({labelmaps} has {len(store)} rows)") from None
    path = store.paths[index]
    # No EXIF orientation, as the loaders read it; any size, as they decode it.
    image = open_rgb_image(os.path.join(image_root, path))

    values = store.values[index:index + 1].float()
    indices = store.indices[index:index + 1].long()
    num_classes = store.num_classes
    whole = label_pooling(values, indices, torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                          num_classes=num_classes)[0]
    heat_classes = whole.topk(min(HEATMAP_CLASSES, num_classes)).indices.tolist()
    # The probability of every class in every cell: softmax over the densified cell
    # (classes outside the top-k at 0), as LabelPooling treats them.
    dense = torch.zeros(num_classes, store.height, store.width)
    dense.scatter_add_(0, indices[0], values[0])
    heatmaps = dense.softmax(dim=0)[heat_classes]

    if boxes is not None:
        flip = torch.zeros(1, dtype=torch.bool)
        targets = label_pooling(values, indices, boxes, num_classes=num_classes)
        crops = np.stack([_box_crop(image, boxes[0])])
    else:
        boxes, flip, targets, crops = _loader_crops(store, index, image_root,
                                                    num_crops=num_crops, seed=seed)
    top = targets.topk(min(TOP_CLASSES, num_classes), dim=1)
    label = int(store.labels[index])
    shown = ShownLabelMap(path=path, label=label, boxes=boxes, flip=flip,
                          top_classes=top.indices, top_probs=top.values,
                          heatmap_classes=heat_classes, heatmaps=heatmaps)
    return shown, image, crops, _display_names(store.classes)


def _draw(shown: ShownLabelMap, image: Image.Image, crops: np.ndarray, names: list[str],
          out: str, *, title: str) -> None:
    num_crops = len(shown.boxes)
    width, height = image.size
    fig = Figure(figsize=(13, 4.6 + 2.5 * num_crops), layout="constrained")
    fig.suptitle(title, fontsize=12)
    # Two sub-figures, so that the bar charts' class names do not push the maps apart.
    maps, targets = fig.subfigures(2, 1, height_ratios=[4.3, 2.5 * num_crops])
    top = maps.subplots(1, 3)
    grid = targets.add_gridspec(num_crops, 2, width_ratios=[1, 3.2])

    ax = top[0]
    ax.imshow(image)
    ax.set_title("image and crop boxes", fontsize=10)
    for i, (x1, y1, x2, y2) in enumerate(shown.boxes.tolist()):
        color = _COLORS[i % len(_COLORS)]
        ax.add_patch(Rectangle((x1 * width, y1 * height), (x2 - x1) * width,
                               (y2 - y1) * height, fill=False, edgecolor=color, linewidth=2.5))
        # Offset in points, not pixels: a few pixels of a tiny image span the whole figure.
        ax.annotate(str(i + 1), (x1 * width, y1 * height), xytext=(3, -3),
                    textcoords="offset points", color="white", fontsize=10, fontweight="bold",
                    va="top", bbox=dict(facecolor=color, pad=1.5, lw=0))
    ax.set_axis_off()

    for slot, (cls, heat) in enumerate(zip(shown.heatmap_classes, shown.heatmaps)):
        ax = top[1 + slot]
        ax.imshow(image.convert("L"), cmap="gray")
        # extent puts cell (h, w) over its share of the image; bilinear smooths between the
        # cell centres.
        peak = float(heat.max())
        ax.imshow(heat.numpy(), extent=(0, width, height, 0), cmap="jet", alpha=0.5,
                  interpolation="bilinear", vmin=0.0, vmax=max(peak, 1e-6))
        ax.set_title(f"top-{slot + 1} class: {names[cls]}\nper-cell probability "
                     f"(red = {peak:.2f}, blue = 0)", fontsize=10)
        ax.set_axis_off()

    limit = min(1.0, 1.2 * float(shown.top_probs.max()))
    for i in range(num_crops):
        color = _COLORS[i % len(_COLORS)]
        ax = targets.add_subplot(grid[i, 0])
        ax.imshow(crops[i])
        ax.set_title(f"crop {i + 1}, as the model sees it" + (
            " (flipped)" if shown.flip[i] else ""), fontsize=10, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3)

        ax = targets.add_subplot(grid[i, 1])
        classes = shown.top_classes[i].tolist()
        probs = shown.top_probs[i].tolist()
        bar_colors = ["#ff7f00" if c == shown.label else "#4a6fa5" for c in classes]
        ranks = np.arange(len(classes))
        ax.barh(ranks, probs, color=bar_colors)
        ax.set_yticks(ranks, [names[c] + (" (label)" if c == shown.label else "")
                             for c in classes], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, limit)
        for rank, prob in zip(ranks, probs):
            ax.text(prob + limit * 0.01, rank, f"{prob:.3f}", va="center", fontsize=9)
        x1, y1, x2, y2 = shown.boxes[i].tolist()
        ax.set_title(f"crop {i + 1} target, top-{len(classes)} (box x1 y1 x2 y2 = {x1:.2f} "
                     f"{y1:.2f} {x2:.2f} {y2:.2f})", fontsize=10, color=color)
        ax.set_xlabel("probability", fontsize=9)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
