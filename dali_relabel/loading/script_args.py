"""The loaders' arguments from the reference training scripts' own parsed flags.

``ReLabelLoader.from_torchvision_args`` / ``ValLoader.from_torchvision_args`` read the
namespace of torchvision's ``references/classification/train.py``; ``from_timm_args`` that of
timm's ``train.py`` with its ``data_config``. Every flag that changes the data is mapped onto
the loader; a flag set to a value the loader cannot honour is refused, all of them in one
ValueError, instead of being silently dropped. Flags that only concern the replaced
``DataLoader`` (workers, pinning, caching) are ignored. docs/switching.md shows the switched
scripts and says which versions of them were checked.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["timm_train_kwargs", "timm_val_kwargs", "torchvision_train_kwargs",
           "torchvision_val_kwargs"]

_FILTERS = ("bilinear", "bicubic")
# torchvision's auto-augment names the loader runs (AugMix is not one).
_TV_POLICIES = ("ra", "ta_wide", "imagenet", "cifar10", "svhn")
# timm's folder splits: _search_split tries the split, then its synonyms.
_TRAIN_SPLITS = ("train", "training")
_VAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Flags:
    """Reads a script's namespace and collects the flags the loader cannot honour."""

    def __init__(self, args: argparse.Namespace, script: str) -> None:
        if not isinstance(args, argparse.Namespace):
            raise ValueError(f"args must be the argparse.Namespace of {script}, got "
                             f"{type(args).__name__}")
        self.args, self.script = args, script
        self.refused: list[str] = []

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default)

    def refuse(self, flag: str, value: Any, why: str) -> None:
        self.refused.append(f"{flag} {value!r} ({why})")

    def unless(self, name: str, flag: str, allowed: Any, why: str, default: Any = None) -> None:
        """Refuses `flag` unless its value (`default` when the script has no such flag) is
        one the loader honours (`allowed`: the values, or a predicate)."""
        value = self.get(name, default)
        ok = allowed(value) if callable(allowed) else value in allowed
        if not ok:
            self.refuse(flag, value, why)

    def labelmaps(self) -> str:
        value = self.get("labelmaps")
        if not value:
            raise ValueError(f"labelmaps: {self.script} was given no --labelmaps (add "
                             "parser.add_argument('--labelmaps') as docs/switching.md shows, "
                             "and pass the label-map file of the training images)")
        return value

    def done(self, what: str) -> None:
        if self.refused:
            raise ValueError(f"{what}: {len(self.refused)} flag(s) of {self.script} set to "
                             f"values the loader cannot honour: {'; '.join(self.refused)}")


def _merge(kwargs: dict, overrides: Mapping[str, Any]) -> dict:
    kwargs.update(overrides)
    return kwargs


# ---- torchvision's references/classification/train.py -----------------------------------

_TV_SCRIPT = "torchvision's references/classification/train.py"


