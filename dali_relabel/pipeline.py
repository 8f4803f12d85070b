"""DALI pipelines for ReLabel training and validation.

The training graph reads JPEGs from an explicit file list (one list per epoch and shard, made
by the loader), draws a RandomResizedCrop window exactly as torchvision does (same scale/ratio
distributions, ten attempts, fallback to a centre crop), ROI-decodes only that window
("mixed" on a GPU, "cpu" otherwise), resizes it and flips/normalizes it. The crop box leaves
the graph as normalized (x1, y1, x2, y2) computed from the very same window, and each sample
carries its label-map row index as the reader's label, so images and ReLabel targets
(Yun et al., CVPR 2021) can never drift apart.
"""
import math
from typing import Sequence, Tuple

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "READER_NAME", "train_pipeline", "val_pipeline"]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
READER_NAME = "Reader"
# torchvision's RandomResizedCrop tries this many windows before falling back to a centre crop.
CROP_ATTEMPTS = 10


def _random_resized_crop_window(shape, scale: Tuple[float, float], ratio: Tuple[float, float]):
    """torchvision's RandomResizedCrop.get_params as DALI arithmetic, for every sample at once.

    All CROP_ATTEMPTS candidate windows are drawn as vectors; the first that fits is taken
    (min over the attempt indices that fit), else the centre crop with the aspect ratio
    clamped to `ratio`. Returns float (y, x, h, w) in pixels; the values are integral.
    """
    height = fn.cast(shape[0], dtype=types.FLOAT)
    width = fn.cast(shape[1], dtype=types.FLOAT)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # lo + (hi - lo) * U(0, 1): fn.random.uniform refuses an empty range such as scale=(1, 1).
    target_area = area * (scale[0] + (scale[1] - scale[0]) * fn.random.uniform(
        range=[0.0, 1.0], shape=[CROP_ATTEMPTS]))
    aspect = dmath.exp(log_lo + (log_hi - log_lo) * fn.random.uniform(
        range=[0.0, 1.0], shape=[CROP_ATTEMPTS]))
    # round() as floor(x + 0.5): differs from Python's banker's rounding only on exact ties.
    w = dmath.floor(dmath.sqrt(target_area * aspect) + 0.5)
    h = dmath.floor(dmath.sqrt(target_area / aspect) + 0.5)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    attempt = fn.constant(fdata=[float(i) for i in range(CROP_ATTEMPTS)], shape=[CROP_ATTEMPTS])
    no_fit = float(CROP_ATTEMPTS)
    first = fn.reductions.min(dmath.min(attempt + no_fit * (1.0 - fn.cast(fits, dtype=types.FLOAT)),
                                        no_fit), axes=[0])
    chosen = fn.cast(attempt == first, dtype=types.FLOAT)
    found = fn.cast(first < no_fit, dtype=types.FLOAT)
    w_found = fn.reductions.sum(w * chosen, axes=[0])
    h_found = fn.reductions.sum(h * chosen, axes=[0])
    # torchvision: i = randint(0, H - h + 1), j = randint(0, W - w + 1).
    y_found = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (height - h_found + 1.0))
    x_found = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (width - w_found + 1.0))
    y_found = dmath.min(y_found, height - h_found)
    x_found = dmath.min(x_found, width - w_found)

    # Fallback: centre crop, aspect ratio clamped to [ratio[0], ratio[1]].
    in_ratio = width / height
    too_tall = fn.cast(in_ratio < ratio[0], dtype=types.FLOAT)
    too_wide = fn.cast(in_ratio > ratio[1], dtype=types.FLOAT)
    w_center = (too_tall * width + too_wide * dmath.floor(height * ratio[1] + 0.5)
                + (1.0 - too_tall - too_wide) * width)
    h_center = (too_tall * dmath.floor(width / ratio[0] + 0.5) + too_wide * height
                + (1.0 - too_tall - too_wide) * height)
    y_center = dmath.floor((height - h_center) / 2.0)
    x_center = dmath.floor((width - w_center) / 2.0)

    def pick(a, b):
        return found * a + (1.0 - found) * b

    return (pick(y_found, y_center), pick(x_found, x_center), pick(h_found, h_center),
            pick(w_found, w_center))


