"""Colour jitter, greyscale, Gaussian blur and PCA lighting, planned on the host, applied in
the DALI graph.

torchvision's ColorJitter (factors drawn per image, applied in a random order, float pixels
clamped after each operation; timm's --color-jitter-prob applies it to a share of the images),
RandomGrayscale and GaussianBlur(23) as timm's --grayscale-prob and --gaussian-blur-prob, and
the AlexNet PCA lighting noise of fb.resnet.torch and the official ReLabel recipe.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

__all__ = ["GRAY_WEIGHTS", "LIGHTING_EIGVAL", "LIGHTING_EIGVEC", "Range", "color_jitter_graph",
           "gaussian_blur_graph", "grayscale_graph", "parse_color_jitter", "plan_color_jitter",
           "plan_gaussian_blur", "plan_grayscale", "plan_lighting"]

# AlexNet's PCA of ImageNet RGB (0-1 scale), as in fb.resnet.torch and the official ReLabel
# code: eigenvalues and eigenvectors (one per column).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
# Luma weights of PIL's convert("L"), the grey that contrast and saturation blend towards.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
# timm's --gaussian-blur-prob: torchvision's GaussianBlur(kernel_size=23), sigma in [0.1, 2].
BLUR_WINDOW = 23
BLUR_SIGMA = (0.1, 2.0)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

Range = Optional[tuple[float, float]]


def _jitter_range(name: str, value: Union[float, Sequence[float]]) -> Range:
    """torchvision ColorJitter's range of one factor; None when it changes nothing."""
    center, low, high = (0.0, -0.5, 0.5) if name == "hue" else (1.0, 0.0, math.inf)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(
            value):
        raise ValueError(f"color_jitter: {name} must be a finite float, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or (name == "hue" and value > 0.5):
            bound = "[0, 0.5]" if name == "hue" else ">= 0"
            raise ValueError(f"color_jitter: {name} must be {bound}, got {value!r}")
        value = (center - value, center + value)
        if name != "hue":
            value = (max(value[0], 0.0), value[1])
    elif (not isinstance(value, Sequence) or len(value) != 2
          or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                     and math.isfinite(v) for v in value)
          or not low <= value[0] <= value[1] <= high):
        raise ValueError(f"color_jitter: {name} must be a float or a (min, max) pair within "
                         f"[{low}, {high}], got {value!r}")
    if value[0] == value[1] == center:
        return None
    return float(value[0]), float(value[1])


