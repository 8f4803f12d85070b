"""DALI pipelines for ReLabel training and validation.

The training graph does no random work of its own: the loader's epoch plan fixes the order
of the files, every crop window and every flip before DALI runs. A file reader reads the
epoch's files in plan order, ahead, in its own thread; the decoder ("mixed" on a GPU, "cpu"
otherwise) either decodes exactly the planned window (ROI decoding) or decodes the whole
image, from which the window, or several windows, are cut; then the graph resizes, flips as
planned and normalizes, so the ReLabel targets pooled from the planned boxes describe exactly
the decoded pixels. Optional augmentations (``dali_relabel.augment``) run between the resize
and the normalization, with parameters planned on the host as well.
"""
from typing import Callable, Optional, Sequence, Tuple

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from dali_relabel.augment.augmentations import Augmentations

__all__ = ["DECODES", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "READER_NAME",
           "train_pipeline", "val_pipeline"]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
READER_NAME = "Reader"
INTERPOLATIONS = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
DECODES = ("roi", "full")


def _normalize(images, *, flip, mean, std: Sequence[float], dtype, channels_last: bool,
               crop: Tuple[int, int] = None):
    kwargs = dict(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5) if crop is not None else {}
    return fn.crop_mirror_normalize(images, mirror=flip, mean=mean, std=list(std),
                                    dtype=dtype, output_layout="HWC" if channels_last else "CHW",
                                    **kwargs)


@pipeline_def
def train_pipeline(files: Sequence[str], plan_source: Callable, *, decoder_device: str,
                   decode: str, num_crops: int, vflip: bool, image_size: int, interpolation: str,
                   mean: Sequence[float], std: Sequence[float], dtype, channels_last: bool,
                   adjust_orientation: bool, jpeg_fancy_upsampling: bool, check_sizes: bool,
                   augment: Optional[Augmentations] = None,
                   augment_source: Optional[Callable] = None,
                   decoder_options: Optional[dict] = None):
    """Training graph of one epoch: its files and planned windows in; images, rows (and
    sizes) out. With augmentations in the graph, build it with ``enable_conditionals=True``.

    Args:
        files: The epoch's image files, in plan order, one per decoded image. A last batch
            short of `batch_size` is padded with its last file.
        plan_source: ``plan_source(iteration)`` returns batch `iteration` of the plan, padded
            as `files` is, as four arrays: anchors (y, x) int32 [n, 2], shapes (h, w) int32
            [n, 2], flips int32 [n] and label-map rows int64 [n] (then, with `vflip`, vertical
            flips int32 [n]); with num_crops N > 1 the per-crop arrays hold N crops per image
            ([n, N, 2], [n, N, 2], [n, N]). StopIteration at its end.
        decoder_device: "mixed" (GPU decoding) or "cpu".
        decode: "roi" decodes each planned window only; "full" decodes the whole image and
            crops the windows from it (on the GPU with "mixed"). Both give the same window.
        num_crops: Crops per decoded image ("full" only when > 1); the images output holds
            them as [N, ...] per image.
        vflip: The plan has vertical flips.
        image_size: Side of the square output images.
        interpolation: Resize filter: "bilinear" or "bicubic" (antialiased); per image when
            the augmentation parameters carry a resize filter.
        mean: Per-channel mean to subtract, 0-255 scale.
        std: Per-channel std to divide by, 0-255 scale.
        dtype: DALI output type of the images (types.FLOAT or types.FLOAT16).
        channels_last: Emit HWC (channels-last) instead of CHW.
        adjust_orientation: Apply EXIF orientation. Off by default in the loader, because
            PIL/torchvision pipelines, and so the official label maps, ignore it.
        jpeg_fancy_upsampling: Upsample JPEG chroma by interpolation, as libjpeg and PIL do;
            it matters for the GPU decoder only (DALI's CPU decoder always does).
        check_sizes: Also output each image's (height, width) as the decoder sees it, so
            that the loader can check them against the sizes it planned with.
        augment: Augmentations whose DALI part (``augment.in_graph``) runs here.
        augment_source: ``augment_source(iteration)`` returns batch `iteration` of the
            planned augmentation parameters, ``augment.graph_inputs`` in order (with N > 1,
            N per image along a leading axis).
        decoder_options: Further arguments of the decoder (memory padding, hardware decoder
            load), "mixed" only.
    """
    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=False, pad_last_batch=True,
                               dont_use_mmap=True, name=READER_NAME)
    crops = num_crops > 1
    planned = fn.external_source(
        source=plan_source, num_outputs=4 + vflip, batch=True,
        dtype=[types.INT32, types.INT32, types.INT32, types.INT64] + [types.INT32] * vflip,
        ndim=([2, 2, 1, 0] if crops else [1, 1, 0, 0]) + [int(crops)] * vflip)
    anchor, shape, flip, row = planned[:4]
    vflips = planned[4] if vflip else None
    decoding = dict(device=decoder_device, output_type=types.RGB,
                    adjust_orientation=adjust_orientation,
                    jpeg_fancy_upsampling=jpeg_fancy_upsampling,
                    **(decoder_options or {}) if decoder_device == "mixed" else {})
    params = None
    if augment is not None and augment.in_graph:
        inputs = augment.graph_inputs
        params = fn.external_source(source=augment_source, num_outputs=len(inputs), batch=True,
                                    dtype=[dali_type for dali_type, _ in inputs.values()],
                                    ndim=[ndim + crops for _, ndim in inputs.values()])
        params = dict(zip(inputs, params))
    if decode == "roi":
        decoded = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW",
                                          normalized_anchor=False, normalized_shape=False,
                                          **decoding)
        windows = [decoded]
    else:
        decoded = fn.decoders.image(jpegs, **decoding)
        windows = [fn.slice(decoded, anchor[j] if crops else anchor,
                            shape[j] if crops else shape, axis_names="HW",
                            normalized_anchor=False, normalized_shape=False)
                   for j in range(num_crops)]
    outputs = []
    for j, window in enumerate(windows):
        outputs.append(_finish_crop(
            window, flip[j] if crops else flip,
            None if vflips is None else vflips[j] if crops else vflips,
            None if params is None else {k: v[j] if crops else v for k, v in params.items()},
            augment=augment, image_size=image_size, interpolation=interpolation, mean=mean,
            std=std, dtype=dtype, channels_last=channels_last))
    images = fn.stack(*outputs) if crops else outputs[0]
    if not check_sizes:
        return images, row
    return images, row, fn.peek_image_shape(jpegs, adjust_orientation=adjust_orientation,
                                            dtype=types.INT32)