def torchvision_train_kwargs(args: argparse.Namespace, **overrides: Any) -> dict:
    """ReLabelLoader's arguments from torchvision's flags (`overrides` win).

    Mapped: --data-path (its train/ folder), --labelmaps, --batch-size, --device,
    --train-crop-size, --interpolation (bilinear or bicubic), --auto-augment (ra, ta_wide,
    imagenet, cifar10, svhn) with --ra-magnitude, --random-erase (zeros, as torchvision's
    RandomErasing), --mixup-alpha / --cutmix-alpha (one of them per batch when both are on,
    as the script's RandomChoice), --ra-sampler with --ra-reps (num_crops), and a --seed if
    the script has one (else 0, DistributedSampler's). --label-smoothing stays with the
    script's loss (nn.CrossEntropyLoss smooths soft targets itself).
    """
    flags = _Flags(args, _TV_SCRIPT)
    labelmaps = flags.labelmaps()
    flags.unless("interpolation", "--interpolation", _FILTERS,
                 "the loader resizes bilinear or bicubic", default="bilinear")
    flags.unless("auto_augment", "--auto-augment", (None, *_TV_POLICIES),
                 "AugMix blends several augmented copies of each image; the loader runs "
                 f"{', '.join(_TV_POLICIES)}")
    crops = 1
    if flags.get("ra_sampler", False):
        crops = flags.get("ra_reps", 3)
        if not isinstance(crops, int) or crops < 1:
            flags.refuse("--ra-reps", crops, "repetitions must be an int >= 1")
            crops = 1
        elif flags.get("batch_size", 1) % crops:
            flags.refuse("--ra-reps", crops, f"the repeated crops of an image share a batch: "
                                             f"--batch-size {flags.get('batch_size')} must "
                                             "be a multiple of it")
            crops = 1
    flags.done("ReLabelLoader.from_torchvision_args")
    mixup, cutmix = flags.get("mixup_alpha", 0.0), flags.get("cutmix_alpha", 0.0)
    return _merge(dict(
        image_root=os.path.join(flags.get("data_path"), "train"),
        labelmaps=labelmaps, batch_size=flags.get("batch_size"),
        device=flags.get("device", "cuda"), image_size=flags.get("train_crop_size", 224),
        interpolation=flags.get("interpolation", "bilinear"),
        auto_augment=flags.get("auto_augment"), ra_magnitude=flags.get("ra_magnitude", 9),
        re_prob=flags.get("random_erase", 0.0), re_mode="const", re_count=1,
        mixup_alpha=mixup, cutmix_alpha=cutmix, mixup_prob=1.0, mixup_switch_prob=0.5,
        num_crops=crops, seed=flags.get("seed", 0)), overrides)


def torchvision_val_kwargs(args: argparse.Namespace, **overrides: Any) -> dict:
    """ValLoader's arguments from torchvision's flags: --data-path (its val/ folder),
    --batch-size, --device, --val-resize-size, --val-crop-size, --interpolation; with
    --weights and --test-only, the weights' own preprocessing (sizes, filter, mean, std), as
    the script does."""
    flags = _Flags(args, _TV_SCRIPT)
    kwargs = dict(image_root=os.path.join(flags.get("data_path"), "val"),
                  batch_size=flags.get("batch_size"), device=flags.get("device", "cuda"),
                  image_size=flags.get("val_crop_size", 224),
                  resize_size=flags.get("val_resize_size", 256),
                  interpolation=flags.get("interpolation", "bilinear"))
    if flags.get("weights") and flags.get("test_only"):
        import torchvision

        preset = torchvision.models.get_weight(flags.get("weights")).transforms()
        kwargs.update(image_size=preset.crop_size[0], resize_size=preset.resize_size[0],
                      interpolation=preset.interpolation.value,
                      mean=[255 * m for m in preset.mean], std=[255 * s for s in preset.std])
    if kwargs["interpolation"] not in _FILTERS:
        flags.refuse("--interpolation", kwargs["interpolation"],
                     "the loader resizes bilinear or bicubic")
    flags.done("ValLoader.from_torchvision_args")
    return _merge(kwargs, overrides)


# ---- timm's train.py ----------------------------------------------------------------------

_TIMM_SCRIPT = "timm's train.py"


def _timm_root(flags: _Flags, split: str, synonyms: Sequence[str]) -> str:
    """timm's folder reader: root/split if it exists, else root/<a synonym of split>."""
    root = flags.get("data_dir") or flags.get("data")
    if not root:
        raise ValueError(f"image_root: {_TIMM_SCRIPT} was given no --data-dir")
    candidates = [split] + (list(synonyms) if split in synonyms else [])
    for name in candidates:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return os.path.join(root, split)  # the loader names it when it is not a folder


