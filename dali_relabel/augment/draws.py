"""Per-sample draws: what the host planned for every sample of an epoch, typed and sliced
together.

Everything random about a training epoch is drawn on the host before DALI runs (the crop
windows and flips of ``loading.plan``, the augmentation parameters here, the mixing of
``loading.mixing``). Each kind is a frozen dataclass of arrays with one entry per sample;
``draws[samples]`` slices every array at once, so a batch, or what a resumed epoch has left,
is one expression.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, TypeVar

import numpy as np

__all__ = ["AugmentDraws", "PerSample"]

_Draws = TypeVar("_Draws", bound="PerSample")


@dataclasses.dataclass(frozen=True)
class PerSample:
    """Base of the draws: every array (or nested draws) field has one entry per sample;
    other fields (an epoch number, a batch size) are kept as they are by slicing."""

    def __getitem__(self: _Draws, samples: slice | np.ndarray) -> _Draws:
        """The draws of `samples` (a slice or an index array) of every field."""
        return dataclasses.replace(self, **{
            field.name: value[samples] for field in dataclasses.fields(self)
            if isinstance(value := getattr(self, field.name), (np.ndarray, PerSample))})


@dataclasses.dataclass(frozen=True)
class AugmentDraws(PerSample):
    """One epoch's augmentation parameters, per sample; None where that augmentation is off.

    Attributes:
        jitter_blend (ndarray[n, P, 3], optional): float32 colour-jitter blends per position
            of the random order: factor, contrast weight, saturation weight.
        jitter_hue (ndarray[n, P], optional): float32 hue shift (turns) per position.
        lighting (ndarray[n, 3], optional): float32 PCA lighting offset (0-255 scale).
        aug_ops (ndarray[n, L], optional): int32 auto-augment operation per layer (the
            number of operations: none).
        aug_params (ndarray[n, L], optional): float32 argument of each layer's operation.
        erase_boxes (ndarray[n, R, 4], optional): int32 erased rectangles (top, left,
            height, width), zero-sized for none.
        erase_seed (ndarray[n], optional): int64 noise seed (a batch uses its first
            sample's).
        grayscale (ndarray[n], optional): float32, 1 where the image becomes grey.
        blur_sigma (ndarray[n], optional): float32 Gaussian blur sigma, 0 for none.
        resize_filter (ndarray[n], optional): int32 DALI interpolation type of each crop's
            resize (interpolation="random").
    """

    jitter_blend: Optional[np.ndarray] = None
    jitter_hue: Optional[np.ndarray] = None
    lighting: Optional[np.ndarray] = None
    aug_ops: Optional[np.ndarray] = None
    aug_params: Optional[np.ndarray] = None
    erase_boxes: Optional[np.ndarray] = None
    erase_seed: Optional[np.ndarray] = None
    grayscale: Optional[np.ndarray] = None
    blur_sigma: Optional[np.ndarray] = None
    resize_filter: Optional[np.ndarray] = None