def _finish_crop(images, flip, vflip, params, *, augment, image_size: int, interpolation: str,
                 mean: Sequence[float], std: Sequence[float], dtype, channels_last: bool):
    """One planned window to a training image: resize, flip, augment, normalize."""
    interp_type = INTERPOLATIONS.get(interpolation, types.INTERP_LINEAR)
    if params is not None and "resize_filter" in params:
        interp_type = fn.cast(params["resize_filter"], dtype=types.INTERP_TYPE)
    images = fn.resize(images, size=[image_size, image_size], interp_type=interp_type,
                       antialias=True)
    if vflip is not None:  # before a policy's warps and the colour operations, as timm
        images = fn.flip(images, vertical=vflip, horizontal=0)
    mean = list(mean)
    if params is not None:
        if augment.policy is not None:  # its shears and rotations act on the mirrored crop
            images, flip = fn.flip(images, horizontal=flip), 0
        images, mean = augment.graph(images, params, image_size=image_size, mean=mean)
    return _normalize(images, flip=flip, mean=mean, std=std, dtype=dtype,
                      channels_last=channels_last)


@pipeline_def
def val_pipeline(files: Sequence[str], labels: Sequence[int], *, decoder_device: str,
                 image_size: int, resize_size: int, interpolation: str, mean: Sequence[float],
                 std: Sequence[float], dtype, channels_last: bool, adjust_orientation: bool,
                 jpeg_fancy_upsampling: bool):
    """Validation graph: resize the shorter side to `resize_size`, centre crop `image_size`.

    Outputs images and labels (int32 [1]); `interpolation` is "bilinear" or "bicubic"
    (antialiased, as PIL resizes), the other arguments are as for `train_pipeline`.
    """
    jpegs, label = fn.readers.file(files=list(files), labels=list(labels), name=READER_NAME,
                                   random_shuffle=False, pad_last_batch=True,
                                   dont_use_mmap=True)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                               adjust_orientation=adjust_orientation,
                               jpeg_fancy_upsampling=jpeg_fancy_upsampling)
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
                       interp_type=INTERPOLATIONS[interpolation], antialias=True)
    images = _normalize(images, flip=0, mean=list(mean), std=std, dtype=dtype,
                        channels_last=channels_last, crop=(image_size, image_size))
    return images, label
