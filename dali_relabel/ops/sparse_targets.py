"""Token targets without the memory: LabelPooling targets in sparse form.

Dense S x S token targets are [B, S*S, C] float32 (803 MB per batch at B = 1024, S = 14,
C = 1000), yet a token's softmax target gives one and the same probability to every class its
footprint on the label map does not list. ``SparseTargets`` holds that fill value and the
listed (class, probability) pairs; ``sparse_label_pooling`` makes them with plain torch ops
that run on CPU and CUDA alike and equal ``reference_label_pooling``;
``soft_target_cross_entropy`` takes either form and never builds the dense targets.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from dali_relabel.ops.label_pooling import BOX_TOLERANCE, ArrayLike, _prepare

__all__ = ["SPARSE_MODES", "SparseTargets", "footprint", "soft_target_cross_entropy",
           "sparse_label_pooling"]

SPARSE_MODES = ("softmax", "argmax")
REDUCTIONS = ("mean", "sum", "none")
# Footprint entries pooled at once (about 45 bytes of temporaries each: ~90 MB).
_CHUNK_ENTRIES = 1 << 21


def class_dtype(num_classes: int) -> torch.dtype:
    """The dtype of SparseTargets.classes: int16 as the store's /indices, int32 beyond."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


@dataclasses.dataclass
class SparseTargets:
    """Soft targets of which each row lists a few classes; every other class gets ``fill``.

    Row r's dense target is ``t[r, c] = probs[r, j]`` where ``classes[r, j] == c``, else
    ``fill[r]``. A class is listed at most once per row; unused slots hold class -1 and
    probability 0. Rows are R = (B,) for crop targets, (B, T) for T = S*S token targets.

    Attributes:
        fill (Tensor[*R]): float32, the probability of each class the row does not list.
        classes (Tensor[*R, U]): int16 (int32 when C > 32767) listed classes, -1 if unused.
        probs (Tensor[*R, U]): float32 probabilities of the listed classes, 0 if unused.
        num_classes (int): C.
    """

    fill: Tensor
    classes: Tensor
    probs: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
        if self.classes.dim() < 2 or self.classes.shape[:-1] != self.fill.shape:
            raise ValueError(f"classes must be [*fill.shape, U] = [{_dims(self.fill.shape)}, U], "
                             f"got shape {tuple(self.classes.shape)}")
        if self.probs.shape != self.classes.shape:
            raise ValueError(f"probs must have the shape of classes {tuple(self.classes.shape)},"
                             f" got {tuple(self.probs.shape)}")
        if self.classes.is_floating_point() or self.classes.dtype == torch.bool:
            raise ValueError(f"classes must be an integer tensor, got {self.classes.dtype}")
        if not (self.fill.is_floating_point() and self.probs.is_floating_point()):
            raise ValueError(f"fill and probs must be floating tensors, got {self.fill.dtype} "
                             f"and {self.probs.dtype}")
        if len({self.fill.device, self.classes.device, self.probs.device}) > 1:
            raise ValueError(f"fill, classes and probs must be on one device, got "
                             f"{self.fill.device}, {self.classes.device}, {self.probs.device}")

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense targets: [*R, C]."""
        return torch.Size((*self.fill.shape, self.num_classes))

    @property
    def device(self) -> torch.device:
        return self.fill.device

    def __len__(self) -> int:
        return self.fill.shape[0]

    def nbytes(self) -> int:
        """Bytes the three tensors take (an expanded view counts as its full size)."""
        return sum(t.numel() * t.element_size() for t in (self.fill, self.classes, self.probs))

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> SparseTargets:
        return SparseTargets(self.fill.to(device, non_blocking=non_blocking),
                             self.classes.to(device, non_blocking=non_blocking),
                             self.probs.to(device, non_blocking=non_blocking), self.num_classes)

    def dense(self) -> Tensor:
        """The targets as Tensor[*R, C] float32 (the memory this form exists to avoid)."""
        c = self.num_classes
        # Unused slots write into a spare column C, cut off at the end.
        out = self.fill.float()[..., None].expand(*self.fill.shape, c + 1).contiguous()
        index = self.classes.long().masked_fill(self.classes < 0, c)
        out.scatter_(-1, index, self.probs.float())
        return out[..., :c].contiguous()


def _dims(shape: torch.Size) -> str:
    return ", ".join(str(d) for d in shape)


def footprint(size: int, output_size: int) -> int:
    """F: the most rows (or columns) of a size-long map axis that one of S = output_size
    RoIAlign bins can weigh, for boxes within [0, 1] (give or take BOX_TOLERANCE).

    A bin spans roi / S cells with roi <= size * (1 + 2 * tolerance); its samples lie strictly
    inside that span and each touches floor(y) and floor(y) + 1, so at most
    ceil(roi / S) + 1 consecutive rows carry weight.
    """
    longest_bin = size * (1 + 2 * BOX_TOLERANCE) / output_size
    return min(size, math.ceil(longest_bin) + 1)


def _max_grid(size: int, output_size: int) -> int:
    """The largest sampling grid ceil(roi / S) of a box within [0, 1] (roi is at least 1)."""
    return max(1, math.ceil(size * (1 + 2 * BOX_TOLERANCE) / output_size))


def _axis_weights(start: Tensor, end: Tensor, size: int, output_size: int) -> Tensor:
    """RoIAlign's weights along one axis (aligned=False, sampling_ratio=-1), torchvision's
    CPU kernel rule for rule in float32: Tensor[B, S, size], a bin's weight of each cell,
    averaged over its sampling grid. ``start``, ``end``: Tensor[B], the roi in cells."""
    roi = torch.clamp(end - start, min=1.0)
    bin_size = roi / output_size
    grid = torch.ceil(roi / output_size)
    g = torch.arange(_max_grid(size, output_size), device=start.device)
    p = torch.arange(output_size, device=start.device, dtype=torch.float32)
    # yy = roi_start + p * bin_size + (g + 0.5) * bin_size / grid, in torchvision's order.
    offset = (g.float() + 0.5)[None, None, :] * bin_size[:, None, None] / grid[:, None, None]
    y = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + offset
    used = (g[None, None, :] < grid[:, None, None]) & (y >= -1.0) & (y <= size)
    y = y.clamp(min=0.0)
    low = y.long()
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    y = torch.where(at_end, low.float(), y)
    ly = torch.where(used, y - low, 0.0)
    hy = torch.where(used, 1.0 - (y - low), 0.0)
    weights = torch.zeros(*y.shape[:2], size, device=start.device)
    weights.scatter_add_(2, low, hy).scatter_add_(2, high, ly)
    return weights / grid[:, None, None]


def _windows(weights: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """Each bin's `width` consecutive cells that hold all its weight: (cells Tensor[B, S, F]
    int64, their weights Tensor[B, S, F])."""
    size = weights.shape[-1]
    first = (weights > 0).to(torch.uint8).argmax(dim=-1)  # first cell with weight (0 if none)
    start = first.clamp(max=size - width)
    cells = start[..., None] + torch.arange(width, device=weights.device)
    return cells, weights.gather(-1, cells)


def sparse_label_pooling(
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
) -> SparseTargets:
    """LabelPooling as SparseTargets: equal to ``label_pooling``'s dense targets.

    RoIAlign's weights are separable: per box and output bin, a_y over the map's rows times
    a_x over its columns, each nonzero on at most F = ``footprint(H or W, S)`` consecutive
    cells. A bin's pooled logit of class c is the sum of a_y * a_x * value over the K * F * F
    entries of its footprint that list c; every class not listed there pools to 0, so the
    softmax gives all of them one probability, the fill. Runs on the device of its inputs
    with torch ops and no host synchronisation; U = min(K * F * F, C) slots per row.

    Args:
        values (Tensor[N, K, H, W]): top-k label-map values (annotator logits), float16,
            bfloat16 or float32. N == B unless ``sample_index`` is given.
        indices (Tensor[N, K, H, W]): class of each value, integer, in [0, num_classes).
        boxes (Tensor[B, 4]): crop boxes (x1, y1, x2, y2), normalized to [0, 1]. With
            check_inputs=False, boxes beyond [0, 1] (give or take BOX_TOLERANCE) pool wrong
            (never out of bounds).
        num_classes (int): C.
        output_size (int): S; S > 1 gives S*S token rows per box.
        flip (Tensor[B], optional): bool; mirrors the output bins along x (only S > 1 changes).
        sample_index (Tensor[B], optional): rows of ``values``/``indices`` to pool per box.
        mode (str): "softmax" (ReLabel targets) or "argmax" (one-hot of the top class, the
            smallest class index among ties, as torch.argmax on the dense row).
        check_inputs (bool): check box ranges, sample_index and class ranges (reads the data:
            a host sync on CUDA).

    Returns:
        SparseTargets with rows [B] for output_size 1, else [B, S*S] (tokens row by row).
    """
    if mode not in SPARSE_MODES:
        raise ValueError(f"mode must be one of {SPARSE_MODES} for sparse targets, got {mode!r}")
    values, indices, boxes, flip, sample_index = _prepare(
        values, indices, boxes, num_classes, output_size, flip, sample_index, mode, check_inputs)
    _, k, h, w = values.shape
    b, tokens, device = len(boxes), output_size ** 2, values.device
    entries = k * footprint(h, output_size) * footprint(w, output_size)
    slots = min(entries, num_classes) if mode == "softmax" else 1
    fill = torch.empty(b, tokens, device=device)
    classes = torch.empty(b, tokens, slots, dtype=class_dtype(num_classes), device=device)
    probs = torch.empty(b, tokens, slots, device=device)
    # A batch's footprint entries can outnumber its dense targets (45 per token at S = 14
    # against C = 1000): pooling chunks of boxes bounds the temporaries.
    chunk = max(1, _CHUNK_ENTRIES // (tokens * entries))
    for start in range(0, b, chunk):
        part = slice(start, start + chunk)
        rows = part if sample_index is None else sample_index[part]
        fill[part], classes[part], probs[part] = _pool(
            values[rows], indices[rows], boxes[part], None if flip is None else flip[part],
            num_classes, output_size, mode)
    if output_size == 1:
        fill, classes, probs = fill[:, 0], classes[:, 0], probs[:, 0]
    return SparseTargets(fill, classes, probs, num_classes)


def _pool(values: Tensor, indices: Tensor, boxes: Tensor, flip: Optional[Tensor],
          num_classes: int, output_size: int, mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    """sparse_label_pooling of boxes on their own rows [n, K, H, W]: (fill [n, T], classes
    [n, T, U], probs [n, T, U])."""
    n, k, h, w = values.shape
    s, device = output_size, values.device
    # Python scalars: a tensor of the scales would be copied to the device with a host sync.
    x1, y1, x2, y2 = (boxes[:, i] * (w if i % 2 == 0 else h) - 0.5 for i in range(4))
    rows, wy = _windows(_axis_weights(y1, y2, h, s), footprint(h, s))
    cols, wx = _windows(_axis_weights(x1, x2, w, s), footprint(w, s))
    if flip is not None and s > 1:
        mirrored = flip[:, None, None]
        cols = torch.where(mirrored, cols.flip(1), cols)
        wx = torch.where(mirrored, wx.flip(1), wx)
    entries = k * rows.shape[-1] * cols.shape[-1]
    # Entry (k, i, j) of bin (p, q) is cell (rows[p, i], cols[q, j]) of map k: the entries
    # [n, S, S, K, F, F], flattened per box to index its K * H * W values.
    cell = (torch.arange(k, device=device)[:, None, None] * (h * w)
            + rows[:, :, None, None, :, None] * w + cols[:, None, :, None, None, :])
    cell = cell.view(n, s * s * entries)
    weight = wy[:, :, None, None, :, None] * wx[:, None, :, None, None, :]
    weight = weight.expand(-1, -1, -1, k, -1, -1).reshape(n, s * s, entries)
    contrib = weight * values.reshape(n, k * h * w).gather(1, cell).view_as(weight).float()
    classes = indices.reshape(n, k * h * w).gather(1, cell).view(n, s * s, entries)

    # One slot per distinct class: sort by class, sum each run (a class listed twice counts
    # twice, as after densifying).
    classes, order = classes.sort(dim=-1)
    contrib = contrib.gather(-1, order)
    new = torch.ones_like(classes, dtype=torch.bool)
    new[..., 1:] = classes[..., 1:] != classes[..., :-1]
    slot = new.long().cumsum(dim=-1) - 1
    slots = min(entries, num_classes)
    logits = torch.zeros(n, s * s, slots, device=device).scatter_add_(-1, slot, contrib)
    listed = torch.full((n, s * s, slots), -1, dtype=class_dtype(num_classes), device=device)
    listed.scatter_(-1, slot, classes.to(listed.dtype))
    distinct = slot[..., -1] + 1
    used = torch.arange(slots, device=device) < distinct[..., None]
    if mode == "softmax":
        fill, probs = _softmax(logits, used, distinct, num_classes)
        return fill, listed, probs
    return _argmax(logits, listed, used, distinct, num_classes)


def _softmax(logits: Tensor, used: Tensor, distinct: Tensor,
             num_classes: int) -> Tuple[Tensor, Tensor]:
    """Softmax over all C classes of rows that list `distinct` classes (logits, `used`
    slots) and give the C - distinct others logit 0: (fill, probs)."""
    unlisted = (num_classes - distinct).float()
    top = torch.where(used, logits, -torch.inf).amax(dim=-1)
    # Shift by the largest logit of the whole row (0 is one while a class is unlisted).
    top = torch.where(unlisted > 0, top.clamp(min=0.0), top)
    exp = torch.where(used, torch.exp(logits - top[..., None]), 0.0)
    # exp(-top) <= 1 while a class is unlisted; else it may overflow and has no class.
    exp_fill = torch.where(unlisted > 0, torch.exp(-top), 0.0)
    total = unlisted * exp_fill + exp.sum(dim=-1)
    fill = exp_fill / total
    return fill, exp / total[..., None]


def _argmax(logits: Tensor, listed: Tensor, used: Tensor, distinct: Tensor,
            num_classes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """One-hot of each row's top class, as torch.argmax on the dense row picks it (the
    smallest index among ties): (fill 0, the class in one slot, probability 1)."""
    unlisted = distinct < num_classes
    top = torch.where(used, logits, -torch.inf).amax(dim=-1)
    top = torch.where(unlisted, top.clamp(min=0.0), top)
    none = num_classes  # larger than every class
    best_listed = torch.where(used & (logits == top[..., None]), listed.long(), none)
    # Listed classes are sorted and distinct, so the smallest unlisted one is the length of
    # the prefix 0, 1, 2, ... they start with.
    prefix = (listed.long() == torch.arange(listed.shape[-1], device=listed.device)).sum(-1)
    best_unlisted = torch.where(unlisted & (top == 0.0), prefix, none)
    winner = torch.minimum(best_listed.amin(dim=-1), best_unlisted)
    fill = torch.zeros_like(top)
    return fill, winner[..., None].to(listed.dtype), torch.ones_like(fill)[..., None]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _SparseCrossEntropy(torch.autograd.Function):
    """Per-row -sum_c t_c log p_c of SparseTargets, with p = softmax(logits):
    -(f * sum_c log p_c + sum_j (t_j - f) log p_{c_j}). Saves only what the targets and the
    logits already hold; the backward pass recomputes p and builds the gradient
    (sum_c t_c) p - t in place, in one [*R, C] tensor."""

    @staticmethod
    def forward(ctx, logits: Tensor, fill: Tensor, classes: Tensor, probs: Tensor) -> Tensor:
        dtype = _compute_dtype(logits)
        used = classes >= 0
        index = torch.where(used, classes.long(), 0)
        fill = fill.to(dtype)
        excess = torch.where(used, probs.to(dtype) - fill[..., None], 0.0)
        # One fused pass (torch.logsumexp takes several on CPU); freed on return.
        log_p = torch.log_softmax(logits, dim=-1, dtype=dtype)
        loss = -(fill * log_p.sum(dim=-1) + (excess * log_p.gather(-1, index)).sum(dim=-1))
        ctx.save_for_backward(logits, fill, index, excess)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, fill, index, excess = ctx.saved_tensors
        mass = logits.shape[-1] * fill + excess.sum(dim=-1)  # sum_c t_c
        grad = torch.softmax(logits, dim=-1, dtype=fill.dtype)
        grad.mul_((grad_loss * mass)[..., None]).sub_((grad_loss * fill)[..., None])
        grad.scatter_add_(-1, index, -excess * grad_loss[..., None])
        return grad.to(logits.dtype), None, None, None


def soft_target_cross_entropy(logits: Tensor, targets: Union[Tensor, SparseTargets],
                              reduction: str = "mean") -> Tensor:
    """Soft-target cross-entropy -sum_c t_c log softmax(logits)_c per row.

    SparseTargets use the identity -sum_c t_c log p_c = -(f sum_c log p_c +
    sum_j (t_j - f) log p_{c_j}) and never build dense targets; the backward pass saves
    nothing of size [*R, C] but the logits themselves.

    Args:
        logits (Tensor[*R, C]): e.g. [B, C] or token logits [B, T, C]; any float dtype
            (computed in float32, or float64 for float64 logits).
        targets (Tensor[*R, C] or SparseTargets with rows R): the soft targets.
        reduction (str): "mean" over the rows, "sum", or "none" (Tensor[*R]).

    Returns:
        The loss: a float32 scalar (Tensor[*R] for reduction "none").
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        got = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating tensor [*R, C], got {got}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(targets, SparseTargets):
        if targets.shape != logits.shape:
            raise ValueError(f"targets must have rows {tuple(logits.shape[:-1])} of "
                             f"C={logits.shape[-1]} classes as logits {tuple(logits.shape)}, "
                             f"got sparse targets of shape {tuple(targets.shape)}")
        if targets.device != logits.device:
            raise ValueError(f"targets must be on the device of logits ({logits.device}), got "
                             f"{targets.device}")
        per_row = _SparseCrossEntropy.apply(logits, targets.fill, targets.classes, targets.probs)
    elif isinstance(targets, Tensor):
        if targets.shape != logits.shape:
            raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got "
                             f"{tuple(targets.shape)}")
        if targets.device != logits.device:
            raise ValueError(f"targets must be on the device of logits ({logits.device}), got "
                             f"{targets.device}")
        dtype = _compute_dtype(logits)
        per_row = -(targets.to(dtype) * torch.log_softmax(logits, dim=-1, dtype=dtype)).sum(-1)
    else:
        raise ValueError(f"targets must be a Tensor or SparseTargets, got "
                         f"{type(targets).__name__}")
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row
