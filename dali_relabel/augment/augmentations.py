"""The training loader's augmentations beyond the crop, checked and tied together.

Per image, in the DALI graph: an auto-augment policy (``auto_augment.py``), colour jitter and
PCA lighting (``color.py``); per batch, on the device: random erasing (``random_erasing.py``).
As with the crop windows, every random choice (jitter factors and their order, lighting noise,
the policy's operations, magnitudes and signs, erased rectangles) is drawn on the host for a
whole epoch from (seed, rank, epoch) into ``AugmentDraws``: the same seed gives the same
batches and a resumed epoch continues with the same draws. None of them moves the crop
window, so the targets pooled from the planned boxes still describe the crop (a policy's
shears, rotations and translations move content inside the crop, as in any ReLabel recipe
that uses them).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch

from dali_relabel import _checks
from dali_relabel.augment.auto_augment import (AutoAugmentPolicy, auto_augment_graph,
                                               check_ra_magnitude, parse_auto_augment)
from dali_relabel.augment.color import (HUE, Range, color_jitter_graph, gaussian_blur_graph,
                                        grayscale_graph, parse_color_jitter, plan_color_jitter,
                                        plan_gaussian_blur, plan_grayscale, plan_lighting)
from dali_relabel.augment.draws import AugmentDraws
from dali_relabel.augment.random_erasing import RE_MODES, plan_erasing, random_erase

__all__ = ["INTERPOLATIONS", "Augmentations"]

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "bicubic", "random")
MAX_ERASED = 64  # rectangles per image


@dataclasses.dataclass(frozen=True)
class Augmentations:
    """The training loader's augmentations, checked (see ReLabelLoader's arguments).

    Attributes:
        color_jitter: Four factor ranges (brightness, contrast, saturation, hue; None = off),
            or None.
        color_jitter_prob: Share of the images jittered (None: all).
        grayscale_prob: Probability of a grey image.
        gaussian_blur_prob: Probability of a Gaussian blur.
        lighting: PCA lighting noise standard deviation (alphastd), 0 = off.
        policy: The auto-augment policy, or None.
        re_prob: Probability of random erasing per image.
        re_mode: "const", "rand" or "pixel".
        re_count: Most rectangles erased per image.
        interpolation: The crops' resize filter: "bilinear", "bicubic", or "random" (one of
            the two per image, as timm's default --train-interpolation).
    """

    color_jitter: Optional[tuple[Range, ...]]
    lighting: float
    policy: Optional[AutoAugmentPolicy]
    re_prob: float
    re_mode: str
    re_count: int
    color_jitter_prob: Optional[float] = None
    grayscale_prob: float = 0.0
    gaussian_blur_prob: float = 0.0
    interpolation: str = "bilinear"

    @classmethod
    def create(cls, *, color_jitter, force_color_jitter: bool, lighting: float,
               auto_augment: Optional[str], re_prob: float, re_mode: str,
               re_count: int, ra_magnitude: int = 9, color_jitter_prob: Optional[float] = None,
               grayscale_prob: float = 0.0, gaussian_blur_prob: float = 0.0,
               interpolation: str = "bilinear") -> Augmentations:
        """Checks the arguments (ValueError naming the bad one) and applies timm's rule that
        a policy replaces colour jitter unless force_color_jitter (or the policy is "3a")."""
        ranges = parse_color_jitter(color_jitter)
        check_ra_magnitude(ra_magnitude)
        _checks.check_bool("force_color_jitter", force_color_jitter)
        policy = None
        if auto_augment is not None:
            policy = parse_auto_augment(auto_augment, ra_magnitude=ra_magnitude)
        keeps_jitter = force_color_jitter or (policy is not None and
                                              policy.config.split("-")[0] == "3a")
        if policy is not None and ranges is not None and not keeps_jitter:
            logger.info("auto_augment=%r replaces color_jitter, as in timm; "
                        "force_color_jitter=True applies both", auto_augment)
            ranges = None
        lighting = _checks.check_float("lighting", lighting, 0.0)
        re_prob = _checks.check_probability("re_prob", re_prob)
        _checks.check_choice("re_mode", re_mode, RE_MODES)
        _checks.check_int("re_count", re_count, 1, MAX_ERASED)
        if color_jitter_prob is not None:
            color_jitter_prob = _checks.check_probability("color_jitter_prob",
                                                          color_jitter_prob)
        grayscale_prob = _checks.check_probability("grayscale_prob", grayscale_prob)
        gaussian_blur_prob = _checks.check_probability("gaussian_blur_prob", gaussian_blur_prob)
        _checks.check_choice("interpolation", interpolation, INTERPOLATIONS)
        return cls(color_jitter=ranges, lighting=lighting, policy=policy, re_prob=re_prob,
                   re_mode=re_mode, re_count=re_count, color_jitter_prob=color_jitter_prob,
                   grayscale_prob=grayscale_prob, gaussian_blur_prob=gaussian_blur_prob,
                   interpolation=interpolation)

    @property
    def in_graph(self) -> bool:
        """Whether the DALI graph has work to do (and a feed of planned parameters)."""
        return bool(self.graph_inputs)

    @property
    def graph_inputs(self) -> dict[str, tuple[Any, int]]:
        """The feed's outputs, in order: name -> (DALI type, ndim per sample)."""
        inputs = {}
        if self.color_jitter is not None:
            if any(r is not None for r in self.color_jitter[:HUE]):
                inputs["jitter_blend"] = (types.FLOAT, 2)
            if self.color_jitter[HUE] is not None:
                inputs["jitter_hue"] = (types.FLOAT, 1)
        if self.lighting > 0:
            inputs["lighting"] = (types.FLOAT, 1)
        if self.policy is not None:
            inputs.update(aug_ops=(types.INT32, 1), aug_params=(types.FLOAT, 1))
        if self.grayscale_prob > 0:
            inputs["grayscale"] = (types.FLOAT, 0)
        if self.gaussian_blur_prob > 0:
            inputs["blur_sigma"] = (types.FLOAT, 0)
        if self.interpolation == "random":
            inputs["resize_filter"] = (types.INT32, 0)
        return inputs

    def plan(self, n: int, image_size: int, rng: np.random.Generator) -> AugmentDraws:
        """Every random draw of `n` samples: the graph's inputs and the erased rectangles."""
        draws: dict[str, np.ndarray] = {}
        if self.color_jitter is not None:
            draws.update(plan_color_jitter(self.color_jitter, n, rng, self.color_jitter_prob))
        if self.lighting > 0:
            draws["lighting"] = plan_lighting(self.lighting, n, rng)
        if self.policy is not None:
            draws.update(self.policy.plan(n, rng, image_size))
        if self.re_prob > 0:
            draws["erase_boxes"] = plan_erasing(n, image_size, self.re_prob, self.re_count, rng)
            # The noise seed of a batch is its first sample's.
            draws["erase_seed"] = rng.integers(0, 2 ** 62, size=n)
        if self.grayscale_prob > 0:
            draws["grayscale"] = plan_grayscale(self.grayscale_prob, n, rng)
        if self.gaussian_blur_prob > 0:
            draws["blur_sigma"] = plan_gaussian_blur(self.gaussian_blur_prob, n, rng)
        if self.interpolation == "random":  # timm: bilinear or bicubic, one per image
            filters = np.array([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)], np.int32)
            draws["resize_filter"] = filters[rng.integers(0, 2, size=n)]
        return AugmentDraws(**draws)

    def graph_arrays(self, draws: AugmentDraws) -> tuple[np.ndarray, ...]:
        """The arrays of `draws` that the graph takes, in the order of ``graph_inputs``."""
        return tuple(np.ascontiguousarray(getattr(draws, name)) for name in self.graph_inputs)

    def graph(self, images, params: dict[str, Any], *, image_size: int,
              mean: Sequence[float]):
        """The DALI part on resized uint8 HWC images (already mirrored when a policy runs,
        since its geometric operations come after the flip in timm): policy, colour jitter,
        greyscale, blur (timm's order). Returns the images and the mean to normalize with
        (lighting shifts it)."""
        if self.policy is not None:
            images = auto_augment_graph(images, params["aug_ops"], params["aug_params"], self.policy,
                                   image_size, self.policy.fill_value(mean))
        if self.color_jitter is not None:
            images = color_jitter_graph(images, params.get("jitter_blend"),
                                        params.get("jitter_hue"), self.color_jitter)
        if self.grayscale_prob > 0 or self.gaussian_blur_prob > 0:
            images = fn.cast(images, dtype=types.FLOAT)  # a no-op after the jitter
            if self.grayscale_prob > 0:
                images = grayscale_graph(images, params["grayscale"])
            if self.gaussian_blur_prob > 0:
                images = gaussian_blur_graph(images, params["blur_sigma"])
        mean_node = list(mean)
        if self.lighting > 0:
            # (x + offset - mean) / std: lighting is a per-sample shift of the mean.
            mean_node = types.Constant(np.asarray(mean, np.float32)) - params["lighting"]
        return images, mean_node

    def device_step(self, images: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        """The per-batch part on the device, after mixing: random erasing of the batch's
        planned rectangles (`draws`: this batch's)."""
        if self.re_prob == 0:
            return images
        return random_erase(images, draws.erase_boxes, self.re_mode, int(draws.erase_seed[0]))
