"""LabelPooling: the per-crop soft target of ReLabel.

Implements LabelPooling from Yun et al., "Re-labeling ImageNet: from Single to Multi-Labels,
from Global to Localized Labels" (CVPR 2021): the target of a random crop is
``softmax(RoIAlign(L, crop_box, output_size))`` over the image's label map L. Label maps are
stored top-k ([K, H, W] values and class indices per image); the kernels pool them sparsely,
never building the dense [C, H, W] map.

``label_pooling`` is the fast op (compiled C++ on CPU, Triton on CUDA), registered as the torch
custom op ``dali_relabel::label_pooling`` so it traces under ``torch.compile``.
``reference_label_pooling`` densifies and calls torchvision's ``roi_align``: the ground truth
for tests and the baseline for benchmarks. Both follow one convention: maps are [K, H, W]
(rows along the picture's vertical axis), boxes normalized (x1, y1, x2, y2), and LabelPooling
with output size S is ``roi_align(D, [b, x1*W-0.5, y1*H-0.5, x2*W-0.5, y2*H-0.5], (S, S),
spatial_scale=1, sampling_ratio=-1, aligned=False)`` on the densified map D (a class listed
twice in a cell counts twice), then the mode's epilogue over all C classes.
"""
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["label_pooling", "reference_label_pooling", "MODES"]

MODES = ("softmax", "logits", "argmax")
# Boxes come from float arithmetic (e.g. in the DALI graph); allow this much outside [0, 1].
BOX_TOLERANCE = 1e-4
# Largest output_size S: token grids of vision transformers are 7-32 a side; the output
# grows as S*S*C per box (and the kernels index S*S bins in 32-bit arithmetic).
MAX_OUTPUT_SIZE = 64
# Largest num_classes: 16.8 M, far beyond any label set (ImageNet-21k has 21843); the kernels
# index classes in 32-bit arithmetic.
MAX_NUM_CLASSES = 1 << 24

ArrayLike = Union[Tensor, np.ndarray]


