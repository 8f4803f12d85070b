"""Random erasing (timm's RandomErasing): rectangles planned on the host for the epoch,
erased on the device for a whole batch at once."""
from __future__ import annotations

import math

import numpy as np
import torch

from dali_relabel import _transfer

__all__ = ["RE_MODES", "plan_erasing", "random_erase"]

RE_MODES = ("const", "rand", "pixel")
# timm's RandomErasing: area fraction and log aspect-ratio ranges, attempts per rectangle.
RE_AREA = (0.02, 1 / 3)
RE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
RE_ATTEMPTS = 10

def plan_erasing(n: int, size: int, prob: float, count: int,
                  rng: np.random.Generator) -> np.ndarray:
    """timm's RandomErasing rectangles on size x size images: int32 [n, count, 4] (top,
    left, height, width), zero-sized where nothing is erased.

    Per image: erase with probability `prob`, 1 to `count` rectangles (uniform), each with
    up to ten attempts at an area of U(0.02, 1/3) / rectangles of the image and a log-uniform
    aspect ratio in (0.3, 1/0.3), rounded half to even; the first that fits strictly inside
    is placed uniformly.
    """
    boxes = np.zeros((n, count, 4), np.int32)
    erased = rng.random(n) < prob
    counts = rng.integers(1, count + 1, size=n)
    area = float(size * size)
    for slot in range(count):
        pending = np.flatnonzero(erased & (slot < counts))
        for _ in range(RE_ATTEMPTS):
            if not pending.size:
                break
            target = rng.uniform(*RE_AREA, size=pending.size) * area / counts[pending]
            aspect = np.exp(rng.uniform(*RE_LOG_ASPECT, size=pending.size))
            h = np.rint(np.sqrt(target * aspect)).astype(np.int64)
            w = np.rint(np.sqrt(target / aspect)).astype(np.int64)
            fits = (w < size) & (h < size)
            done, h, w = pending[fits], h[fits], w[fits]
            top = rng.integers(0, size - h + 1)
            left = rng.integers(0, size - w + 1)
            boxes[done, slot] = np.stack([top, left, h, w], axis=1)
            pending = pending[~fits]
    return boxes


def random_erase(images: torch.Tensor, boxes: np.ndarray, mode: str,
                 seed: int) -> torch.Tensor:
    """Erase the planned rectangles of a normalized batch, on its device, for all images at
    once: zeros ("const"), one normal colour per rectangle ("rand") or normal noise per pixel
    ("pixel"), drawn from a generator seeded with `seed`.

    Args:
        images (Tensor[B, C, H, W]): normalized images.
        boxes (ndarray[B, K, 4]): int (top, left, height, width), zero-sized for none.
        mode: One of RE_MODES.
        seed: Seed of the noise.
    """
    slots = [k for k in range(boxes.shape[1]) if (boxes[:, k, 2:] > 0).all(axis=1).any()]
    if not slots:
        return images
    device = images.device
    batch, channels, height, width = images.shape
    generator = torch.Generator(device=device).manual_seed(seed) if mode != "const" else None
    spans = _transfer.to_device(boxes, device)
    ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
    erased = images.clone()  # in the batch's memory format (channels_last stays so)
    for k in slots:
        top, left, h, w = (spans[:, k, i, None] for i in range(4))
        rows = (ys >= top) & (ys < top + h)
        cols = (xs >= left) & (xs < left + w)
        inside = rows[:, None, :, None] & cols[:, None, None, :]
        if mode == "const":
            erased.masked_fill_(inside, 0.0)
            continue
        shape = (batch, channels, 1, 1) if mode == "rand" else (batch, channels, height, width)
        fill = torch.randn(shape, generator=generator, device=device).to(images.dtype)
        erased.copy_(torch.where(inside, fill, erased))
    return erased