def parse_color_jitter(value: Union[None, float, Sequence[Any]]) -> Optional[tuple[Range, ...]]:
    """timm's color_jitter argument as four factor ranges (brightness, contrast, saturation,
    hue), None for a factor that is off; None when all are.

    A float x jitters brightness, contrast and saturation by factors in [max(0, 1-x), 1+x];
    a tuple (b, c, s) or (b, c, s, h) gives each its own, as torchvision's ColorJitter: a
    float or a (min, max) pair, hue within [-0.5, 0.5].
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) not in (3, 4):
        raise ValueError(f"color_jitter must be a float or (brightness, contrast, saturation"
                         f"[, hue]), got {value!r}")
    ranges = tuple(_jitter_range(name, v) for name, v in zip(_JITTER_NAMES, value))
    ranges += (None,) * (4 - len(ranges))
    return ranges if any(r is not None for r in ranges) else None


def plan_color_jitter(ranges: tuple[Range, ...], n: int, rng: np.random.Generator,
                      prob: Optional[float] = None) -> dict[str, np.ndarray]:
    """Factors and a random order of the enabled operations per sample (torchvision draws
    every factor, then applies them in a random permutation); with `prob` (timm's
    --color-jitter-prob, a RandomApply) only that share of the samples is jittered."""
    enabled = [k for k, r in enumerate(ranges) if r is not None]
    factors = np.zeros((n, 4), np.float32)
    for k in enabled:
        factors[:, k] = rng.uniform(*ranges[k], size=n)
    order = np.asarray(enabled)[np.argsort(rng.random((n, len(enabled))), axis=1)]
    # Position p applies one blend x -> center + a * (x - center) with center = w_mean * mean
    # grey + w_grey * grey (brightness: 0, contrast: the mean, saturation: the grey), and a hue
    # rotation where hue is the operation at p (a = 1, no blend, there).
    blend = np.zeros((n, len(enabled), 3), np.float32)
    blend[..., 0] = np.where(order == HUE, 1.0, np.take_along_axis(factors, order, 1))
    blend[..., 1] = order == CONTRAST
    blend[..., 2] = order == SATURATION
    hue = np.where(order == HUE, factors[:, [HUE]], 0.0).astype(np.float32)
    if prob is not None:  # the others get the identity: factor 1, no blend centre, no hue
        skipped = rng.random(n) >= prob
        blend[skipped] = (1.0, 0.0, 0.0)
        hue[skipped] = 0.0
    plan = {}
    if any(ranges[k] is not None for k in (BRIGHTNESS, CONTRAST, SATURATION)):
        plan["jitter_blend"] = blend
    if ranges[HUE] is not None:
        plan["jitter_hue"] = hue
    return plan


def plan_grayscale(prob: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """timm's --grayscale-prob (torchvision's RandomGrayscale): float32 [n], 1 where the
    sample becomes grey."""
    return (rng.random(n) < prob).astype(np.float32)


def plan_gaussian_blur(prob: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """timm's --gaussian-blur-prob (RandomApply of torchvision's GaussianBlur(23), sigma
    uniform in [0.1, 2]): float32 [n] sigma, 0 where the sample is not blurred."""
    sigma = rng.uniform(*BLUR_SIGMA, size=n)
    return np.where(rng.random(n) < prob, sigma, 0.0).astype(np.float32)


def plan_lighting(alphastd: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """PCA lighting offsets of `n` samples, float32 [n, 3] on the 0-255 scale: eigvec @
    (alpha * eigval) with alpha ~ N(0, alphastd) per component."""
    alpha = rng.normal(0.0, alphastd, size=(n, 3))
    offset = (np.asarray(LIGHTING_EIGVEC) @ (alpha * LIGHTING_EIGVAL).T).T
    return (255.0 * offset).astype(np.float32)


def _hue_shift(x, shift):
    """torchvision's adjust_hue on float RGB (0-255): rotate the HSV hue by `shift` turns.

    Hue rotation keeps each pixel's maximum and chroma (max - min), so RGB comes back as
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 * hue) mod 6`` and n = 5,
    3, 1 for R, G, B: the usual HSV-to-RGB formula, without building the HSV image.
    """
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    high = dmath.max(dmath.max(r, g), b)
    chroma = high - dmath.min(dmath.min(r, g), b)
    divisor = chroma + (chroma == 0)
    rc, gc, bc = (high - r) / divisor, (high - g) / divisor, (high - b) / divisor
    is_r = high == r
    is_g = (high == g) & (high != r)
    is_b = (high != g) & (high != r)
    sixths = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    k = types.Constant(np.array([5.0, 3.0, 1.0], np.float32)) + sixths + 6.0 * (1.0 + shift)
    k = k - 6.0 * dmath.floor(k / 6.0)
    return high - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def color_jitter_graph(images, blend, hue, ranges: tuple[Range, ...]):
    """The planned jitter on uint8 HWC images (`blend`, `hue`: the planned per-position
    parameters, None for a part that is off); float32 (0-255) out, clamped after every
    operation as torchvision clamps float images."""
    x = fn.cast(images, dtype=types.FLOAT)
    contrast, saturation = ranges[CONTRAST] is not None, ranges[SATURATION] is not None
    weights = types.Constant(np.array(GRAY_WEIGHTS, np.float32))
    for p in range(sum(r is not None for r in ranges)):
        if blend is not None:
            center = 0.0
            if contrast or saturation:
                grey = fn.reductions.sum(x * weights, axes=2, keep_dims=True)
                if contrast:
                    center = blend[p, 1] * fn.reductions.mean(grey)
                if saturation:
                    center = center + blend[p, 2] * grey
            x = dmath.clamp(center + blend[p, 0] * (x - center), 0.0, 255.0)
        if hue is not None:
            if hue[p] != 0:  # a DALI conditional: only the samples with hue at position p
                x = _hue_shift(x, hue[p])
    return x


def grayscale_graph(x, grey):
    """Float RGB images (0-255) made grey (PIL's luma, in all three channels) where the
    planned `grey` is 1."""
    weights = types.Constant(np.array(GRAY_WEIGHTS, np.float32))
    luma = fn.reductions.sum(x * weights, axes=2, keep_dims=True)
    return x + grey * (luma - x)


def gaussian_blur_graph(x, sigma):
    """Float images blurred where the planned `sigma` is positive (a DALI conditional),
    with torchvision's GaussianBlur(23) window."""
    if sigma > 0:
        x = fn.gaussian_blur(x, sigma=sigma, window_size=BLUR_WINDOW)
    return x