def _normalize(images, *, flip, mean: Sequence[float], std: Sequence[float], dtype,
               channels_last: bool, crop: Tuple[int, int] = None):
    kwargs = dict(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5) if crop is not None else {}
    return fn.crop_mirror_normalize(images, mirror=flip, mean=list(mean), std=list(std),
                                    dtype=dtype, output_layout="HWC" if channels_last else "CHW",
                                    **kwargs)


@pipeline_def(enable_checkpointing=True)
def train_pipeline(files: Sequence[str], rows: Sequence[int], *, decoder_device: str,
                   image_size: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                   hflip: float, mean: Sequence[float], std: Sequence[float], dtype,
                   channels_last: bool, adjust_orientation: bool):
    """Training graph; outputs images, boxes [4] (x1, y1, x2, y2), flip, row index.

    Args:
        files: Absolute image paths in the order to read them (one epoch of one shard).
        rows: Label-map row of each file; it travels through the reader as its label.
        decoder_device: "mixed" (GPU decoding) or "cpu".
        image_size: Side of the square output images.
        scale: Range of the crop's area relative to the image (torchvision's `scale`).
        ratio: Range of the crop's aspect ratio w/h (torchvision's `ratio`), log-uniform.
        hflip: Probability of a horizontal flip.
        mean: Per-channel mean to subtract, 0-255 scale.
        std: Per-channel std to divide by, 0-255 scale.
        dtype: DALI output type of the images (types.FLOAT or types.FLOAT16).
        channels_last: Emit HWC (channels-last) instead of CHW.
        adjust_orientation: Apply EXIF orientation. Off by default in the loader, because
            PIL/torchvision pipelines, and so the official label maps, ignore it.
    """
    jpegs, row = fn.readers.file(files=list(files), labels=list(rows), name=READER_NAME,
                                 random_shuffle=False, pad_last_batch=True,
                                 dont_use_mmap=True)
    shape = fn.peek_image_shape(jpegs, adjust_orientation=adjust_orientation)
    y, x, h, w = _random_resized_crop_window(shape, scale, ratio)
    images = fn.decoders.image_slice(
        jpegs, fn.cast(fn.stack(y, x), dtype=types.INT32),
        fn.cast(fn.stack(h, w), dtype=types.INT32), axis_names="HW",
        normalized_anchor=False, normalized_shape=False, device=decoder_device,
        output_type=types.RGB, adjust_orientation=adjust_orientation,
        jpeg_fancy_upsampling=True)
    images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_LINEAR,
                       antialias=True)
    flip = fn.random.coin_flip(probability=hflip)
    images = _normalize(images, flip=flip, mean=mean, std=std, dtype=dtype,
                        channels_last=channels_last)
    height = fn.cast(shape[0], dtype=types.FLOAT)
    width = fn.cast(shape[1], dtype=types.FLOAT)
    boxes = fn.stack(x / width, y / height, (x + w) / width, (y + h) / height)
    return images, boxes, flip, row


@pipeline_def
def val_pipeline(files: Sequence[str], labels: Sequence[int], *, decoder_device: str,
                 image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                 dtype, channels_last: bool, adjust_orientation: bool):
    """Validation graph: resize the shorter side to `resize_size`, centre crop `image_size`.

    Outputs images and labels (int32 [1]); the arguments are as for `train_pipeline`.
    """
    jpegs, label = fn.readers.file(files=list(files), labels=list(labels), name=READER_NAME,
                                   random_shuffle=False, pad_last_batch=True,
                                   dont_use_mmap=True)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                               adjust_orientation=adjust_orientation,
                               jpeg_fancy_upsampling=True)
    # torchvision's Resize(resize_size): the shorter side becomes resize_size, the longer
    # int(resize_size * long / short), truncated.
    shape = fn.peek_image_shape(jpegs, adjust_orientation=adjust_orientation)
    height = fn.cast(shape[0], dtype=types.FLOAT)
    width = fn.cast(shape[1], dtype=types.FLOAT)
    portrait = fn.cast(width <= height, dtype=types.FLOAT)
    new_width = portrait * resize_size + (1.0 - portrait) * dmath.floor(
        resize_size * width / height)
    new_height = portrait * dmath.floor(resize_size * height / width) + (
        1.0 - portrait) * resize_size
    images = fn.resize(images, resize_x=new_width, resize_y=new_height,
                       interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalize(images, flip=0, mean=mean, std=std, dtype=dtype,
                        channels_last=channels_last, crop=(image_size, image_size))
    return images, label
