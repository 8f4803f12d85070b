"""The launches of the LabelPooling kernels that the project makes, for tests and checks.

As ``torch.testing`` serves torch's own tests, this module holds the grid of
``label_pooling_triton`` launches that the project's loaders, trainer, CutMix and token
labeling can make: every output size they use, each mode, class counts from 1 to
ImageNet-21k, map sides of 1, with and without the fused gather and the flip, batch sizes that
do and do not divide by 16, every dtype ``label_pooling`` accepts, and views that start off a
16-byte boundary. ``tests/triton_compile.py`` compiles each launch for GPU targets without a
GPU; ``benchmarks/gpu_check.py`` runs each on a GPU and compares it with
``reference_label_pooling``.

The inputs are real: random top-k maps whose classes lie in [0, num_classes), crop boxes of
whole pixels inside the image (where approximate division or fused multiply-adds would
change torchvision's sample counts), random flips and gather rows, created on the device
asked for. Example::

    from dali_relabel import label_pooling, reference_label_pooling
    from dali_relabel.ops import testing

    for name, kwargs in testing.launches("cuda", quick=True):
        got = label_pooling(**kwargs, check_inputs=False)
        want = reference_label_pooling(**kwargs, check_inputs=False)
        assert (got - want).abs().max() <= 1e-5, name

Only torch is imported here (no triton).
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from dali_relabel.ops.label_pooling import MODES

__all__ = ["BATCH_SIZES", "INDEX_DTYPES", "MAP_SHAPES", "NUM_CLASSES", "OUTPUT_SIZES",
           "VALUE_DTYPES", "launch_arguments", "launches"]

# Every output size the loader (1), the trainer, CutMix's tokens and token labeling (14 for a
# /16 ViT at 224) use.
OUTPUT_SIZES = (1, 2, 3, 5, 14)
# One class, ImageNet, ImageNet-21k (int16 classes up to 32767, int32 beyond).
NUM_CLASSES = (1, 1000, 21843)
# (K, H, W): the paper's top-5 15 x 15 maps, one class per cell, and each side at 1.
MAP_SHAPES = ((5, 15, 15), (1, 15, 15), (5, 1, 15), (5, 15, 1), (1, 1, 1))
# Batch sizes that do and do not divide by 16.
BATCH_SIZES = (16, 7)
# Every dtype label_pooling accepts, on the paper's map shape (int32 classes are what a
# store with more than 32767 classes holds).
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
# The boxes are whole pixels of an image of this size (width, height).
IMAGE_SIZE = (230, 173)

Launch = Tuple[str, Dict[str, object]]


def launch_arguments(batch: int, k: int, h: int, w: int, num_classes: int, output_size: int,
                     mode: str, gather: bool, flip: bool,
                     values_dtype: torch.dtype = torch.float16,
                     indices_dtype: torch.dtype = torch.int16, *,
                     device: Union[str, torch.device] = "cpu",
                     generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Keyword arguments of one launch (``label_pooling_triton``'s, which are also
    ``label_pooling``'s and ``reference_label_pooling``'s), on `device`.

    Args:
        batch: B, the boxes. k, h, w: the map shape (K, H, W).
        num_classes: C; the classes are drawn in [0, C) (repeats within a cell included).
        output_size: S. mode: one of MODES.
        gather: pool rows of a store of B + 2 rows by ``sample_index``; else one row per box.
        flip: pass a random ``flip``.
        values_dtype, indices_dtype: the map's dtypes.
        device: where the tensors are created.
        generator: the CPU generator the data is drawn from (default: seeded with 0).

    Returns:
        dict of values [N, K, H, W], indices [N, K, H, W], boxes [B, 4] (x1, y1, x2, y2),
        sample_index [B] or None, flip [B] or None, num_classes, output_size, mode.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    rows = batch + 2 if gather else batch
    values = (torch.randn(rows, k, h, w, generator=gen) * 4).to(values_dtype)
    indices = torch.randint(0, num_classes, (rows, k, h, w), generator=gen).to(indices_dtype)
    width, height = IMAGE_SIZE
    # Whole-pixel boxes: left/top and a width/height of at least one pixel inside the image.
    left = torch.randint(0, width - 1, (batch,), generator=gen)
    top = torch.randint(0, height - 1, (batch,), generator=gen)
    right = left + 1 + (torch.rand(batch, generator=gen) * (width - 1 - left)).long()
    bottom = top + 1 + (torch.rand(batch, generator=gen) * (height - 1 - top)).long()
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.stack([left, top, right, bottom], dim=1).float() / scale
    sample_index = torch.randint(0, rows, (batch,), generator=gen) if gather else None
    flips = torch.rand(batch, generator=gen) < 0.5 if flip else None
    on = torch.device(device)

    def move(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.to(on)

    return dict(values=move(values), indices=move(indices), boxes=move(boxes),
                sample_index=move(sample_index), flip=move(flips), num_classes=num_classes,
                output_size=output_size, mode=mode)


def launches(device: Union[str, torch.device] = "cpu", *, quick: bool = False,
             seed: int = 0) -> Iterator[Launch]:
    """Every launch of the grid as (name, keyword arguments of ``label_pooling_triton``).

    The grid: OUTPUT_SIZES x MODES x NUM_CLASSES x MAP_SHAPES x (gather or not) x (flip or
    not) x BATCH_SIZES on float16 values and int16 classes (1,800 launches); S = 1 and 14 in
    every mode on every pair of VALUE_DTYPES and INDEX_DTYPES (with gather and flip); and at
    every output size, views that start off a 16-byte boundary (a store's rows, a batch's
    slice). 1,859 launches in all.

    Args:
        device: where the inputs are created.
        quick: a subset that still compiles every kernel variant (tile shape, dtypes, one
            class or many): C in (1, 1000) and one (gather, flip, batch) combination per
            (S, mode, C, map shape), taken in turn; 209 launches.
        seed: seed of the random data (the same launches for the same seed).
    """
    gen = torch.Generator().manual_seed(seed)
    classes = NUM_CLASSES[:2] if quick else NUM_CLASSES
    combos = list(itertools.product((False, True), (False, True), BATCH_SIZES))
    for n, (size, mode, num_classes, (k, h, w)) in enumerate(itertools.product(
            OUTPUT_SIZES, MODES, classes, MAP_SHAPES)):
        for gather, flip, batch in ([combos[n % len(combos)]] if quick else combos):
            yield (f"S={size} {mode} C={num_classes} K,H,W={k},{h},{w} gather={gather} "
                   f"flip={flip} B={batch}",
                   launch_arguments(batch, k, h, w, num_classes, size, mode, gather, flip,
                                    device=device, generator=gen))
    for size, mode, values, indices in itertools.product((1, 14), MODES, VALUE_DTYPES,
                                                         INDEX_DTYPES):
        yield (f"S={size} {mode} values={values} indices={indices}",
               launch_arguments(16, 5, 15, 15, 1000, size, mode, True, True, values, indices,
                                device=device, generator=gen))
    for size in OUTPUT_SIZES:
        # Views that start off a 16-byte boundary (a store's rows, a batch's slice).
        args = launch_arguments(9, 5, 15, 15, 1000, size, "softmax", True, True,
                                device=device, generator=gen)
        args["values"], args["indices"] = args["values"][1:], args["indices"][1:]
        # Rows of the sliced store: sample_index in [0, N - 1).
        args["sample_index"] = args["sample_index"][1:] % (args["values"].shape[0])
        args["flip"], args["boxes"] = args["flip"][1:], args["boxes"][1:]
        yield f"S={size} softmax, views off 16-byte boundaries", args
