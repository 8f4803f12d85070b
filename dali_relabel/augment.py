"""Augmentations of the training loader beyond the crop: colour jitter, PCA lighting and
auto-augment policies in the DALI graph, random erasing on the device.

As with the crop windows, every random choice (jitter factors and their order, lighting noise,
the policy's operations, magnitudes and signs, erased rectangles) is drawn on the host for a
whole epoch from (seed, rank, epoch): the same seed gives the same batches and a resumed epoch
continues with the same draws. None of them moves the crop window, so the targets pooled from
the planned boxes still describe the crop (a policy's shears, rotations and translations move
content inside the crop, as they do in any ReLabel recipe that uses them).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali.auto_aug import augmentations as dali_aug
from nvidia.dali.auto_aug.core import select

from dali_relabel._loading import to_device

__all__ = ["AutoAugmentPolicy", "Augmentations", "LIGHTING_EIGVAL",
           "LIGHTING_EIGVEC", "RE_MODES", "check_ra_magnitude", "parse_auto_augment",
           "parse_color_jitter", "random_erase"]

logger = logging.getLogger(__name__)

# AlexNet's PCA of ImageNet RGB (0-1 scale), as in fb.resnet.torch and the official ReLabel
# code: eigenvalues and eigenvectors (one per column).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
# Luma weights of PIL's convert("L"), the grey that contrast and saturation blend towards.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
RE_MODES = ("const", "rand", "pixel")
# timm's RandomErasing: area fraction and log aspect-ratio ranges, attempts per rectangle.
RE_AREA = (0.02, 1 / 3)
RE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
RE_ATTEMPTS = 10

_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)

# ---- colour jitter -------------------------------------------------------------------------

Range = Optional[tuple[float, float]]


def _jitter_range(name: str, value: Union[float, Sequence[float]]) -> Range:
    """torchvision ColorJitter's range of one factor; None when it changes nothing."""
    center, low, high = (0.0, -0.5, 0.5) if name == "hue" else (1.0, 0.0, math.inf)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or (name == "hue" and value > 0.5):
            bound = "[0, 0.5]" if name == "hue" else ">= 0"
            raise ValueError(f"color_jitter: {name} must be {bound}, got {value!r}")
        value = (center - value, center + value)
        if name != "hue":
            value = (max(value[0], 0.0), value[1])
    elif (not isinstance(value, Sequence) or len(value) != 2
          or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
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


def _plan_color_jitter(ranges: tuple[Range, ...], n: int,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Factors and a random order of the enabled operations per sample (torchvision draws
    every factor, then applies them in a random permutation)."""
    enabled = [k for k, r in enumerate(ranges) if r is not None]
    factors = np.zeros((n, 4), np.float32)
    for k in enabled:
        factors[:, k] = rng.uniform(*ranges[k], size=n)
    order = np.asarray(enabled)[np.argsort(rng.random((n, len(enabled))), axis=1)]
    # Position p applies one blend x -> center + a * (x - center) with center = w_mean * mean
    # grey + w_grey * grey (brightness: 0, contrast: the mean, saturation: the grey), and a hue
    # rotation where hue is the operation at p (a = 1, no blend, there).
    blend = np.zeros((n, len(enabled), 3), np.float32)
    blend[..., 0] = np.where(order == _HUE, 1.0, np.take_along_axis(factors, order, 1))
    blend[..., 1] = order == _CONTRAST
    blend[..., 2] = order == _SATURATION
    hue = np.where(order == _HUE, factors[:, [_HUE]], 0.0).astype(np.float32)
    plan = {}
    if any(ranges[k] is not None for k in (_BRIGHTNESS, _CONTRAST, _SATURATION)):
        plan["jitter_blend"] = blend
    if ranges[_HUE] is not None:
        plan["jitter_hue"] = hue
    return plan


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


def _color_jitter(images, blend, hue, ranges: tuple[Range, ...]):
    """The planned jitter on uint8 HWC images (`blend`, `hue`: the planned per-position
    parameters, None for a part that is off); float32 (0-255) out, clamped after every
    operation as torchvision clamps float images."""
    x = fn.cast(images, dtype=types.FLOAT)
    contrast, saturation = ranges[_CONTRAST] is not None, ranges[_SATURATION] is not None
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


# ---- auto-augment policies -----------------------------------------------------------------

# timm's magnitude scale: m out of 10 (magnitudes are clipped to [0, 10], or [0, mmax]).
_LEVEL_DENOM = 10.0
_SHARPNESS_BLUR = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's SMOOTH
_IDENTITY_KERNEL = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)


def _bits_mask(bits: np.ndarray) -> np.ndarray:
    """PIL's ImageOps.posterize(img, bits) as the mask it ANDs with (8 bits keep all)."""
    bits = np.clip(bits, 0, 8).astype(np.int64)
    return ((0xFF << (8 - bits)) & 0xFF).astype(np.float32)


def _graph_ops(fill: int, size: int) -> dict[str, Callable]:
    """DALI's auto-augment operations (nvidia.dali.auto_aug.augmentations) by kind, each
    taking uint8 HWC images and the planned scalar parameter of every sample."""
    warp = dict(fill_value=fill, interp_type=types.INTERP_LINEAR)
    x_axis, y_axis = (types.Constant(np.array(v, np.float32)) for v in ([1, 0], [0, 1]))

    def sharpness(data, factor):  # PIL's enhance: blur * (1 - factor) + image * factor
        kernel = (types.Constant(_SHARPNESS_BLUR) * (1.0 - factor)
                  + types.Constant(_IDENTITY_KERNEL) * factor)
        return fn.filter(data, kernel.gpu() if data.device == "gpu" else kernel)

    return {
        "identity": lambda data, p: data,
        "auto_contrast": lambda data, p: dali_aug.auto_contrast.op(data, None),
        "equalize": lambda data, p: fn.equalize(data),  # OpenCV's histogram equalization
        "invert": lambda data, p: dali_aug.invert.op(data, None),
        "rotate": lambda data, p: dali_aug.rotate.op(data, p, **warp),
        "shear_x": lambda data, p: dali_aug.shear_x.op(data, p * x_axis, **warp),
        "shear_y": lambda data, p: dali_aug.shear_y.op(data, p * y_axis, **warp),
        # Relative translations (timm: a fraction of the side), absolute ones (torchvision's
        # TrivialAugmentWide: pixels).
        "translate_x": lambda data, p: dali_aug.translate_x.op(data, p * x_axis,
                                                               (size, size), **warp),
        "translate_y": lambda data, p: dali_aug.translate_y.op(data, p * y_axis,
                                                               (size, size), **warp),
        "translate_x_px": lambda data, p: dali_aug.translate_x_no_shape.op(data, p * x_axis,
                                                                           **warp),
        "translate_y_px": lambda data, p: dali_aug.translate_y_no_shape.op(data, p * y_axis,
                                                                           **warp),
        "brightness": lambda data, p: dali_aug.brightness.op(data, p),
        "contrast": lambda data, p: dali_aug.contrast.op(data, p),
        "color": lambda data, p: dali_aug.color.op(data, p),
        "sharpness": sharpness,
        "posterize": lambda data, p: dali_aug.posterize.op(data, fn.cast(p, dtype=types.UINT8)),
        "solarize": lambda data, p: dali_aug.solarize.op(data, p),
        "solarize_add": lambda data, p: dali_aug.solarize_add.op(
            data, fn.cast(p, dtype=types.UINT8)),
    }


def _level(scale: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda v: v / _LEVEL_DENOM * scale


def _enhance(v: np.ndarray) -> np.ndarray:
    return v / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(v: np.ndarray) -> np.ndarray:
    return np.maximum(0.1, 1.0 + v / _LEVEL_DENOM * 0.9)


def _solarize(v: np.ndarray) -> np.ndarray:
    return np.minimum(256, np.trunc(v / _LEVEL_DENOM * 256))


# timm's operations (timm.data.auto_augment's NAME_TO_OP and LEVEL_TO_ARG): name -> (DALI
# kind, magnitude randomly negated, (signed) level -> the operation's parameter).
_TIMM_OPS: dict[str, tuple[str, bool, Optional[Callable[[np.ndarray], np.ndarray]]]] = {
    "AutoContrast": ("auto_contrast", False, None),
    "Equalize": ("equalize", False, None),
    "Invert": ("invert", False, None),
    "Rotate": ("rotate", True, _level(30.0)),
    "Posterize": ("posterize", False, lambda v: _bits_mask(np.trunc(v / _LEVEL_DENOM * 4))),
    "PosterizeIncreasing": ("posterize", False,
                            lambda v: _bits_mask(4 - np.trunc(v / _LEVEL_DENOM * 4))),
    "PosterizeOriginal": ("posterize", False,
                          lambda v: _bits_mask(np.trunc(v / _LEVEL_DENOM * 4) + 4)),
    "Solarize": ("solarize", False, _solarize),
    "SolarizeIncreasing": ("solarize", False, lambda v: 256 - _solarize(v)),
    "SolarizeAdd": ("solarize_add", False,
                    lambda v: np.minimum(128, np.trunc(v / _LEVEL_DENOM * 110))),
    "Color": ("color", False, _enhance),
    "ColorIncreasing": ("color", True, _enhance_increasing),
    "Contrast": ("contrast", False, _enhance),
    "ContrastIncreasing": ("contrast", True, _enhance_increasing),
    "Brightness": ("brightness", False, _enhance),
    "BrightnessIncreasing": ("brightness", True, _enhance_increasing),
    "Sharpness": ("sharpness", False, _enhance),
    "SharpnessIncreasing": ("sharpness", True, _enhance_increasing),
    "ShearX": ("shear_x", True, _level(0.3)),
    "ShearY": ("shear_y", True, _level(0.3)),
    "TranslateXRel": ("translate_x", True, _level(0.45)),  # timm's translate_pct
    "TranslateYRel": ("translate_y", True, _level(0.45)),
}
# torchvision's policies (torchvision.transforms.autoaugment): operation name -> (DALI kind,
# magnitude randomly negated). RandAugment's and TrivialAugmentWide's operations; AutoAugment
# has Invert instead of Identity.
_TV_OPS: dict[str, tuple[str, bool]] = {
    "Identity": ("identity", False),
    "ShearX": ("shear_x", True),
    "ShearY": ("shear_y", True),
    "TranslateX": ("translate_x_px", True),
    "TranslateY": ("translate_y_px", True),
    "Rotate": ("rotate", True),
    "Brightness": ("brightness", True),
    "Color": ("color", True),
    "Contrast": ("contrast", True),
    "Sharpness": ("sharpness", True),
    "Posterize": ("posterize", False),
    "Solarize": ("solarize", False),
    "AutoContrast": ("auto_contrast", False),
    "Equalize": ("equalize", False),
    "Invert": ("invert", False),
}
_TV_RAND_NAMES = tuple(name for name in _TV_OPS if name != "Invert")
_TV_ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")  # factor 1 + magnitude
_TV_BINS = 31  # num_magnitude_bins of RandAugment and TrivialAugmentWide
_TV_AUTO_BINS = 10  # AutoAugment's magnitude bins
_TV_AUTO_POLICIES = ("imagenet", "cifar10", "svhn")  # torchvision's AutoAugmentPolicy values
_TRIVIAL_NAMES = ("ta_wide", "trivialaugment")


def _tv_magnitudes(num_bins: int, size: int, wide: bool) -> dict[str, np.ndarray]:
    """torchvision's _augmentation_space on size x size images: each operation's magnitude
    per bin, computed as torchvision does (float32 torch.linspace, rounded posterize bits);
    `wide`: TrivialAugmentWide's ranges, else RandAugment's and AutoAugment's."""
    def bins(end: float) -> np.ndarray:
        return torch.linspace(0.0, end, num_bins).double().numpy()

    warp, enhance = (0.99, 0.99) if wide else (0.3, 0.9)
    translate = 32.0 if wide else 150.0 / 331.0 * size
    bits = 8 - (torch.arange(num_bins) / ((num_bins - 1) / (6 if wide else 4))).round().int()
    return {"ShearX": bins(warp), "ShearY": bins(warp), "TranslateX": bins(translate),
            "TranslateY": bins(translate), "Rotate": bins(135.0 if wide else 30.0),
            **{name: bins(enhance) for name in _TV_ENHANCE},
            "Posterize": bits.double().numpy(),
            "Solarize": torch.linspace(255.0, 0.0, num_bins).double().numpy()}


def _tv_params(name: str, magnitude: np.ndarray) -> np.ndarray:
    """torchvision's _apply_op arguments of (signed) magnitudes, as the DALI operations take
    them: enhance factors 1 + m, whole-pixel translations int(m), posterize masks."""
    if name in _TV_ENHANCE:
        return 1.0 + magnitude
    if name in ("TranslateX", "TranslateY"):
        return np.trunc(magnitude)
    if name == "Posterize":
        return _bits_mask(magnitude)
    return magnitude


_RAND_KEYS = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}
_AA_POLICIES = ("original", "originalr", "v0", "v0r")


@dataclasses.dataclass(frozen=True)
class _PolicyOp:
    """One operation of a policy: timm's AugmentOp (name, probability, magnitude)."""
    name: str
    prob: float
    magnitude: float


@dataclasses.dataclass(frozen=True)
class AutoAugmentPolicy:
    """A parsed auto_augment string: what to draw per image, and the DALI operations.

    Attributes:
        config: The string it was parsed from.
        kind: "rand" (RandAugment), "auto" (AutoAugment) or "trivial" (TrivialAugmentWide).
        names: The operation names (timm's, or torchvision's).
        layers: Operations applied per image, one after the other.
        sub_policies: AutoAugment's sub-policies; RandAugment's one list of operations (with
            its probability and magnitude); empty for "trivial".
        weights: RandAugment's choice weights (drawn without replacement, as timm), or None
            (uniform, with replacement).
        magnitude_std: Standard deviation of the magnitude noise; inf: uniform in [0, m].
        magnitude_max: Upper clip of the magnitude (timm's mmax, default 10); for
            torchvision's policies the last magnitude bin (30 of 31; AutoAugment: 9 of 10).
        library: "timm" (timm's operations, magnitude m out of 10 through timm's level
            functions, mean-grey fill) or "torchvision" (torchvision's operations, magnitude
            a bin of its augmentation space, black fill).
    """

    config: str
    kind: str
    names: tuple[str, ...]
    layers: int
    sub_policies: tuple[tuple[_PolicyOp, ...], ...]
    weights: Optional[tuple[float, ...]]
    magnitude_std: float
    magnitude_max: float
    library: str = "timm"

    def kinds(self) -> list[str]:
        """The DALI operation of each name, then "identity" for a skipped operation."""
        table = _TV_OPS if self.library == "torchvision" else _TIMM_OPS
        return [table[name][0] for name in self.names] + ["identity"]

    def fill_value(self, mean: Sequence[float]) -> int:
        """The warps' fill (one value for all channels: DALI's warp takes a scalar):
        torchvision's black (its fill=None), else timm's grey, the mean of `mean`."""
        if self.library == "torchvision":
            return 0
        return int(round(min(255.0, max(0.0, sum(mean) / len(mean)))))

    def _magnitudes(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """timm's AugmentOp: magnitude noise, then the clip to [0, magnitude_max]."""
        if self.magnitude_std == math.inf:
            mean = rng.uniform(0.0, mean)
        elif self.magnitude_std > 0:
            mean = rng.normal(mean, self.magnitude_std)
        return np.clip(mean, 0.0, self.magnitude_max)

    def plan(self, n: int, rng: np.random.Generator, image_size: int) -> dict[str, np.ndarray]:
        """Per sample and layer: the operation (int32 index into kinds(); a skipped one is
        the identity) and its parameter (float32, sign and magnitude noise included), for
        image_size x image_size images (torchvision's translations scale with the side)."""
        negative = rng.random((n, self.layers)) < 0.5
        if self.kind == "trivial":  # one operation, magnitude bin and sign per image
            index = rng.integers(0, len(self.names), size=(n, 1))
            levels = rng.integers(0, int(self.magnitude_max) + 1, size=(n, 1))
            applied = np.ones((n, 1), bool)
        else:
            if self.kind == "rand":
                (table,) = self.sub_policies
                if self.weights is None:  # timm: np.random.choice with replacement
                    chosen = rng.integers(0, len(table), size=(n, self.layers))
                else:  # without replacement, by weight: the Gumbel top-k draws the same way
                    keys = np.log(self.weights) + rng.gumbel(size=(n, len(table)))
                    chosen = np.argsort(-keys, axis=1)[:, :self.layers]
            else:  # a uniform sub-policy, its operations in order
                assert len({len(sub) for sub in self.sub_policies}) == 1, self.config
                table = tuple(op for sub in self.sub_policies for op in sub)
                chosen = (self.layers * rng.integers(0, len(self.sub_policies), size=n))[:, None]
                chosen = chosen + np.arange(self.layers)
            index = np.array([self.names.index(op.name) for op in table])[chosen]
            applied = rng.random((n, self.layers)) < np.array([op.prob for op in table])[chosen]
            levels = self._magnitudes(np.array([op.magnitude for op in table])[chosen], rng)
        params = np.zeros((n, self.layers))
        if self.library == "torchvision":
            magnitudes = _tv_magnitudes(int(self.magnitude_max) + 1, image_size,
                                        wide=self.kind == "trivial")
            for k, name in enumerate(self.names):
                mask = index == k
                if name in magnitudes:
                    value = magnitudes[name][levels[mask].astype(np.int64)]
                    signed = _TV_OPS[name][1]
                    params[mask] = _tv_params(
                        name, np.where(negative[mask], -value, value) if signed else value)
        else:
            for k, name in enumerate(self.names):
                _, signed, to_param = _TIMM_OPS[name]
                mask = index == k
                if to_param is not None:
                    params[mask] = to_param(np.where(negative[mask], -levels[mask],
                                                     levels[mask]) if signed else levels[mask])
        ops = np.where(applied, index, len(self.names))
        return dict(aug_ops=ops.astype(np.int32), aug_params=params.astype(np.float32))


def _unsupported(names: Sequence[str], config: str) -> None:
    missing = sorted(set(names) - set(_TIMM_OPS))
    if missing:
        raise ValueError(f"auto_augment={config!r} uses {missing}, which this loader does not "
                         f"implement in DALI (supported: {sorted(_TIMM_OPS)})")


def _parse_rand(config: str, sections: list[str]) -> AutoAugmentPolicy:
    from timm.data.auto_augment import rand_augment_choices  # timm's tables of names

    values: dict[str, Any] = dict(m=10, n=2, p=0.5, mstd=0.0, mmax=None, inc=0)
    transforms = None
    for section in sections:
        if section.startswith("t") and len(section) > 1:
            transforms = section[1:]
            if transforms != "weights":
                raise ValueError(f"auto_augment={config!r}: transform set {transforms!r} is "
                                 "not supported (only 'tweights')")
            continue
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d[\d.]*)", section)
        if match is None:
            raise ValueError(f"auto_augment={config!r}: unknown section {section!r} (expected "
                             "m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>, "
                             "tweights)")
        key, text = match.groups()
        try:
            values[key] = _RAND_KEYS[key](text)
        except ValueError:
            raise ValueError(f"auto_augment={config!r}: {key} needs a number of type "
                             f"{_RAND_KEYS[key].__name__}, got {text!r}") from None
    if values["n"] < 1 or not 0.0 <= values["p"] <= 1.0 or values["inc"] not in (0, 1):
        raise ValueError(f"auto_augment={config!r}: n must be >= 1, p in [0, 1], inc 0 or 1")
    choices = rand_augment_choices(transforms or "", increasing=bool(values["inc"]))
    names = tuple(choices)
    weights = None
    if isinstance(choices, dict):
        total = sum(choices.values())
        weights = tuple(weight / total for weight in choices.values())
        if values["n"] > len(names):
            raise ValueError(f"auto_augment={config!r}: n={values['n']} weighted choices "
                             f"without replacement from {len(names)} operations")
    _unsupported(names, config)
    ops = tuple(_PolicyOp(name, values["p"], float(values["m"])) for name in names)
    mstd = values["mstd"]
    return AutoAugmentPolicy(config=config, kind="rand", names=names, layers=values["n"],
                             sub_policies=(ops,), weights=weights,
                             magnitude_std=math.inf if mstd > 100 else mstd,
                             magnitude_max=float(values["mmax"] or _LEVEL_DENOM))


def _parse_auto(config: str, name: str, sections: list[str]) -> AutoAugmentPolicy:
    from timm.data.auto_augment import auto_augment_policy  # timm's policy tables

    mstd = 0.0
    for section in sections:
        match = re.fullmatch(r"mstd(\d[\d.]*)", section)
        try:
            mstd = float(match.group(1)) if match else float("nan")
        except ValueError:
            mstd = float("nan")
        if math.isnan(mstd):
            raise ValueError(f"auto_augment={config!r}: unknown section {section!r} (expected "
                             "mstd<float>)")
    sub_policies = tuple(tuple(_PolicyOp(op.name, op.prob, float(op.magnitude)) for op in sub)
                         for sub in auto_augment_policy(name))
    names = tuple(dict.fromkeys(op.name for sub in sub_policies for op in sub))
    _unsupported(names, config)
    return AutoAugmentPolicy(config=config, kind="auto", names=names,
                             layers=len(sub_policies[0]), sub_policies=sub_policies,
                             weights=None, magnitude_std=mstd, magnitude_max=_LEVEL_DENOM)


def _parse_torchvision(config: str, name: str, ra_magnitude: int) -> AutoAugmentPolicy:
    """torchvision's --auto-augment policies (its presets.py): RandAugment with num_ops=2,
    magnitude=ra_magnitude of 31 bins; TrivialAugmentWide; AutoAugment by AutoAugmentPolicy."""
    last_bin = float(_TV_BINS - 1)
    if name == "ra":
        ops = tuple(_PolicyOp(op, 1.0, float(ra_magnitude)) for op in _TV_RAND_NAMES)
        return AutoAugmentPolicy(config=config, kind="rand", names=_TV_RAND_NAMES, layers=2,
                                 sub_policies=(ops,), weights=None, magnitude_std=0.0,
                                 magnitude_max=last_bin, library="torchvision")
    if name in _TRIVIAL_NAMES:
        return AutoAugmentPolicy(config=config, kind="trivial", names=_TV_RAND_NAMES, layers=1,
                                 sub_policies=(), weights=None, magnitude_std=0.0,
                                 magnitude_max=last_bin, library="torchvision")
    from torchvision.transforms import autoaugment as tv_aa  # torchvision's policy tables

    table = tv_aa.AutoAugment(tv_aa.AutoAugmentPolicy(name)).policies
    sub_policies = tuple(tuple(_PolicyOp(op, float(prob), float(bin_ or 0)) for op, prob, bin_
                               in sub) for sub in table)
    names = tuple(dict.fromkeys(op.name for sub in sub_policies for op in sub))
    return AutoAugmentPolicy(config=config, kind="auto", names=names,
                             layers=len(sub_policies[0]), sub_policies=sub_policies,
                             weights=None, magnitude_std=0.0,
                             magnitude_max=float(_TV_AUTO_BINS - 1), library="torchvision")


def check_ra_magnitude(ra_magnitude: int) -> None:
    """ValueError unless ra_magnitude is a magnitude bin of torchvision's RandAugment."""
    if (isinstance(ra_magnitude, bool) or not isinstance(ra_magnitude, (int, np.integer))
            or not 0 <= ra_magnitude < _TV_BINS):
        raise ValueError(f"ra_magnitude must be an int in [0, {_TV_BINS - 1}] (a magnitude bin "
                         f"of torchvision's RandAugment), got {ra_magnitude!r}")


_SUPPORTED = ("timm's 'rand-...' (RandAugment, e.g. 'rand-m9-mstd0.5-inc1'), 'original', "
              "'originalr', 'v0', 'v0r' (AutoAugment, optionally '-mstd<float>'); "
              "torchvision's 'ra' (RandAugment), 'ta_wide' or 'trivialaugment' "
              "(TrivialAugmentWide), 'imagenet', 'cifar10', 'svhn' (AutoAugment)")


def parse_auto_augment(config: str, ra_magnitude: int = 9) -> AutoAugmentPolicy:
    """timm's or torchvision's auto_augment string as a policy.

    timm's (its --aa): "rand-m9-mstd0.5-inc1" style RandAugment (sections m, n, p, mstd,
    mmax, inc, tweights, as timm's rand_augment_transform), "original", "originalr", "v0",
    "v0r" AutoAugment (optionally "-mstd0.5"). torchvision's (its --auto-augment, as its
    presets.py builds them): "ra" (RandAugment(num_ops=2, magnitude=ra_magnitude,
    num_magnitude_bins=31)), "ta_wide" / "trivialaugment" (TrivialAugmentWide), "imagenet",
    "cifar10", "svhn" (AutoAugment with that AutoAugmentPolicy). Anything else, timm's and
    torchvision's AugMix included, is refused with a ValueError.

    Every draw is planned on the host and each operation's argument computed there, from
    the library's own definitions: timm's magnitude m out of 10 (mstd noise and the clip to
    [0, mmax] included) through timm's level functions; torchvision's magnitude bins as its
    _augmentation_space computes them (RandAugment's bin ra_magnitude of 31, AutoAugment's
    bins of 10, TrivialAugmentWide's random bin of 31; translations whole pixels, as its
    int()). The DALI operations (nvidia.dali.auto_aug.augmentations) receive that argument
    directly. DALI's own policies are not used: they draw inside the graph (a resumed epoch
    could not repeat them); its rand_augment (n, m, num_magnitude_bins=31) has torchvision's
    14 operations, but translations up to 100 pixels or 100/224 of the side (torchvision:
    150/331 of the side, 101.5 pixels at 224), solarize thresholds from 256 (torchvision:
    255) down to 0 and a grey fill (128; torchvision: black); its auto_augment_image_net is
    the TensorFlow/EfficientNet policy timm calls "v0" (with SolarizeAdd and ShearY), not
    torchvision's "imagenet" (the AutoAugment paper's table, with Posterize, Rotate and
    signed Color).

    Differences to the libraries' PIL operations: bilinear warps (timm picks bilinear or
    bicubic at random; torchvision's script passes --interpolation, bilinear by default),
    equalize follows OpenCV's formula, colour is DALI's saturation and contrast blends with a
    float mean grey (PIL's is rounded), and timm's fill is one grey for all channels (the
    mean of `mean`, where timm fills with the per-channel mean); torchvision's is black, as
    its default fill=None.

    Args:
        config: The policy string.
        ra_magnitude: torchvision's --ra-magnitude, the magnitude bin of "ra" in [0, 30]
            (default: 9); checked always, used by "ra" only, as torchvision's presets.py.
    """
    check_ra_magnitude(ra_magnitude)
    if not isinstance(config, str) or not config:
        raise ValueError(f"auto_augment must be a policy string such as 'rand-m9-mstd0.5-inc1',"
                         f" got {config!r}")
    name, *sections = config.split("-")
    if name == "rand":
        return _parse_rand(config, sections)
    if name in _AA_POLICIES:
        return _parse_auto(config, name, sections)
    if not sections and (name == "ra" or name in _TRIVIAL_NAMES or name in _TV_AUTO_POLICIES):
        return _parse_torchvision(config, name, int(ra_magnitude))
    if name == "augmix":
        raise ValueError(f"auto_augment={config!r}: AugMix is not supported (it blends several "
                         f"augmented copies of each image); supported: {_SUPPORTED}")
    raise ValueError(f"auto_augment={config!r}: unknown policy; supported: {_SUPPORTED}")


def _auto_augment(images, ops, params, policy: AutoAugmentPolicy, image_size: int,
                  fill_value: int):
    """The planned policy on uint8 HWC images: layer by layer, each sample through its own
    operation (DALI's select: a conditional split of the batch by operation)."""
    graph_ops = _graph_ops(fill_value, image_size)
    branches = [graph_ops[kind] for kind in policy.kinds()]
    for layer in range(policy.layers):
        images = select(branches, ops[layer], images, params[layer])
    return images


# ---- all of it ------------------------------------------------------------------------------

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
            if any(r is not None for r in self.color_jitter[:_HUE]):
                inputs["jitter_blend"] = (types.FLOAT, 2)
            if self.color_jitter[_HUE] is not None:
                inputs["jitter_hue"] = (types.FLOAT, 1)
        if self.lighting > 0:
            inputs["lighting"] = (types.FLOAT, 1)
        if self.policy is not None:
            inputs.update(aug_ops=(types.INT32, 1), aug_params=(types.FLOAT, 1))
        return inputs

    def plan(self, n: int, image_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Every random draw of `n` samples: the graph's inputs and the erased rectangles."""
        plan: dict[str, np.ndarray] = {}
        if self.color_jitter is not None:
            plan.update(_plan_color_jitter(self.color_jitter, n, rng))
        if self.lighting > 0:
            alpha = rng.normal(0.0, self.lighting, size=(n, 3))
            offset = (np.asarray(LIGHTING_EIGVEC) @ (alpha * LIGHTING_EIGVAL).T).T
            plan["lighting"] = (255.0 * offset).astype(np.float32)  # 0-255 scale
        if self.policy is not None:
            plan.update(self.policy.plan(n, rng, image_size))
        if self.re_prob > 0:
            plan["erase_boxes"] = _plan_erasing(n, image_size, self.re_prob, self.re_count, rng)
            # The noise seed of a batch is its first sample's.
            plan["erase_seed"] = rng.integers(0, 2 ** 62, size=n)
        return plan

    def graph(self, images, params: dict[str, Any], *, image_size: int,
              mean: Sequence[float]):
        """The DALI part on resized uint8 HWC images (already mirrored when a policy runs,
        since its geometric operations come after the flip in timm): policy, then colour
        jitter. Returns the images and the mean to normalize with (lighting shifts it)."""
        if self.policy is not None:
            images = _auto_augment(images, params["aug_ops"], params["aug_params"], self.policy,
                                   image_size, self.policy.fill_value(mean))
        if self.color_jitter is not None:
            images = _color_jitter(images, params.get("jitter_blend"), params.get("jitter_hue"),
                                   self.color_jitter)
        mean_node = list(mean)
        if self.lighting > 0:
            # (x + offset - mean) / std: lighting is a per-sample shift of the mean.
            mean_node = types.Constant(np.asarray(mean, np.float32)) - params["lighting"]
        return images, mean_node


# ---- random erasing -------------------------------------------------------------------------

def _plan_erasing(n: int, size: int, prob: float, count: int,
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
    spans = to_device(boxes, device)
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
