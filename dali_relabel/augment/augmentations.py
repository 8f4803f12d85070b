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
import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import nvidia.dali.types as types
import torch

from dali_relabel.augment.auto_augment import (AutoAugmentPolicy, auto_augment_graph,
                                               check_ra_magnitude, parse_auto_augment)
from dali_relabel.augment.color import (HUE, Range, color_jitter_graph, parse_color_jitter,
                                        plan_color_jitter, plan_lighting)
from dali_relabel.augment.draws import AugmentDraws
from dali_relabel.augment.random_erasing import RE_MODES, plan_erasing, random_erase

__all__ = ["Augmentations"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Augmentations:
    """The training loader's augmentations, checked (see ReLabelLoader's arguments).

    Attributes:
        color_jitter: Four factor ranges (brightness, contrast, saturation, hue; None = off),
            or None.
        lighting: PCA lighting noise standard deviation (alphastd), 0 = off.
        policy: The auto-augment policy, or None.
        re_prob: Probability of random erasing per image.
        re_mode: "const", "rand" or "pixel".
        re_count: Most rectangles erased per image.
    """

    color_jitter: Optional[tuple[Range, ...]]
    lighting: float
    policy: Optional[AutoAugmentPolicy]
    re_prob: float
    re_mode: str
    re_count: int

    @classmethod
    def create(cls, *, color_jitter, force_color_jitter: bool, lighting: float,
               auto_augment: Optional[str], re_prob: float, re_mode: str,
               re_count: int, ra_magnitude: int = 9) -> Augmentations:
        """Checks the arguments (ValueError naming the bad one) and applies timm's rule that
        a policy replaces colour jitter unless force_color_jitter."""
        ranges = parse_color_jitter(color_jitter)
        check_ra_magnitude(ra_magnitude)
        policy = None
        if auto_augment is not None:
            policy = parse_auto_augment(auto_augment, ra_magnitude=ra_magnitude)
        if policy is not None and ranges is not None and not force_color_jitter:
            logger.info("auto_augment=%r replaces color_jitter, as in timm; "
                        "force_color_jitter=True applies both", auto_augment)
            ranges = None
        if isinstance(lighting, bool) or not isinstance(lighting, (int, float)) or not (
                0.0 <= lighting < math.inf):
            raise ValueError(f"lighting must be a float >= 0 (alphastd), got {lighting!r}")
        if isinstance(re_prob, bool) or not isinstance(re_prob, (int, float)) or not (
                0.0 <= re_prob <= 1.0):
            raise ValueError(f"re_prob must be a probability in [0, 1], got {re_prob!r}")
        if re_mode not in RE_MODES:
            raise ValueError(f"re_mode must be one of {RE_MODES}, got {re_mode!r}")
        if isinstance(re_count, bool) or not isinstance(re_count, int) or re_count < 1:
            raise ValueError(f"re_count must be an int >= 1, got {re_count!r}")
        return cls(color_jitter=ranges, lighting=float(lighting), policy=policy,
                   re_prob=float(re_prob), re_mode=re_mode, re_count=re_count)

    @property
    def in_graph(self) -> bool:
        """Whether the DALI graph has work to do (and a feed of planned parameters)."""
        return self.color_jitter is not None or self.lighting > 0 or self.policy is not None

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
        return inputs

    def plan(self, n: int, image_size: int, rng: np.random.Generator) -> AugmentDraws:
        """Every random draw of `n` samples: the graph's inputs and the erased rectangles."""
        draws: dict[str, np.ndarray] = {}
        if self.color_jitter is not None:
            draws.update(plan_color_jitter(self.color_jitter, n, rng))
        if self.lighting > 0:
            draws["lighting"] = plan_lighting(self.lighting, n, rng)
        if self.policy is not None:
            draws.update(self.policy.plan(n, rng, image_size))
        if self.re_prob > 0:
            draws["erase_boxes"] = plan_erasing(n, image_size, self.re_prob, self.re_count, rng)
            # The noise seed of a batch is its first sample's.
            draws["erase_seed"] = rng.integers(0, 2 ** 62, size=n)
        return AugmentDraws(**draws)

    def graph_arrays(self, draws: AugmentDraws) -> tuple[np.ndarray, ...]:
        """The arrays of `draws` that the graph takes, in the order of ``graph_inputs``."""
        return tuple(np.ascontiguousarray(getattr(draws, name)) for name in self.graph_inputs)

    def graph(self, images, params: dict[str, Any], *, image_size: int,
              mean: Sequence[float]):
        """The DALI part on resized uint8 HWC images (already mirrored when a policy runs,
        since its geometric operations come after the flip in timm): policy, then colour
        jitter. Returns the images and the mean to normalize with (lighting shifts it)."""
        if self.policy is not None:
            images = auto_augment_graph(images, params["aug_ops"], params["aug_params"], self.policy,
                                   image_size, self.policy.fill_value(mean))
        if self.color_jitter is not None:
            images = color_jitter_graph(images, params.get("jitter_blend"), params.get("jitter_hue"),
                                   self.color_jitter)
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
