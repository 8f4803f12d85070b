"""LabelPooling Triton kernel (the CUDA path of ``dali_relabel.label_pooling``).

ReLabel (Yun et al., "Re-labeling ImageNet", CVPR 2021) pools each random crop's region of a
top-k label map with RoIAlign. One program handles one (box, output bin): it gathers the box's
map row (``sample_index`` fused in), computes the separable RoIAlign weights a_y, a_x of its
bin exactly as torchvision's roi_align (aligned=False), scatters the K*H*W weighted values
into its own output row with atomics, and finishes the row in place (softmax over all C
classes, or the one-hot argmax). One launch per call; the dense [C, H, W] map never exists.

On a machine without a GPU the same kernel runs on CPU tensors under ``TRITON_INTERPRET=1``
(set before triton is imported); the tests do that.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

MODES = {"softmax": 0, "logits": 1, "argmax": 2}


@triton.jit
def _axis_weights(start, end, length, num_bins, bin_idx, BLOCK: tl.constexpr):
    """RoIAlign weights of the cells 0..BLOCK-1 along one axis for output bin ``bin_idx``.

    Mirrors torchvision's roi_align (aligned=False): roi floored at 1 cell, ceil(roi / S)
    samples per bin, samples beyond [-1, length] count zero, clamping at the border; the
    result is already divided by the sample count along this axis.
    """
    offs = tl.arange(0, BLOCK)
    roi = tl.maximum(end - start, 1.0)
    bin_size = roi / num_bins
    grid = tl.ceil(roi / num_bins).to(tl.int32)
    weights = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, grid):
        y = start + bin_idx * bin_size + (i + 0.5) * bin_size / grid
        inside = (y >= -1.0) & (y <= length)
        y = tl.maximum(y, 0.0)
        low = y.to(tl.int32)
        at_end = low >= length - 1
        low = tl.where(at_end, length - 1, low)
        high = tl.where(at_end, length - 1, low + 1)
        y = tl.where(at_end, low.to(tl.float32), y)
        frac = tl.where(inside, y - low, 0.0)
        keep = tl.where(inside, 1.0 - frac, 0.0)
        weights += tl.where(offs == low, keep, 0.0) + tl.where(offs == high, frac, 0.0)
    return weights / grid


@triton.jit
def _label_pooling_kernel(
    values_ptr, indices_ptr, boxes_ptr, sample_index_ptr, flip_ptr, out_ptr,
    K, H, W, C, S,
    HAS_SAMPLE_INDEX: tl.constexpr, HAS_FLIP: tl.constexpr, MODE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    num_bins = S * S
    b = pid // num_bins
    ph = (pid % num_bins) // S
    pw = pid % S
    if HAS_SAMPLE_INDEX:
        row = tl.load(sample_index_ptr + b)
    else:
        row = b.to(tl.int64)
    pw_out = pw
    if HAS_FLIP:
        pw_out = tl.where(tl.load(flip_ptr + b) != 0, S - 1 - pw, pw)

    # The box in label-map cells, as DESIGN.md's roi_align call: x * W - 0.5.
    x1 = tl.load(boxes_ptr + b * 4 + 0)
    y1 = tl.load(boxes_ptr + b * 4 + 1)
    x2 = tl.load(boxes_ptr + b * 4 + 2)
    y2 = tl.load(boxes_ptr + b * 4 + 3)
    ay = _axis_weights(y1 * H - 0.5, y2 * H - 0.5, H, S, ph, BLOCK_H)
    ax = _axis_weights(x1 * W - 0.5, x2 * W - 0.5, W, S, pw, BLOCK_W)

    offs_c = tl.arange(0, BLOCK_C)
    out_row = out_ptr + ((b * S + ph) * S + pw_out).to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        tl.store(out_row + c0 + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32),
                 mask=c0 + offs_c < C)
    # Make the zeros visible to every thread of the program before the atomics land.
    tl.debug_barrier()

    offs_h = tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    weight = ay[:, None] * ax[None, :]
    cells = offs_h[:, None] * W + offs_w[None, :]
    active = (offs_h[:, None] < H) & (offs_w[None, :] < W) & (weight != 0.0)
    map_base = row * K * H * W
    for k in range(0, K):
        base = map_base + k * H * W
        value = tl.load(values_ptr + base + cells, mask=active, other=0.0).to(tl.float32)
        cls = tl.load(indices_ptr + base + cells, mask=active, other=0).to(tl.int64)
        # The wrapper checks class ranges; the mask only keeps the kernel memory safe.
        ok = active & (cls >= 0) & (cls < C)
        tl.atomic_add(out_row + cls, weight * value, mask=ok)
    tl.debug_barrier()

    if MODE == 0:
        # Online softmax over the row (read twice, written once); .cg reads from L2, where
        # the atomics landed.
        running_max = float("-inf")
        running_sum = 0.0
        for c0 in range(0, C, BLOCK_C):
            x = tl.load(out_row + c0 + offs_c, mask=c0 + offs_c < C, other=float("-inf"),
                        cache_modifier=".cg")
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(x - new_max), axis=0)
            running_max = new_max
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + offs_c < C
            x = tl.load(out_row + c0 + offs_c, mask=mask, other=float("-inf"),
                        cache_modifier=".cg")
            tl.store(out_row + c0 + offs_c, tl.exp(x - running_max) / running_sum, mask=mask)
    elif MODE == 2:
        # One-hot of the first maximal class (torch.argmax's tie rule).
        best = float("-inf")
        winner = C
        for c0 in range(0, C, BLOCK_C):
            x = tl.load(out_row + c0 + offs_c, mask=c0 + offs_c < C, other=float("-inf"),
                        cache_modifier=".cg")
            block_max = tl.max(x, axis=0)
            block_winner = tl.min(tl.where(x == block_max, c0 + offs_c, C), axis=0)
            winner = tl.where(block_max > best, block_winner, winner)
            best = tl.maximum(best, block_max)
        for c0 in range(0, C, BLOCK_C):
            tl.store(out_row + c0 + offs_c, tl.where(c0 + offs_c == winner, 1.0, 0.0),
                     mask=c0 + offs_c < C)


def label_pooling_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    boxes: torch.Tensor,
    sample_index: Optional[torch.Tensor],
    flip: Optional[torch.Tensor],
    num_classes: int,
    output_size: int,
    mode: str,
) -> torch.Tensor:
    """Launch the LabelPooling kernel; returns float32 [B, S*S, C].

    Inputs are checked by ``dali_relabel.label_pooling``; this launcher only makes them
    contiguous in the dtypes the kernel reads (the tests call it directly on CPU tensors under
    ``TRITON_INTERPRET=1``).
    """
    assert mode in MODES, mode
    num_boxes = boxes.shape[0]
    _, topk, height, width = values.shape
    out = torch.empty(num_boxes, output_size * output_size, num_classes,
                      dtype=torch.float32, device=values.device)
    if num_boxes == 0:
        return out
    values = values.contiguous()
    indices = indices.contiguous()
    boxes = boxes.to(torch.float32).contiguous()
    # Unused pointer arguments still need a tensor; `boxes` stands in for them.
    sample_index_arg = boxes if sample_index is None else sample_index.to(torch.int64).contiguous()
    flip_arg = boxes if flip is None else flip.to(torch.int8).contiguous()
    grid = (num_boxes * output_size * output_size,)
    _label_pooling_kernel[grid](
        values, indices, boxes, sample_index_arg, flip_arg, out,
        topk, height, width, num_classes, output_size,
        HAS_SAMPLE_INDEX=sample_index is not None,
        HAS_FLIP=flip is not None,
        MODE=MODES[mode],
        BLOCK_H=triton.next_power_of_2(height),
        BLOCK_W=triton.next_power_of_2(width),
        BLOCK_C=min(1024, triton.next_power_of_2(num_classes)),
        # No fused multiply-add: x * W - 0.5 must round as torchvision's kernel rounds it, or
        # ceil(roi / S) can pick one sample more on boxes that are whole pixels.
        enable_fp_fusion=False,
    )
    return out
