"""Training targets from crop boxes: the label modes of the paper's factor analysis.

``TargetMaker`` turns a batch's crop boxes, flips and label-map rows into targets with
LabelPooling, either straight from a store held on the device (the gather fused into the
kernel) or from rows gathered on the host; it checks the store once at start, because the
kernel runs without per-batch data checks, and it times itself without host syncs.
"""
from __future__ import annotations

import collections
import time
from typing import Optional, Union

import numpy as np
import torch

from dali_relabel import _transfer
from dali_relabel.ops.label_pooling import label_pooling
from dali_relabel.ops.sparse_targets import SparseTargets, class_dtype, sparse_label_pooling
from dali_relabel.labelmaps import LabelMapStore

__all__ = ["LABEL_MODES", "TargetMaker"]

LABEL_MODES = ("localized_multi", "localized_single", "global_multi", "global_single",
               "original")
_SHOWN = 5
_SCAN_CHUNK_ROWS = 1 << 14
# CUDA event pairs still in flight before the timer waits for the oldest one.
_MAX_PENDING_EVENTS = 64


class _Timer:
    """Accumulated time of a code block: wall clock on CPU, CUDA events on a GPU.

    Finished event pairs are folded into the total as later blocks start, so a run that never
    reads the total holds at most a bounded number of events.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._ms = 0.0
        self._pending: collections.deque = collections.deque()

    def __enter__(self) -> None:
        if self._device.type == "cuda":
            self._fold(finished_only=True)
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(torch.cuda.current_stream(self._device))
            self._pending.append((start, end))
        else:
            self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self._device.type == "cuda":
            self._pending[-1][1].record(torch.cuda.current_stream(self._device))
        else:
            self._ms += (time.perf_counter() - self._start) * 1e3

    def _fold(self, finished_only: bool) -> None:
        while self._pending and (not finished_only or self._pending[0][1].query()
                                 or len(self._pending) >= _MAX_PENDING_EVENTS):
            start, end = self._pending.popleft()
            end.synchronize()
            self._ms += start.elapsed_time(end)

    def pop_ms(self) -> float:
        """Milliseconds since the last call (waits for the blocks still running on a GPU)."""
        self._fold(finished_only=False)
        ms, self._ms = self._ms, 0.0
        return ms


def check_store(store: LabelMapStore, rows: np.ndarray, *, label_mode: str) -> None:
    """One pass over the rows a run trains on: class ids in range, values finite, and for
    label_mode "original" a known label for every row.

    The kernels run with check_inputs=False (a data check per batch would cost a host sync
    on a GPU), so bad data must be refused here. Reads /values and /indices once
    (memory-mapped: a few seconds for ImageNet, from the page cache all ranks share).

    Raises:
        ValueError: Naming the file, the first bad rows and how to find them all.
    """
    if label_mode == "original":
        labels = store.labels[torch.from_numpy(rows)].numpy()
        unknown = rows[labels < 0]
        if unknown.size:
            raise ValueError(
                f"label_mode='original' needs /labels, but {store.path} has -1 (unknown) for "
                f"{unknown.size} images, first: {[store.paths[r] for r in unknown[:_SHOWN]]}")
        beyond = rows[labels >= store.num_classes]
        if beyond.size:
            raise ValueError(
                f"{store.path}: /labels holds class ids outside [0, {store.num_classes}) for "
                f"{beyond.size} images, first rows {beyond[:_SHOWN].tolist()}; run "
                f"`dali-relabel info {store.path} --full`")
        return
    bad_class, bad_value = [], []
    sorted_rows = np.sort(rows)
    for start in range(0, len(sorted_rows), _SCAN_CHUNK_ROWS):
        chunk = sorted_rows[start:start + _SCAN_CHUNK_ROWS]
        # A contiguous range reads the memory map sequentially; else gather the rows.
        if chunk[-1] - chunk[0] + 1 == len(chunk):
            values = store.values[int(chunk[0]):int(chunk[-1]) + 1]
            indices = store.indices[int(chunk[0]):int(chunk[-1]) + 1]
        else:
            index = torch.from_numpy(chunk)
            values, indices = store.values[index], store.indices[index]
        n = len(chunk)
        classes = indices.reshape(n, -1)
        out_of_range = ((classes < 0) | (classes >= store.num_classes)).any(dim=1)
        not_finite = ~torch.isfinite(values.reshape(n, -1)).all(dim=1)
        bad_class.extend(chunk[out_of_range.numpy()][:_SHOWN].tolist())
        bad_value.extend(chunk[not_finite.numpy()][:_SHOWN].tolist())
    problems = []
    if bad_class:
        problems.append(f"/indices holds class ids outside [0, {store.num_classes}) "
                        f"(first rows {bad_class[:_SHOWN]})")
    if bad_value:
        problems.append(f"/values holds NaN or inf (first rows {bad_value[:_SHOWN]})")
    if problems:
        raise ValueError(f"{store.path}: {'; '.join(problems)}; run `dali-relabel info "
                         f"{store.path} --full` to list them all")


def _flip_token_rows(targets: Union[torch.Tensor, SparseTargets], vflip: torch.Tensor,
                     size: int) -> Union[torch.Tensor, SparseTargets]:
    """Token targets [B, S*S, ...] with the S rows of bins mirrored where `vflip`."""
    def mirror(tensor: torch.Tensor) -> torch.Tensor:
        grid = tensor.reshape(len(tensor), size, size, *tensor.shape[2:])
        where = vflip.view(-1, *([1] * (grid.dim() - 1)))
        return torch.where(where, grid.flip(1), grid).reshape(tensor.shape)

    if isinstance(targets, SparseTargets):
        return SparseTargets(mirror(targets.fill), mirror(targets.classes),
                             mirror(targets.probs), targets.num_classes)
    return mirror(targets)


class TargetMaker:
    """Makes a batch's targets for one label mode.

    Args:
        store: The label maps (any placement).
        device: Where the targets go.
        label_mode: One of LABEL_MODES.
        output_size: S; S > 1 gives token targets [B, S*S, C], mirrored with the image.
        fused_gather: Pool straight from the whole store by row (the store must be on
            `device`); else gather the batch's rows on the host (into pinned memory for a
            GPU) and copy them.
        sparse: Make SparseTargets (rows [B] or [B, S*S]) instead of dense tensors: the
            localized modes pool sparsely (multi: the classes of each bin's footprint;
            single: the top class), "global_single" gives every token the whole image's top
            class and "original" the label, with probability 1 (default: False).
            "global_multi" with S > 1 is refused: every token would list the whole map's
            classes (up to K*H*W), which the loss would expand per token.

    Raises:
        ValueError: sparse with label_mode "global_multi" and output_size > 1.
    """

    def __init__(self, store: LabelMapStore, device: torch.device, *, label_mode: str,
                 output_size: int, fused_gather: bool, sparse: bool = False,
                 timer: Optional[_Timer] = None) -> None:
        assert label_mode in LABEL_MODES, label_mode
        if sparse and label_mode == "global_multi" and output_size > 1:
            raise ValueError(
                "sparse targets with label_mode='global_multi' and output_size > 1: every "
                "token's target would list every class of the whole map (up to K*H*W = "
                f"{store.topk * store.height * store.width}); use dense targets")
        self.store = store
        self.device = device
        self.label_mode = label_mode
        self.output_size = output_size
        self.fused_gather = fused_gather
        self.sparse = sparse
        self._labels = store.labels.to(device)
        self._whole_image = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
        self.timer = timer if timer is not None else _Timer(device)

    def __call__(self, boxes: torch.Tensor, flip: torch.Tensor, rows: torch.Tensor,
                 vflip: Optional[torch.Tensor] = None) -> Union[torch.Tensor, SparseTargets]:
        """Targets for crops `boxes` of store rows `rows`.

        Args:
            boxes (Tensor[B, 4]): crop boxes (x1, y1, x2, y2), normalized, on the CPU.
            flip (Tensor[B]): bool, mirrored crops, on the CPU.
            rows (Tensor[B]): int64 store rows, on the CPU.
            vflip (Tensor[B], optional): bool, crops flipped vertically, on the CPU (token
                targets follow them; a crop's own target does not change).

        Returns:
            Tensor[B, C] (or [B, S*S, C]) float32 on the device; with `sparse`, SparseTargets
            with rows [B] (or [B, S*S]).
        """
        with self.timer:
            targets = self._targets(boxes, flip, rows)
            if vflip is not None and self.output_size > 1 and self.label_mode.startswith(
                    "localized"):
                targets = _flip_token_rows(targets, _transfer.to_device(vflip, self.device),
                                           self.output_size)
            return targets

    def _targets(self, boxes: torch.Tensor, flip: torch.Tensor,
                 rows: torch.Tensor) -> Union[torch.Tensor, SparseTargets]:
        num_classes, size = self.store.num_classes, self.output_size
        if self.label_mode == "original":  # every label was checked at start
            labels = self._labels[_transfer.to_device(rows, self.device)]
            if self.sparse:
                ones = torch.ones(len(labels), 1, device=self.device)
                return self._per_token(SparseTargets(
                    torch.zeros(len(labels), device=self.device),
                    labels[:, None].to(class_dtype(num_classes)), ones, num_classes))
            return self._per_token(torch.nn.functional.one_hot(labels, num_classes).float())
        if self.label_mode.startswith("global"):
            # No localization: one whole-image target, the same for every token.
            boxes, size = self._whole_image.expand(len(rows), 4), 1
        else:
            boxes = _transfer.to_device(boxes, self.device)
        mode = "softmax" if self.label_mode.endswith("multi") else "argmax"
        flip = _transfer.to_device(flip, self.device)
        if self.fused_gather:
            values, indices = self.store.values, self.store.indices
            sample_index = _transfer.to_device(rows, self.device)
        else:
            values, indices = (self._host_gather(data, rows)
                               for data in (self.store.values, self.store.indices))
            sample_index = None
        # Class ids and values were checked at start and the boxes come from the plan: skip
        # the data checks, which would cost a host sync on a GPU.
        pool = sparse_label_pooling if self.sparse else label_pooling
        targets = pool(values, indices, boxes, num_classes=num_classes, output_size=size,
                       flip=flip, sample_index=sample_index, mode=mode, check_inputs=False)
        return targets if size == self.output_size else self._per_token(targets)

    def _per_token(self, targets: Union[torch.Tensor, SparseTargets]
                   ) -> Union[torch.Tensor, SparseTargets]:
        """[B, C] targets as the loader's output shape: every token gets the same one."""
        if self.output_size == 1:
            return targets
        tokens = self.output_size ** 2
        if isinstance(targets, SparseTargets):  # expanded views: no copy per token
            return SparseTargets(targets.fill[:, None].expand(-1, tokens),
                                 targets.classes[:, None].expand(-1, tokens, -1),
                                 targets.probs[:, None].expand(-1, tokens, -1),
                                 targets.num_classes)
        return targets[:, None, :].expand(-1, tokens, -1).contiguous()

    def _host_gather(self, data: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pinned = self.device.type == "cuda"
        out = torch.empty((len(rows), *data.shape[1:]), dtype=data.dtype, pin_memory=pinned)
        torch.index_select(data, 0, rows, out=out)
        return _transfer.to_device(out, self.device)

    def labels(self, rows: torch.Tensor) -> torch.Tensor:
        """The original labels of store rows `rows` (Tensor[B] int64 on the device)."""
        return self._labels[_transfer.to_device(rows, self.device)]
