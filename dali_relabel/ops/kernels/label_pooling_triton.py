"""LabelPooling Triton kernel (the CUDA path of ``dali_relabel.label_pooling``).

ReLabel (Yun et al., "Re-labeling ImageNet", CVPR 2021) pools each random crop's region of a
top-k label map with RoIAlign: the output is ``roi_align(D, [b, x1*W-0.5, y1*H-0.5, x2*W-0.5,
y2*H-0.5], (S, S), spatial_scale=1, sampling_ratio=-1, aligned=False)`` on the densified map D
(a class listed twice in a cell counts twice), then the mode's epilogue over all C classes.
The dense [C, H, W] map never exists.

One program handles one (box, output bin). It computes the separable RoIAlign weights a_y, a_x
of its bin as torchvision does (round-to-nearest division, no fused multiply-add) and loads the
(class, a_y * a_x * value) pairs under the bin's footprint (``sample_index`` fused in) into
registers: a [K, FH, FW] tile that the launcher sizes for the largest footprint of a
normalized box. It then walks the tile's distinct classes in increasing order, each step
taking the smallest class above the previous one and summing all its pairs. Every unlisted
class pools to 0, so the softmax is closed-form: for the u listed classes with pooled logits
z_j, m = max(0, max_j z_j) (max_j z_j if u == C) and Z = (C - u) e^-m + sum_j e^(z_j - m); the
row is e^-m / Z with the listed classes patched in. Softmax walks twice: once for m and Z, once
to write the row left to right, each gap of unlisted classes and then the listed class; logits
walk once, writing; argmax walks once for the winner, then writes the one-hot row. Every
output element is stored exactly once: no zeroing pass, no atomics, no explicit barrier (the
reductions synchronize their own warps), no read-back, and the result does not depend on
thread scheduling (bit-identical across runs).

A step costs two reductions over the tile and a walk u + 1 steps; u is at most the number of
pairs, so any map is handled (every cell listing other classes, C = 21843, ...), only more
slowly than the usual few dozen classes per image. A footprint larger than the tile (boxes
beyond [0, 1], possible with ``check_inputs=False``, or maps too big for one register tile) is
covered by further tiles, loaded again at each step: correct, but slow.

One program per bin rather than per row of bins: a row would share only the y weights (a few
dozen flops) and the box, while its S bins have different x footprints, so it would hold S
tiles or reload them bin by bin anyway; per-bin programs also give B*S*S-way parallelism.

On a machine without a GPU the same kernel runs on CPU tensors under ``TRITON_INTERPRET=1``
(set before triton is imported); the tests do that.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from dali_relabel.ops.label_pooling import BOX_TOLERANCE

MODES = {"softmax": 0, "logits": 1, "argmax": 2}
# Largest [K, FH, FW] register tile (elements); bigger footprints take several tiles.
MAX_TILE = 4096


@triton.jit
def _axis_weights(start, end, length, num_bins, bin_idx, BLOCK: tl.constexpr,
                  SAMPLES: tl.constexpr):
    """RoIAlign weights of the cells 0..BLOCK-1 along one axis for output bin ``bin_idx``.

    Mirrors torchvision's roi_align (aligned=False): roi floored at 1 cell, ceil(roi / S)
    samples per bin, samples beyond [-1, length] count zero, clamping at the border; the
    result is already divided by the sample count along this axis. Divisions round to nearest
    (compiled ``/`` would be approximate, and ceil(roi / S) must match torchvision exactly);
    SAMPLES sampling points are handled at once.
    """
    offs = tl.arange(0, BLOCK)
    roi = tl.maximum(end - start, 1.0)
    bin_size = tl.math.div_rn(roi, num_bins.to(tl.float32))
    grid = tl.ceil(bin_size).to(tl.int32)
    grid_f = grid.to(tl.float32)
    weights = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, grid, SAMPLES):
        i = i0 + tl.arange(0, SAMPLES)
        y = start + bin_idx * bin_size + tl.math.div_rn((i + 0.5) * bin_size, grid_f)
        inside = (i < grid) & (y >= -1.0) & (y <= length)
        y = tl.maximum(y, 0.0)
        low = y.to(tl.int32)
        at_end = low >= length - 1
        low = tl.where(at_end, length - 1, low)
        high = tl.where(at_end, length - 1, low + 1)
        y = tl.where(at_end, low.to(tl.float32), y)
        frac = tl.where(inside, y - low, 0.0)
        keep = tl.where(inside, 1.0 - frac, 0.0)
        weights += tl.sum(tl.where(offs[None, :] == low[:, None], keep[:, None], 0.0)
                          + tl.where(offs[None, :] == high[:, None], frac[:, None], 0.0), axis=0)
    return tl.math.div_rn(weights, grid_f)


@triton.jit
def _load_tile(values_ptr, indices_ptr, map_base, row0, col0, ay, ax, K, H, W, C,
               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, KB: tl.constexpr,
               FH: tl.constexpr, FW: tl.constexpr):
    """The (class, weight * value) pairs of map rows row0.., columns col0.. as [KB, FH, FW].

    Pairs outside the map or the footprint (zero weight) and out-of-range classes get class C,
    which no walk step ever takes.
    """
    rows = row0 + tl.arange(0, FH)
    cols = col0 + tl.arange(0, FW)
    # The tile's slice of the axis weights: a one-hot selection (registers cannot be indexed).
    wy = tl.sum(tl.where(rows[:, None] == tl.arange(0, BLOCK_H)[None, :], ay[None, :], 0.0),
                axis=1)
    wx = tl.sum(tl.where(cols[:, None] == tl.arange(0, BLOCK_W)[None, :], ax[None, :], 0.0),
                axis=1)
    weight = wy[:, None] * wx[None, :]
    in_map = (rows[:, None] < H) & (cols[None, :] < W) & (weight != 0.0)
    k = tl.arange(0, KB)[:, None, None]
    active = (k < K) & in_map[None, :, :]
    offset = map_base + k * (H * W) + (rows[:, None] * W + cols[None, :])[None, :, :]
    value = tl.load(values_ptr + offset, mask=active, other=0.0).to(tl.float32)
    cls = tl.load(indices_ptr + offset, mask=active, other=0)
    # The wrapper checks class ranges; this keeps the stores inside the row regardless.
    ok = active & (cls >= 0) & (cls < C)
    return tl.where(ok, cls.to(tl.int32), C), weight[None, :, :] * value


# The sizes and flags are runtime values (not specialized on 1 or on divisibility by 16, and
# pointers not on alignment): the compiled variants are then a function of the launcher's
# constexprs alone, one per tile shape, which the compile test enumerates for every GPU
# target. Specializing them would gain nothing here (rows of K*H*W pairs are not aligned)
# and multiplied the variants a process compiles at its first batches.
@triton.jit(do_not_specialize=["K", "H", "W", "C", "S", "mode", "has_sample_index",
                               "has_flip"],
            do_not_specialize_on_alignment=["values_ptr", "indices_ptr", "boxes_ptr",
                                            "sample_index_ptr", "flip_ptr", "out_ptr"])
def _label_pooling_kernel(
    values_ptr, indices_ptr, boxes_ptr, sample_index_ptr, flip_ptr, out_ptr,
    K, H, W, C, S, mode, has_sample_index, has_flip,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, SAMPLES: tl.constexpr, KB: tl.constexpr,
    FH: tl.constexpr, FW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    num_bins = S * S
    b = pid // num_bins
    ph = (pid % num_bins) // S
    pw = pid % S
    row = b.to(tl.int64)
    if has_sample_index != 0:
        row = tl.load(sample_index_ptr + b).to(tl.int64)
    pw_out = pw
    if has_flip != 0:
        pw_out = tl.where(tl.load(flip_ptr + b) != 0, S - 1 - pw, pw)

    # The box in label-map cells, as the roi_align call above: x * W - 0.5.
    x1 = tl.load(boxes_ptr + b * 4 + 0)
    y1 = tl.load(boxes_ptr + b * 4 + 1)
    x2 = tl.load(boxes_ptr + b * 4 + 2)
    y2 = tl.load(boxes_ptr + b * 4 + 3)
    ay = _axis_weights(y1 * H - 0.5, y2 * H - 0.5, H, S, ph, BLOCK_H, SAMPLES)
    ax = _axis_weights(x1 * W - 0.5, x2 * W - 0.5, W, S, pw, BLOCK_W, SAMPLES)
    # The bin's footprint: the cells with a non-zero weight (empty: first > last).
    offs_h = tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    first_h = tl.min(tl.where(ay != 0.0, offs_h, BLOCK_H))
    last_h = tl.max(tl.where(ay != 0.0, offs_h, -1))
    first_w = tl.min(tl.where(ax != 0.0, offs_w, BLOCK_W))
    last_w = tl.max(tl.where(ax != 0.0, offs_w, -1))
    map_base = row * K * H * W
    cls0, pair0 = _load_tile(values_ptr, indices_ptr, map_base, first_h, first_w, ay, ax,
                             K, H, W, C, BLOCK_H, BLOCK_W, KB, FH, FW)

    out_row = out_ptr + ((b * S + ph) * S + pw_out).to(tl.int64) * C
    offs_c = tl.arange(0, BLOCK_C)
    # Softmax statistics over the listed classes (online), then over all C.
    m = float("-inf")
    z_sum = 0.0
    listed = 0
    # Argmax: the first maximal listed class, and the first unlisted class (C: none).
    best = float("-inf")
    winner = C
    first_unlisted = C
    # Softmax (mode 0) walks twice (statistics, then writes), logits (1) once (writes),
    # argmax (2) once (statistics; the one-hot row is written after).
    num_walks = 1
    if mode == 0:
        num_walks = 2
    for walk in range(0, num_walks):
        fill = 0.0
        if (mode == 0) & (walk == 1):
            # m >= 0 whenever a class is unlisted; the clamp only keeps the fill (then unused)
            # finite when every class is listed.
            fill = tl.math.div_rn(tl.exp(-tl.maximum(m, 0.0)), z_sum)
        writing = (mode == 1) | (walk == 1)
        last = -1
        c_prev = -1
        while c_prev < C:
            # The next class: the smallest one above c_prev, with the sum of its pairs.
            candidate = tl.where(cls0 > c_prev, cls0, C)
            c = tl.min(candidate)
            z = tl.sum(tl.where(candidate == c, pair0, 0.0))
            for row0 in range(first_h, last_h + 1, FH):
                for col0 in range(first_w, last_w + 1, FW):
                    if (row0 > first_h) | (col0 > first_w):
                        cls_t, pair_t = _load_tile(values_ptr, indices_ptr, map_base, row0, col0,
                                                   ay, ax, K, H, W, C, BLOCK_H, BLOCK_W, KB,
                                                   FH, FW)
                        candidate = tl.where(cls_t > c_prev, cls_t, C)
                        c_t = tl.min(candidate)
                        z_t = tl.sum(tl.where(candidate == c_t, pair_t, 0.0))
                        z = tl.where(c_t == c, z + z_t, tl.where(c_t < c, z_t, z))
                        c = tl.minimum(c, c_t)
            if writing:
                # Write the gap last+1..c-1 and class c (at c == C: the tail of the row).
                patch = z
                if mode == 0:
                    patch = tl.math.div_rn(tl.exp(z - m), z_sum)
                for c0 in range(last + 1, c + 1, BLOCK_C):
                    cols = c0 + offs_c
                    tl.store(out_row + cols, tl.where(cols == c, patch, fill),
                             mask=(cols <= c) & (cols < C))
            elif c < C:
                if mode == 0:
                    m_new = tl.maximum(m, z)
                    z_sum = z_sum * tl.exp(m - m_new) + tl.exp(z - m_new)
                    m = m_new
                    listed += 1
                else:
                    winner = tl.where(z > best, c, winner)
                    best = tl.maximum(best, z)
                    first_unlisted = tl.where(c > last + 1, tl.minimum(first_unlisted, last + 1),
                                              first_unlisted)
            last = tl.where(c < C, c, last)
            c_prev = c
        if (mode == 0) & (walk == 0):
            if listed < C:
                # The C - u unlisted classes, all of logit 0.
                m_new = tl.maximum(m, 0.0)
                z_sum = z_sum * tl.exp(m - m_new) + (C - listed).to(tl.float32) * tl.exp(-m_new)
                m = m_new
        if mode == 2:
            first_unlisted = tl.minimum(first_unlisted, last + 1)

    if mode == 2:
        # One-hot of the first maximal class of the dense row (torch.argmax's tie rule): an
        # unlisted class (logit 0) wins if no listed logit is positive and it comes first.
        take_unlisted = (first_unlisted < C) & (
            (best < 0.0) | ((best == 0.0) & (first_unlisted < winner)))
        winner = tl.where(take_unlisted, first_unlisted, winner)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            tl.store(out_row + cols, tl.where(cols == winner, 1.0, 0.0), mask=cols < C)


def _max_grid(length: int, output_size: int) -> int:
    """The most samples per bin along an axis of ``length`` cells, ceil(roi / S), for the
    largest roi of a normalized box (up to BOX_TOLERANCE outside [0, 1] on each side)."""
    return math.ceil(max(1.0, length * (1 + 2 * BOX_TOLERANCE)) / output_size)


def _tile_side(length: int, output_size: int) -> int:
    """Cells along one axis of the largest bin footprint of a normalized box, as a power of 2.

    A bin's grid samples lie within grid - 1 cells of each other, each touching two
    neighbouring cells: at most grid + 1 cells, plus one for rounding.
    """
    return min(triton.next_power_of_2(length),
               triton.next_power_of_2(_max_grid(length, output_size) + 2))


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

    Args:
        values (Tensor[N, K, H, W]): label-map values, float16, bfloat16 or float32.
        indices (Tensor[N, K, H, W]): their classes, int16, int32 or int64, in [0, C).
        boxes (Tensor[B, 4]): normalized (x1, y1, x2, y2).
        sample_index (Tensor[B], optional): the row of values/indices each box pools (N == B
            without it).
        flip (Tensor[B], optional): mirror the bins along x.
        num_classes (int): C. output_size (int): S. mode (str): one of ``MODES``.

    ``dali_relabel.label_pooling`` checks the data (box and class ranges, sample_index); this
    launcher checks shapes and mode and makes the tensors contiguous in the dtypes the kernel
    reads (the tests call it directly on CPU tensors under ``TRITON_INTERPRET=1``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if values.dim() != 4 or indices.shape != values.shape or min(values.shape[1:]) < 1:
        raise ValueError(f"values and indices must be [N, K, H, W] alike with K, H, W >= 1, "
                         f"got {tuple(values.shape)} and {tuple(indices.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [B, 4], got {tuple(boxes.shape)}")
    pooled_rows = values.shape[0] if sample_index is None else sample_index.numel()
    if pooled_rows != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes need as many rows of values (without "
                         f"sample_index) or entries of sample_index, got {pooled_rows}")
    num_boxes = boxes.shape[0]
    _, topk, height, width = values.shape
    out = torch.empty(num_boxes, output_size * output_size, num_classes,
                      dtype=torch.float32, device=values.device)
    if num_boxes == 0:
        return out
    values = values.contiguous()
    indices = indices.contiguous()
    boxes = boxes.to(torch.float32).contiguous()
    # An unused pointer argument still needs a tensor: `boxes` reinterpreted in the dtype the
    # kernel reads stands in (no copy), so the pointer types, and with them the compiled
    # variant, do not depend on which optional inputs are given.
    sample_index_arg = (boxes.view(torch.int64) if sample_index is None
                        else sample_index.to(torch.int64).contiguous())
    flip_arg = boxes.view(torch.int8) if flip is None else flip.to(torch.int8).contiguous()
    topk_block = triton.next_power_of_2(topk)
    tile_h = _tile_side(height, output_size)
    tile_w = _tile_side(width, output_size)
    while topk_block * tile_h * tile_w > MAX_TILE and max(tile_h, tile_w) > 1:
        if tile_h >= tile_w:
            tile_h //= 2
        else:
            tile_w //= 2
    tile = topk_block * tile_h * tile_w
    _label_pooling_kernel[(num_boxes * output_size * output_size,)](
        values, indices, boxes, sample_index_arg, flip_arg, out,
        topk, height, width, num_classes, output_size, MODES[mode],
        int(sample_index is not None), int(flip is not None),
        BLOCK_H=triton.next_power_of_2(height),
        BLOCK_W=triton.next_power_of_2(width),
        SAMPLES=min(32, triton.next_power_of_2(_max_grid(max(height, width), output_size))),
        KB=topk_block,
        FH=tile_h,
        FW=tile_w,
        # Spans between listed classes are short: small blocks waste fewer masked lanes.
        BLOCK_C=min(512, triton.next_power_of_2(num_classes)),
        num_warps=max(1, min(4, tile // 256)),
        # No fused multiply-add: x * W - 0.5 must round as torchvision's kernel rounds it, or
        # ceil(roi / S) can pick one sample more on boxes that are whole pixels.
        enable_fp_fusion=False,
        # Without an explicit cap ptxas keeps single-warp programs (S = 14) at 80 registers
        # and spills to local memory (seen on sm_100, and on sm_90 with triton 3.6); they
        # need about 90. Programs use what they need below the cap.
        maxnreg=255,
    )
    return out
