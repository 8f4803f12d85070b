"""The epoch plan: everything random about a training epoch, decided on the host up front.

For each epoch the planner fixes the global order of the images (seeded by (seed, epoch), the
same on every rank), this rank's slice of it, and for every sample its RandomResizedCrop
window (torchvision's ``RandomResizedCrop.get_params``, rule for rule), its horizontal flip,
its augmentation parameters and its mixing (seeded by (seed, rank, epoch)). DALI then only
reads and decodes what the plan says, and the crop boxes that drive LabelPooling are known
before a single image is decoded. A position in the plan (epoch, batches done) is all it
takes to resume.

With ``num_crops`` N > 1 every planned image gives N samples, each crop with its own window,
flip and draws, next to each other in one batch; an epoch takes 1/N of the images (as many
samples as without), and N epochs walk one global shuffle slice by slice, so that every image
is seen once every N epochs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from dali_relabel.augment.draws import AugmentDraws, PerSample
from dali_relabel.loading.mixing import MixDraws, Mixing

__all__ = ["CROP_ATTEMPTS", "EpochPlan", "EpochPlanner", "random_resized_crop_windows"]

# torchvision's RandomResizedCrop tries this many windows before falling back to a centre crop.
CROP_ATTEMPTS = 10


def random_resized_crop_windows(sizes: np.ndarray, scale: tuple[float, float],
                                ratio: tuple[float, float],
                                rng: np.random.Generator) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params`` for many images at once.

    Per image: up to ten attempts draw an area fraction uniformly from `scale` and an aspect
    ratio log-uniformly from `ratio`, round the width and height half to even (Python's
    ``round``), and take the first window that fits, at a uniform position. When none fits,
    the centre crop of the whole image with its aspect ratio clamped to `ratio`.

    Args:
        sizes (ndarray[n, 2]): Image (height, width) in pixels.
        scale: Range of the window's area as a fraction of the image's.
        ratio: Range of the window's aspect ratio (width / height).
        rng: Source of randomness.

    Returns:
        ndarray[n, 4] int32: windows (y, x, h, w) in pixels, inside the image.
    """
    n = len(sizes)
    height = sizes[:, 0].astype(np.float64)
    width = sizes[:, 1].astype(np.float64)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    h_found, w_found = np.zeros(n), np.zeros(n)
    found = np.zeros(n, dtype=bool)
    pending = np.arange(n)
    # Attempt by attempt, only for the images still without a window: most fit at once.
    for _ in range(CROP_ATTEMPTS):
        if not pending.size:
            break
        area = height[pending] * width[pending]
        target_area = area * rng.uniform(scale[0], scale[1], size=pending.size)
        aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=pending.size))
        w = np.rint(np.sqrt(target_area * aspect))
        h = np.rint(np.sqrt(target_area / aspect))
        fits = (w > 0) & (w <= width[pending]) & (h > 0) & (h <= height[pending])
        done = pending[fits]
        w_found[done], h_found[done], found[done] = w[fits], h[fits], True
        pending = pending[~fits]
    # torchvision: i = randint(0, H - h + 1), j = randint(0, W - w + 1).
    y_found = np.floor(rng.random(n) * (height - h_found + 1))
    x_found = np.floor(rng.random(n) * (width - w_found + 1))

    in_ratio = width / height
    too_tall, too_wide = in_ratio < min(ratio), in_ratio > max(ratio)
    w_center = np.where(too_wide, np.rint(height * max(ratio)), width)
    h_center = np.where(too_tall, np.rint(width / min(ratio)), height)
    windows = np.where(found[:, None],
                       np.stack([y_found, x_found, h_found, w_found], axis=1),
                       np.stack([(height - h_center) // 2, (width - w_center) // 2,
                                 h_center, w_center], axis=1))
    return windows.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class EpochPlan(PerSample):
    """What one rank reads in one epoch, sample by sample, in order. ``plan[samples]`` is the
    plan of those samples; ``plan.batch(i)`` the samples of batch i.

    Attributes:
        epoch: The epoch.
        rows (ndarray[n]): int64 label-map rows (and /paths entries) in read order; with
            num_crops N, each image's row N times in a row.
        windows (ndarray[n, 4]): int32 crop windows (y, x, h, w) in pixels.
        flips (ndarray[n]): bool, whether each crop is mirrored.
        boxes (ndarray[n, 4]): float32 crop boxes (x1, y1, x2, y2), normalized to the image.
        vflips (ndarray[n], optional): bool, whether each crop is flipped vertically (None
            without vertical flips).
        augment: The augmentation draws.
        mixing: The mixing draws, or None without mixing.
        batch_size: Samples per batch; the last batch may be shorter.
        num_crops: Samples (crops) per decoded image.
        skipped: Batches of the epoch left out at its start (a resumed epoch).
    """

    epoch: int
    rows: np.ndarray
    windows: np.ndarray
    flips: np.ndarray
    boxes: np.ndarray
    augment: AugmentDraws
    mixing: Optional[MixDraws]
    batch_size: int
    num_crops: int = 1
    skipped: int = 0
    vflips: Optional[np.ndarray] = None

    def __len__(self) -> int:
        """Batches in the plan."""
        return -(-len(self.rows) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def batch(self, index: int) -> slice:
        """The samples of batch `index`."""
        assert 0 <= index < len(self), (index, len(self))
        return slice(index * self.batch_size, min((index + 1) * self.batch_size, len(self.rows)))

    def skip(self, batches: int) -> EpochPlan:
        """The plan without its first `batches` batches (what a resumed epoch has left);
        the plan itself for 0."""
        if batches == 0:
            return self
        rest = self[batches * self.batch_size:]
        return dataclasses.replace(rest, skipped=self.skipped + batches)


class EpochPlanner:
    """Plans epochs: global order, this rank's shard, crop windows, flips and draws.

    Args:
        sizes (ndarray[N, 2]): (height, width) of every image of the store, by row.
        rows (ndarray[M]): int64 rows to train on (the store minus excluded images).
        batch_size: Samples per batch and rank.
        seed: Base seed: the order of an epoch is seeded by (seed, epoch), windows, flips and
            draws by (seed, shard_id, epoch).
        shuffle: Reshuffle globally every epoch; else read `rows` in order.
        shard_id: This rank's shard.
        num_shards: Number of shards.
        drop_last: Every shard the same number of full batches (else the shards together
            cover every sample exactly once and the last batch may be short).
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip (timm's --vflip).
        augment: The augmentations whose parameters are drawn (None: none).
        mixing: The mixing whose parameters are drawn (None or disabled: none).
        image_size: Side of the output images (the draws' pixel scale).
        num_crops: Crops per decoded image (a divisor of batch_size; > 1 needs drop_last).
    """

    def __init__(self, sizes: np.ndarray, rows: np.ndarray, *, batch_size: int, seed: int,
                 shuffle: bool, shard_id: int, num_shards: int, drop_last: bool,
                 scale: tuple[float, float], ratio: tuple[float, float], hflip: float,
                 vflip: float = 0.0, augment: Any = None, mixing: Optional[Mixing] = None,
                 image_size: int = 224, num_crops: int = 1) -> None:
        assert sizes.ndim == 2 and sizes.shape[1] == 2, sizes.shape
        assert batch_size % num_crops == 0 and (num_crops == 1 or drop_last), num_crops
        self.sizes = sizes
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.drop_last = drop_last
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.vflip = vflip
        self.augment = augment
        self.mixing = mixing if mixing is not None and mixing.enabled else None
        self.image_size = image_size
        self.num_crops = num_crops

    @property
    def shard_size(self) -> int:
        """Samples this rank reads per epoch (with num_crops, as many as without)."""
        total = len(self.rows)
        if self.drop_last:
            return (total // self.num_shards) // self.batch_size * self.batch_size
        return len(range(self.shard_id, total, self.num_shards))

    def __len__(self) -> int:
        """Batches per epoch of this rank."""
        return -(-self.shard_size // self.batch_size)

    def images(self, epoch: int) -> np.ndarray:
        """Store rows of the images this rank decodes in `epoch`, in order: its slice of the
        global shuffle (with num_crops N, of the epoch's N-th of it)."""
        total, crops = len(self.rows), self.num_crops
        cycle, part = divmod(epoch, crops)
        order = (np.random.default_rng([self.seed, cycle]).permutation(total) if self.shuffle
                 else np.arange(total))
        if crops > 1:
            order = order[part * total // crops:(part + 1) * total // crops]
        return self.rows[order[self.shard_id::self.num_shards][:self.shard_size // crops]]

    def order(self, epoch: int) -> np.ndarray:
        """Store rows of this rank's samples in `epoch`, in order (each image's row once per
        crop)."""
        return np.repeat(self.images(epoch), self.num_crops)

    def plan(self, epoch: int) -> EpochPlan:
        """The whole plan of `epoch` for this rank."""
        rows = self.order(epoch)
        rng = np.random.default_rng([self.seed, self.shard_id, epoch])
        sizes = self.sizes[rows]
        windows = random_resized_crop_windows(sizes, self.scale, self.ratio, rng)
        flips = rng.random(len(rows)) < self.hflip
        vflips = rng.random(len(rows)) < self.vflip if self.vflip > 0 else None
        y, x, h, w = (windows[:, i].astype(np.float32) for i in range(4))
        height, width = (sizes[:, i].astype(np.float32) for i in range(2))
        boxes = np.stack([x / width, y / height, (x + w) / width, (y + h) / height], axis=1)
        draws = np.random.default_rng([self.seed, self.shard_id, epoch, 1])
        augment = (self.augment.plan(len(rows), self.image_size, draws)
                   if self.augment is not None else AugmentDraws())
        mixing = (self.mixing.plan(len(rows), self.batch_size, self.image_size, draws)
                  if self.mixing is not None else None)
        return EpochPlan(epoch=epoch, rows=rows, windows=windows, flips=flips, boxes=boxes,
                         augment=augment, mixing=mixing, batch_size=self.batch_size,
                         num_crops=self.num_crops, vflips=vflips)

    def identity(self) -> dict[str, Any]:
        """The settings that fix the sample order: a saved position is only valid for them."""
        identity = dict(num_samples=len(self.rows), batch_size=self.batch_size, seed=self.seed,
                        shuffle=self.shuffle, shard_id=self.shard_id,
                        num_shards=self.num_shards, drop_last=self.drop_last)
        if self.num_crops > 1:  # states saved before num_crops existed stay valid
            identity["num_crops"] = self.num_crops
        return identity
