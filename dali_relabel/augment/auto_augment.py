"""Auto-augment policies (timm's and torchvision's), planned on the host, run in the DALI
graph: ``parse_auto_augment`` turns a policy string into an ``AutoAugmentPolicy``."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.auto_aug import augmentations as dali_aug
from nvidia.dali.auto_aug.core import select

__all__ = ["AutoAugmentPolicy", "auto_augment_graph", "check_ra_magnitude", "parse_auto_augment"]

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
        # timm's desaturate(factor): Color.enhance(1 - factor); PIL's GaussianBlur(radius)
        # blurs with a Gaussian of standard deviation radius.
        "desaturate": lambda data, p: dali_aug.color.op(data, dmath.clamp(1.0 - p, 0.0, 1.0)),
        "gaussian_blur": lambda data, p: fn.gaussian_blur(data, sigma=p),
    }


def _level(scale: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda v: v / _LEVEL_DENOM * scale


def _enhance(v: np.ndarray) -> np.ndarray:
    return v / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(v: np.ndarray) -> np.ndarray:
    return np.maximum(0.1, 1.0 + v / _LEVEL_DENOM * 0.9)


def _minmax(v: np.ndarray, low: float, high: float) -> np.ndarray:
    """timm's _minmax_level_to_arg: the level's share of [low, high], clamped."""
    return np.clip(low + (high - low) * v / _LEVEL_DENOM, low, high)


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
    # DeiT III's three-augment ("3a"): timm's minmax levels; GaussianBlurRand's radius is
    # then drawn per image (see _RANDOM_PARAMS).
    "Desaturate": ("desaturate", False, lambda v: _minmax(v, 0.5, 1.0)),
    "GaussianBlurRand": ("gaussian_blur", False, lambda v: _minmax(v, 0.0, 1.0)),
}
# Operations whose argument is drawn per image from timm's level argument: GaussianBlurRand
# blurs with a radius uniform in [0.1, 2 * factor].
_RANDOM_PARAMS = {
    # Python's random.uniform(a, b), which timm calls: a + (b - a) * U, also for b < a.
    "GaussianBlurRand": lambda factor, rng: 0.1 + (2.0 * factor - 0.1) * rng.random(
        np.shape(factor)),
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
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")


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
                if name in _RANDOM_PARAMS:
                    params[mask] = _RANDOM_PARAMS[name](to_param(levels[mask]), rng)
                elif to_param is not None:
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
              "'originalr', 'v0', 'v0r' (AutoAugment, optionally '-mstd<float>'), '3a' (DeiT III's "
              "three-augment); "
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


def auto_augment_graph(images, ops, params, policy: AutoAugmentPolicy, image_size: int,
                  fill_value: int):
    """The planned policy on uint8 HWC images: layer by layer, each sample through its own
    operation (DALI's select: a conditional split of the batch by operation)."""
    graph_ops = _graph_ops(fill_value, image_size)
    branches = [graph_ops[kind] for kind in policy.kinds()]
    for layer in range(policy.layers):
        images = select(branches, ops[layer], images, params[layer])
    return images


