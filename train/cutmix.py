"""CutMix that respects localized labels.

CutMix (Yun et al., ICCV 2019) pastes a rectangle of a partner image into each image and mixes
the targets by area. With ReLabel's localized labels (Yun et al., CVPR 2021) the pasted
rectangle's share of the target is LabelPooling over exactly the partner's pixels that were
pasted: the rectangle, given in the partner's output crop, is mapped through the partner's
crop box (and its flip) into the partner's original image and pooled from its label map.

The base image keeps the rest of its crop, which is not a rectangle. Approximation: RoIAlign
pools (nearly) the area mean of the map's logits, so the remainder's mean logits are
``(L_crop - share * L_rect) / (1 - share)``, with L_crop and L_rect the base map's pooled
logits over the whole crop and over the pasted rectangle (mapped into the base image) and
`share` the rectangle's fraction of the crop; the remainder's target is their softmax (or
one-hot argmax). The two parts are weighted by area. Partners are the batch in reverse order
and one rectangle serves the whole batch, as in timm's Mixup.
"""
import math
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from dali_relabel import label_pooling

Rect = Tuple[float, float, float, float]


def random_rect(lam: float, height: int, width: int,
                rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """CutMix's rectangle for a mixing ratio `lam` (the base's share before clipping):
    (top, left, bottom, right) in pixels of the output image."""
    cut_h, cut_w = int(height * math.sqrt(1.0 - lam)), int(width * math.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, left, bottom, right


def crop_to_image(boxes: Tensor, flip: Tensor, rect: Rect) -> Tensor:
    """Map a rectangle of the output crops (normalized u1, v1, u2, v2) to the original images.

    Args:
        boxes (Tensor[B, 4]): the crops (x1, y1, x2, y2), normalized to their images.
        flip (Tensor[B]): bool, crops shown mirrored.
        rect: the rectangle in crop coordinates, normalized to the output image.

    Returns:
        Tensor[B, 4]: the rectangle as a box of each original image.
    """
    u1, v1, u2, v2 = rect
    left = torch.where(flip, torch.full_like(boxes[:, 0], 1.0 - u2), boxes.new_tensor(u1))
    right = torch.where(flip, torch.full_like(boxes[:, 0], 1.0 - u1), boxes.new_tensor(u2))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.stack([boxes[:, 0] + left * width, boxes[:, 1] + v1 * height,
                        boxes[:, 0] + right * width, boxes[:, 1] + v2 * height], dim=1)


def localized_cutmix_targets(values: Tensor, indices: Tensor, boxes: Tensor, flip: Tensor,
                             sample_index: Tensor, rect: Rect, *, num_classes: int,
                             single: bool = False) -> Tensor:
    """Targets of a batch after pasting `rect` of each partner (the batch reversed).

    Args:
        values (Tensor[N, K, H, W]), indices (Tensor[N, K, H, W]): the label-map store.
        boxes (Tensor[B, 4]): crop boxes; flip (Tensor[B]): mirrored crops;
        sample_index (Tensor[B]): store rows of the batch.
        rect: the pasted rectangle (u1, v1, u2, v2), normalized to the output image.
        num_classes: C.
        single: one-hot argmax targets ("localized_single") instead of softmax.

    Returns:
        Tensor[B, C]: float32 targets, each summing to 1.
    """
    partner = torch.arange(len(boxes) - 1, -1, -1, device=boxes.device)
    share = (rect[2] - rect[0]) * (rect[3] - rect[1])
    kind = "argmax" if single else "softmax"
    pooled = dict(num_classes=num_classes, check_inputs=False)
    pasted = label_pooling(values, indices, crop_to_image(boxes[partner], flip[partner], rect),
                           sample_index=sample_index[partner], mode=kind, **pooled)
    if share >= 1.0:
        return pasted
    whole = label_pooling(values, indices, boxes, sample_index=sample_index, mode="logits",
                          **pooled)
    if share <= 0.0:
        remainder = whole
    else:
        covered = label_pooling(values, indices, crop_to_image(boxes, flip, rect),
                                sample_index=sample_index, mode="logits", **pooled)
        remainder = (whole - share * covered) / (1.0 - share)
    if single:
        base = torch.zeros_like(remainder).scatter_(1, remainder.argmax(1, keepdim=True), 1.0)
    else:
        base = remainder.softmax(dim=1)
    return (1.0 - share) * base + share * pasted


def cutmix(images: Tensor, rng: np.random.Generator, beta: float) -> Tuple[Tensor, Rect]:
    """Paste one random rectangle of each partner (the batch reversed) into every image.

    Returns the mixed images and the rectangle (u1, v1, u2, v2) normalized to the image; its
    area is the partner's share.
    """
    height, width = images.shape[-2:]
    top, left, bottom, right = random_rect(float(rng.beta(beta, beta)), height, width, rng)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    return mixed, (left / width, top / height, right / width, bottom / height)