def _timm_common(flags: _Flags, data_config: Mapping[str, Any], device: Any) -> dict:
    if not isinstance(data_config, Mapping) or not {"input_size", "mean", "std"} <= set(
            data_config):
        raise ValueError("data_config must be the mapping train.py resolves with "
                         "timm.data.resolve_data_config (input_size, mean, std, ...), got "
                         f"{data_config!r}")
    channels, height, width = data_config["input_size"]
    if channels != 3:
        flags.refuse("--in-chans", channels, "the loader decodes RGB images")
    if height != width:
        flags.refuse("--input-size", tuple(data_config["input_size"]),
                     "the loader makes square images")
    flags.unless("dataset", "--dataset", ("", None), "the loader reads ImageFolder trees")
    flags.unless("input_img_mode", "--input-img-mode", (None, "RGB"),
                 "the loader decodes RGB images")
    flags.unless("class_map", "--class-map", ("", None),
                 "the label maps fix the class order")
    dtype_name = flags.get("model_dtype")
    dtype = torch.float32
    if dtype_name:
        if dtype_name in _DTYPES:
            dtype = _DTYPES[dtype_name]
        else:
            flags.refuse("--model-dtype", dtype_name, "the loader makes float32, float16 or "
                                                      "bfloat16 images")
    return dict(device=device, image_size=height, dtype=dtype,
                mean=[255 * m for m in data_config["mean"]],
                std=[255 * s for s in data_config["std"]],
                channels_last=bool(flags.get("channels_last", False)))


def timm_train_kwargs(args: argparse.Namespace, data_config: Mapping[str, Any], *,
                      device: Any, **overrides: Any) -> dict:
    """ReLabelLoader's arguments from timm's flags and data_config (`overrides` win).

    Mapped: --data-dir and --train-split (timm's split synonyms), --labelmaps, --batch-size,
    --seed, input size, mean, std and interpolation through data_config, --model-dtype,
    --channels-last, --no-aug, --scale, --ratio, --hflip, --vflip, --train-interpolation
    (bilinear, bicubic, random), --color-jitter (off under --aa, but for '3a', as timm),
    --color-jitter-prob, --grayscale-prob, --gaussian-blur-prob, --aa (rand-..., original,
    originalr, v0, v0r, 3a), --aug-repeats (num_crops), --reprob / --remode / --recount,
    --mixup, --cutmix, --cutmix-minmax, --mixup-prob, --mixup-switch-prob, --mixup-mode,
    --smoothing (smoothed in the loader after mixing, as timm's Mixup; use a loss that takes
    soft targets), --num-classes (checked against the label maps).
    """
    flags = _Flags(args, _TIMM_SCRIPT)
    labelmaps = flags.labelmaps()
    kwargs = _timm_common(flags, data_config, device)
    no_aug = bool(flags.get("no_aug", False))
    flags.unless("aug_splits", "--aug-splits", (0, None),
                 "AugMix splits make several augmented copies of each image")
    flags.unless("jsd_loss", "--jsd-loss", (False, None), "it needs --aug-splits")
    flags.unless("resplit", "--resplit", (False, None), "it needs --aug-splits")
    flags.unless("train_crop_mode", "--train-crop-mode", (None, "rrc"),
                 "the loader plans RandomResizedCrop windows")
    flags.unless("train_img_sizes", "--train-img-sizes", (None, []),
                 "the loader makes one image size")
    flags.unless("train_batch_sizes", "--train-batch-sizes", (None, []),
                 "the loader makes one batch size")
    flags.unless("naflex_loader", "--naflex-loader", (False, None),
                 "NaFlex batches are sequences of patches")
    flags.unless("epoch_repeats", "--epoch-repeats", (0, 0.0, None),
                 "it repeats iterable datasets")
    aa = flags.get("aa")
    if aa and str(aa).startswith("augmix"):
        flags.refuse("--aa", aa, "AugMix blends several augmented copies of each image")
    mixing = (flags.get("mixup", 0.0) > 0 or flags.get("cutmix", 0.0) > 0
              or flags.get("cutmix_minmax") is not None)
    if mixing and flags.get("no_prefetcher", False):
        flags.refuse("--no-prefetcher", True, "train.py then mixes the batches again with its "
                                              "own Mixup; the loader mixes already")
    repeats = flags.get("aug_repeats", 0) or 0
    crops = 1
    if repeats:
        if repeats != int(repeats) or repeats < 1:
            flags.refuse("--aug-repeats", repeats, "repetitions must be a whole number >= 1")
        elif flags.get("batch_size", 1) % int(repeats):
            flags.refuse("--aug-repeats", repeats, f"the repeated crops of an image share a "
                                                   f"batch: --batch-size "
                                                   f"{flags.get('batch_size')} must be a "
                                                   "multiple of it")
        else:
            crops = int(repeats)
    interpolation = flags.get("train_interpolation", "random")
    if no_aug or not interpolation:
        interpolation = data_config.get("interpolation", "bicubic")
    if interpolation not in (*_FILTERS, "random"):
        flags.refuse("--train-interpolation" if not no_aug else "--interpolation",
                     interpolation, "the loader resizes bilinear, bicubic or, per crop, "
                                    "either (random)")
    cutmix_minmax = flags.get("cutmix_minmax")
    flags.done("ReLabelLoader.from_timm_args")
    kwargs.update(
        image_root=_timm_root(flags, flags.get("train_split", "train"), _TRAIN_SPLITS),
        labelmaps=labelmaps, batch_size=flags.get("batch_size"),
        num_classes=flags.get("num_classes"), seed=flags.get("seed", 42),
        interpolation=interpolation, num_crops=crops,
        mixup_alpha=flags.get("mixup", 0.0), cutmix_alpha=flags.get("cutmix", 0.0),
        cutmix_minmax=tuple(cutmix_minmax) if cutmix_minmax is not None else None,
        mixup_prob=flags.get("mixup_prob", 1.0),
        mixup_switch_prob=flags.get("mixup_switch_prob", 0.5),
        mixup_mode=flags.get("mixup_mode", "batch"),
        label_smoothing=flags.get("smoothing", 0.1) or 0.0)
    if no_aug:  # timm's transforms_noaug_train: resize the shorter side, centre crop
        kwargs.update(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0)
    else:
        color_jitter = flags.get("color_jitter", 0.4)
        kwargs.update(
            scale=tuple(flags.get("scale") or (0.08, 1.0)),
            ratio=tuple(flags.get("ratio") or (3 / 4, 4 / 3)),
            hflip=flags.get("hflip", 0.5), vflip=flags.get("vflip", 0.0) or 0.0,
            color_jitter=color_jitter if color_jitter else None,
            color_jitter_prob=flags.get("color_jitter_prob"),
            grayscale_prob=flags.get("grayscale_prob") or 0.0,
            gaussian_blur_prob=flags.get("gaussian_blur_prob") or 0.0,
            auto_augment=aa or None, re_prob=flags.get("reprob", 0.0) or 0.0,
            re_mode=flags.get("remode", "pixel"), re_count=flags.get("recount", 1))
    return _merge(kwargs, overrides)