def _as_tensor(name: str, x: Optional[ArrayLike]) -> Optional[Tensor]:
    if x is None or isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _prepare(
    values: ArrayLike,
    indices: ArrayLike,
    boxes: ArrayLike,
    num_classes: int,
    output_size: int,
    flip: Optional[ArrayLike],
    sample_index: Optional[ArrayLike],
    mode: str,
    check_inputs: bool,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Check the arguments of label_pooling and bring them to the dtypes the kernels read."""
    values = _as_tensor("values", values)
    indices = _as_tensor("indices", indices)
    boxes = _as_tensor("boxes", boxes)
    flip = _as_tensor("flip", flip)
    sample_index = _as_tensor("sample_index", sample_index)

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not (
            1 <= num_classes <= MAX_NUM_CLASSES):
        raise ValueError(f"num_classes must be an int in [1, MAX_NUM_CLASSES={MAX_NUM_CLASSES}], "
                         f"got {num_classes!r}")
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f"output_size must be an int >= 1, got {output_size!r}")
    if output_size > MAX_OUTPUT_SIZE:
        raise ValueError(f"output_size must be at most MAX_OUTPUT_SIZE={MAX_OUTPUT_SIZE}, got "
                         f"{output_size}")
    if values.dim() != 4:
        raise ValueError(f"values must be [N, K, H, W], got shape {tuple(values.shape)}")
    if min(values.shape[1:]) < 1:
        raise ValueError(f"values must be [N, K, H, W] with K, H, W >= 1, got shape "
                         f"{tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be float16, bfloat16 or float32, got {values.dtype}")
    if indices.shape != values.shape:
        raise ValueError(
            f"indices must have the shape of values {tuple(values.shape)}, "
            f"got {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [B, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating tensor, got {boxes.dtype}")
    num_boxes = boxes.shape[0]
    if sample_index is None:
        if values.shape[0] != num_boxes:
            raise ValueError(
                f"values has {values.shape[0]} rows but boxes has {num_boxes}; pass "
                "sample_index to pool chosen rows of a whole store")
    elif sample_index.shape != (num_boxes,):
        raise ValueError(
            f"sample_index must be [B] = [{num_boxes}], got shape {tuple(sample_index.shape)}")
    elif sample_index.is_floating_point() or sample_index.dtype == torch.bool:
        raise ValueError(f"sample_index must be an integer tensor, got {sample_index.dtype}")
    elif num_boxes > 0 and values.shape[0] < 1:
        raise ValueError("values must hold at least one row (N >= 1) for sample_index to pick")
    if flip is not None and flip.shape != (num_boxes,):
        raise ValueError(f"flip must be [B] = [{num_boxes}], got shape {tuple(flip.shape)}")
    named = [("values", values), ("indices", indices), ("boxes", boxes),
             ("flip", flip), ("sample_index", sample_index)]
    devices = {name: t.device for name, t in named if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")

    if values.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        values = values.float()
    if indices.dtype not in (torch.int16, torch.int32, torch.int64):
        indices = indices.long()
    values = values.contiguous()
    indices = indices.contiguous()
    boxes = boxes.to(torch.float32).contiguous()
    if flip is not None:
        flip = flip.to(torch.bool).contiguous()
    if sample_index is not None:
        sample_index = sample_index.to(torch.int64).contiguous()

    if check_inputs and num_boxes > 0:
        _check_data(values, indices, boxes, sample_index, num_classes)
    return values, indices, boxes, flip, sample_index


def _check_data(values: Tensor, indices: Tensor, boxes: Tensor, sample_index: Optional[Tensor],
                num_classes: int) -> None:
    """The checks that read tensor data (one host sync each on CUDA; skip with check_inputs)."""
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError("boxes must be finite, got NaN or inf")
    low, high = torch.aminmax(boxes)
    if low < -BOX_TOLERANCE or high > 1 + BOX_TOLERANCE:
        raise ValueError(
            "boxes must be normalized (x1, y1, x2, y2) in [0, 1], got values in "
            f"[{low.item():.6g}, {high.item():.6g}]")
    if bool((boxes[:, 2] < boxes[:, 0]).any()) or bool((boxes[:, 3] < boxes[:, 1]).any()):
        raise ValueError("boxes must have x2 >= x1 and y2 >= y1 (order x1, y1, x2, y2)")
    if sample_index is not None:
        low, high = torch.aminmax(sample_index)
        if low < 0 or high >= values.shape[0]:
            raise ValueError(
                f"sample_index must lie in [0, {values.shape[0]}), got values in "
                f"[{low.item()}, {high.item()}]")
        used = indices.index_select(0, sample_index)
    else:
        used = indices
    if used.numel() > 0:
        low, high = torch.aminmax(used)
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"indices must be class ids in [0, num_classes={num_classes}), got values in "
                f"[{low.item()}, {high.item()}]")


def _finish_shape(pooled: Tensor, output_size: int) -> Tensor:
    return pooled.squeeze(1) if output_size == 1 else pooled


def label_pooling(
    values: ArrayLike,
    indices: ArrayLike,
    boxes: ArrayLike,
    *,
    num_classes: int,
    output_size: int = 1,
    flip: Optional[ArrayLike] = None,
    sample_index: Optional[ArrayLike] = None,
    mode: str = "softmax",
    check_inputs: bool = True,
) -> Tensor:
    """Pool top-k label maps over crop boxes: ReLabel's LabelPooling.

    Equal (float32, up to rounding) to densifying each map to [C, H, W] and calling
    ``torchvision.ops.roi_align(D, [b, x1*W-0.5, y1*H-0.5, x2*W-0.5, y2*H-0.5],
    output_size=(S, S), spatial_scale=1, sampling_ratio=-1, aligned=False)``, followed by the
    mode's epilogue over all C classes (classes outside the top-k count as 0). Runs on the
    device of its inputs: Triton on CUDA, a compiled kernel on CPU (where that kernel was not
    built, the dense reference, with a one-time warning).

    Args:
        values (Tensor[N, K, H, W]): top-k label-map values (annotator logits), float16,
            bfloat16 or float32. N == B unless ``sample_index`` is given.
        indices (Tensor[N, K, H, W]): class of each value, integer, in [0, num_classes).
        boxes (Tensor[B, 4]): crop boxes (x1, y1, x2, y2), normalized to [0, 1].
        num_classes (int): C, the number of classes of the output.
        output_size (int): S in [1, MAX_OUTPUT_SIZE = 64]; S > 1 gives S*S bins per box
            (token-level targets).
        flip (Tensor[B], optional): bool; mirrors the output bins along x (only S > 1 changes).
        sample_index (Tensor[B], optional): rows of ``values``/``indices`` (a whole store
            [N, K, H, W]) to pool for each box; the gather is fused into the kernel.
        mode (str): "softmax" (ReLabel targets), "logits" (pooled values) or "argmax"
            (one-hot of the top class).
        check_inputs (bool): check box ranges, sample_index and class ranges, which reads the
            data (a host sync on CUDA). The kernels never access memory out of bounds either
            way; a caller that validated its store and made its boxes can turn this off.

    Returns:
        Tensor[B, C] float32 for output_size 1, else Tensor[B, S*S, C].
    """
    values, indices, boxes, flip, sample_index = _prepare(
        values, indices, boxes, num_classes, output_size, flip, sample_index, mode, check_inputs)
    pooled = torch.ops.dali_relabel.label_pooling(
        values, indices, boxes, sample_index, flip, num_classes, output_size, mode)
    return _finish_shape(pooled, output_size)


def _reference_pool(values: Tensor, indices: Tensor, boxes: Tensor,
                    sample_index: Optional[Tensor], flip: Optional[Tensor], num_classes: int,
                    output_size: int, mode: str) -> Tensor:
    """Densify + torchvision roi_align + epilogue; returns float32 [B, S*S, C]."""
    if sample_index is not None:
        values = values.index_select(0, sample_index)
        indices = indices.index_select(0, sample_index)
    num_boxes, _, height, width = values.shape
    dense = torch.zeros(num_boxes, num_classes, height, width, device=values.device)
    # scatter_add: a class listed twice in a cell counts twice, as the sparse sum does.
    dense.scatter_add_(1, indices.long(), values.float())
    scale = boxes.new_tensor([width, height, width, height])
    rois = torch.cat([torch.arange(num_boxes, device=boxes.device, dtype=boxes.dtype)[:, None],
                      boxes * scale - 0.5], dim=1)
    pooled = roi_align(dense, rois, output_size=(output_size, output_size), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=False)
    if flip is not None and output_size > 1:
        pooled = torch.where(flip[:, None, None, None], pooled.flip(-1), pooled)
    pooled = pooled.flatten(2).transpose(1, 2).contiguous()
    if mode == "softmax":
        return pooled.softmax(dim=-1)
    if mode == "argmax":
        one_hot = torch.zeros_like(pooled)
        return one_hot.scatter_(-1, pooled.argmax(dim=-1, keepdim=True), 1.0)
    return pooled


def reference_label_pooling(
    values: ArrayLike,
    indices: ArrayLike,
    boxes: ArrayLike,
    *,
    num_classes: int,
    output_size: int = 1,
    flip: Optional[ArrayLike] = None,
    sample_index: Optional[ArrayLike] = None,
    mode: str = "softmax",
    check_inputs: bool = True,
) -> Tensor:
    """LabelPooling by densifying to [B, C, H, W] and calling torchvision's roi_align.

    The definition of ``label_pooling`` written out plainly (the official ReLabel code path,
    with the box convention above): the ground truth for tests and the benchmark baseline.
    Same arguments and result as :func:`label_pooling`; memory grows as B * C * H * W.
    """
    values, indices, boxes, flip, sample_index = _prepare(
        values, indices, boxes, num_classes, output_size, flip, sample_index, mode, check_inputs)
    pooled = _reference_pool(values, indices, boxes, sample_index, flip, num_classes,
                             output_size, mode)
    return _finish_shape(pooled, output_size)


@torch.library.custom_op("dali_relabel::label_pooling", mutates_args=())
def _label_pooling_op(values: Tensor, indices: Tensor, boxes: Tensor,
                      sample_index: Optional[Tensor], flip: Optional[Tensor], num_classes: int,
                      output_size: int, mode: str) -> Tensor:
    """LabelPooling as a torch op; returns float32 [B, S*S, C].

    Devices without a dedicated kernel (neither CPU nor CUDA) use the dense reference.
    """
    return _reference_pool(values, indices, boxes, sample_index, flip, num_classes,
                           output_size, mode)


# The compiled CPU kernel, once imported; False when it is missing (a source tree without a
# build step), in which case the CPU path falls back to the dense reference.
_CPU_EXTENSION = None
CPU_KERNEL_MISSING = (
    "the compiled LabelPooling CPU kernel (dali_relabel.ops.kernels._label_pooling_cpu) is "
    "missing: label_pooling on CPU tensors falls back to the dense reference (densify + "
    "torchvision roi_align), which gives the same targets but is slower and needs "
    "B*C*H*W floats of memory; build the kernel with `pip install --no-build-isolation -e .` "
    "in the source tree (or `make venv`)")


def _cpu_extension():
    """The compiled CPU kernel's module, or None (with a one-time warning) when missing."""
    global _CPU_EXTENSION
    if _CPU_EXTENSION is None:
        try:
            from dali_relabel.ops.kernels import _label_pooling_cpu as extension
        except ImportError:
            warnings.warn(CPU_KERNEL_MISSING, RuntimeWarning, stacklevel=3)
            extension = False
        _CPU_EXTENSION = extension
    return _CPU_EXTENSION or None


@_label_pooling_op.register_kernel("cpu")
def _label_pooling_cpu(values: Tensor, indices: Tensor, boxes: Tensor,
                       sample_index: Optional[Tensor], flip: Optional[Tensor], num_classes: int,
                       output_size: int, mode: str) -> Tensor:
    extension = _cpu_extension()
    if extension is None:
        return _reference_pool(values, indices, boxes, sample_index, flip, num_classes,
                               output_size, mode)
    return extension.label_pooling_forward(values, indices, boxes, sample_index, flip,
                                           num_classes, output_size, MODES.index(mode))


@_label_pooling_op.register_kernel("cuda")
def _label_pooling_cuda(values: Tensor, indices: Tensor, boxes: Tensor,
                        sample_index: Optional[Tensor], flip: Optional[Tensor], num_classes: int,
                        output_size: int, mode: str) -> Tensor:
    from dali_relabel.ops.kernels.label_pooling_triton import label_pooling_triton
    with torch.cuda.device(values.device):
        return label_pooling_triton(values, indices, boxes, sample_index, flip, num_classes,
                                    output_size, mode)


@_label_pooling_op.register_fake
def _label_pooling_fake(values: Tensor, indices: Tensor, boxes: Tensor,
                        sample_index: Optional[Tensor], flip: Optional[Tensor],
                        num_classes: int, output_size: int, mode: str) -> Tensor:
    return values.new_empty((boxes.shape[0], output_size * output_size, num_classes),
                            dtype=torch.float32)