def timm_val_kwargs(args: argparse.Namespace, data_config: Mapping[str, Any], *,
                    device: Any, **overrides: Any) -> dict:
    """ValLoader's arguments from timm's flags and data_config: --data-dir and --val-split
    (timm's synonyms), --validation-batch-size (else --batch-size), input size, mean, std,
    interpolation and crop_pct through data_config, --model-dtype, --channels-last."""
    flags = _Flags(args, _TIMM_SCRIPT)
    kwargs = _timm_common(flags, data_config, device)
    interpolation = data_config.get("interpolation", "bicubic")
    if interpolation not in _FILTERS:
        flags.refuse("--interpolation", interpolation, "the loader resizes bilinear or "
                                                       "bicubic")
    crop_pct = data_config.get("crop_pct")
    if crop_pct is not None and not (isinstance(crop_pct, (int, float))
                                     and math.isfinite(crop_pct)):
        flags.refuse("--crop-pct", crop_pct, "a fraction in (0, 1]")
        crop_pct = None
    flags.done("ValLoader.from_timm_args")
    kwargs.update(
        image_root=_timm_root(flags, flags.get("val_split", "validation"), _VAL_SPLITS),
        batch_size=flags.get("validation_batch_size") or flags.get("batch_size"),
        interpolation=interpolation, crop_pct=crop_pct or 0.875)
    return _merge(kwargs, overrides)

