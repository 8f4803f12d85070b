"""The DALI side of the training loader: one pipeline that decodes what the plan says.

``PlannedDecoder`` feeds one training graph the epoch plans, batch by batch, through external
sources (file paths, windows, flips, rows and the planned augmentation parameters). Epochs
follow one another as they do from a DALI reader: while the training loop takes an epoch's
last batches, the graph already decodes the next epoch's first ones, planned ahead. An epoch
other than the next (``set_epoch`` elsewhere, a resumed position, an epoch left early) builds
the pipeline anew. Until one whole epoch (not a resumed one) has run to its end, the graph
also reports every image's size, checked against the plan's; then it is built once more
without that operator and output, which cost throughput. When DALI fails, it knows which
files the batches in flight hold, finds the culprits and names them.
"""
from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dali_relabel.image_files import read_image_sizes
from dali_relabel.pipeline import train_pipeline
from dali_relabel.plan import EpochPlan

__all__ = ["EpochInputs", "PlanMismatchError", "PlannedDecoder"]

logger = logging.getLogger(__name__)

_SHOWN = 5

# An epoch's plan and its other planned draws by name (augmentation and mixing parameters,
# one entry per sample of the plan).
EpochInputs = tuple[EpochPlan, dict[str, np.ndarray]]


class PlanMismatchError(ValueError):
    """An image's size on disk is not the size its crop window was planned for."""


class _PlanFeed:
    """The graph's external sources: the batches of consecutive epochs.

    DALI asks for its iteration i; past the end of the last epoch it holds, the feed takes the
    next epoch's plan from `following`, so that decoding runs on into it.

    A batch's paths go to DALI as one uint8 array [n, length] rather than n arrays: DALI
    converts a list one sample at a time in Python, which cost more of the main thread than
    the targets do. Shorter paths are padded with slashes between the image root and the
    relative path, which POSIX reads as one.
    """

    _SLASH = ord("/")

    def __init__(self, image_root: str, paths: list[str], graph_names: list[str],
                 following: Callable[[int], EpochInputs], depth: int) -> None:
        self._root = np.frombuffer(os.path.join(os.path.abspath(image_root), "").encode(),
                                   dtype=np.uint8)
        self._paths = paths
        self._graph_names = graph_names
        self._following = following
        # (first iteration, plan, draws) of the epochs DALI may still ask for or the loop
        # still takes: each has a batch at least, and DALI runs `depth` iterations ahead.
        self._epochs: collections.deque = collections.deque(maxlen=depth + 2)

    def start(self, inputs: EpochInputs) -> None:
        """Iteration 0 (of a new pipeline) is the first batch of `inputs`."""
        self._epochs.clear()
        self._epochs.append((0, *inputs))

    def after(self, plan: EpochPlan) -> EpochInputs | None:
        """The epoch that follows `plan`, if DALI has asked for it yet."""
        epochs = list(self._epochs)
        for (_, held, _), (_, *upcoming) in zip(epochs, epochs[1:]):
            if held is plan:
                return tuple(upcoming)
        return None

    def _locate(self, iteration: int) -> tuple[EpochPlan, dict[str, np.ndarray], int]:
        first, plan, draws = self._epochs[-1]
        while iteration >= first + len(plan):
            first += len(plan)
            plan, draws = self._following(plan.epoch + 1)
            self._epochs.append((first, plan, draws))
        for first, plan, draws in reversed(self._epochs):
            if iteration >= first:
                return plan, draws, iteration - first
        raise AssertionError(f"DALI asked for iteration {iteration}, which the feed dropped")

    def paths(self, rows: np.ndarray) -> np.ndarray:
        """The files of `rows` as padded uint8 [n, length] absolute paths."""
        names = [self._paths[row].encode() for row in rows]
        lengths = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
        root, longest = len(self._root), int(lengths.max())
        files = np.full((len(names), root + longest), self._SLASH, dtype=np.uint8)
        files[:, :root] = self._root
        # Each name ends its row; a boolean mask fills row by row, in the order of the join.
        ends = np.arange(longest) >= (longest - lengths)[:, None]
        files[:, root:][ends] = np.frombuffer(b"".join(names), dtype=np.uint8)
        return files

    def plan_batch(self, iteration: int) -> tuple[np.ndarray, ...]:
        """Files, anchors (y, x), shapes (h, w), flips and rows of DALI's `iteration`."""
        plan, _, batch = self._locate(iteration)
        samples = plan.batch(batch)
        rows = plan.rows[samples]
        windows = plan.windows[samples]
        return (self.paths(rows), np.ascontiguousarray(windows[:, :2]),
                np.ascontiguousarray(windows[:, 2:]), plan.flips[samples].astype(np.int32),
                rows)

    def graph_batch(self, iteration: int) -> tuple[np.ndarray, ...]:
        """The planned augmentation parameters the graph takes, for DALI's `iteration`."""
        plan, draws, batch = self._locate(iteration)
        samples = plan.batch(batch)
        return tuple(np.ascontiguousarray(draws[name][samples]) for name in self._graph_names)


class PlannedDecoder:
    """Decodes epoch plans with one DALI pipeline.

    Args:
        image_root: The folder the store's paths are relative to.
        labelmaps: The label-map file's path, for messages.
        paths: The store's /paths (indexed by row).
        sizes (ndarray[N, 2]): The sizes the plans are made with, by row.
        check_sizes: Compare every decoded image's size with the planned one until a whole
            epoch has run to its end (every image this rank decoded in it has been checked).
        following: ``following(epoch)`` plans epoch `epoch` whole: the graph decodes its
            first batches while the loop takes the previous epoch's last ones.
        pipeline_args: The rest of `train_pipeline`'s arguments (batch size, threads,
            augmentations, ...).
    """

    def __init__(self, *, image_root: str, labelmaps: str, paths: list[str], sizes: np.ndarray,
                 check_sizes: bool, following: Callable[[int], EpochInputs],
                 **pipeline_args: Any) -> None:
        self._image_root = image_root
        self._labelmaps = labelmaps
        self._paths = paths
        self._sizes = sizes
        self._check_sizes = check_sizes  # cleared when a whole epoch ends, every size checked
        self._prefetch = pipeline_args.get("prefetch_queue_depth", 2)
        augment = pipeline_args.get("augment")
        graph_names = list(augment.graph_inputs) if augment is not None else []
        self._feed = _PlanFeed(image_root, paths, graph_names, following, self._prefetch)
        self._pipeline_args = dict(
            pipeline_args, augment_source=self._feed.graph_batch if graph_names else None)
        self._iterator: DALIGenericIterator | None = None
        # The epoch the graph decodes after the last one taken whole, if it does.
        self._upcoming: EpochInputs | None = None

    @property
    def checking_sizes(self) -> bool:
        """Whether the graph still reports the decoded sizes for the check."""
        return self._check_sizes

    def ahead(self, epoch: int) -> EpochInputs | None:
        """Epoch `epoch` whole, planned, if the graph already decodes it."""
        if self._upcoming is not None and self._upcoming[0].epoch == epoch:
            return self._upcoming
        return None

    def _start(self, inputs: EpochInputs) -> None:
        upcoming, self._upcoming = self._upcoming, None
        if self._iterator is not None and upcoming is not None and upcoming[0] is inputs[0]:
            return
        # Not the epoch the graph runs on into (or none yet): build the pipeline anew.
        self._iterator = None
        self._feed.start(inputs)
        pipe = train_pipeline(self._feed.plan_batch, check_sizes=self._check_sizes,
                              **self._pipeline_args)
        pipe.build()
        outputs = ["images", "rows"] + (["sizes"] if self._check_sizes else [])
        # The feed never ends; run() takes each epoch's batches. PARTIAL passes a short last
        # batch (drop_last=False) through as it is.
        self._iterator = DALIGenericIterator([pipe], outputs, auto_reset=False,
                                             last_batch_policy=LastBatchPolicy.PARTIAL,
                                             prepare_first_batch=False)

    def run(self, inputs: EpochInputs) -> Iterator[tuple[torch.Tensor, slice]]:
        """Yields (images as DALI made them, the plan's samples of that batch) for every
        batch of the plan in `inputs`."""
        plan = inputs[0]
        batches = 0
        try:
            self._start(inputs)
            while batches < len(plan):
                out = next(self._iterator)[0]
                samples = plan.batch(batches)
                rows = out["rows"].view(-1).numpy()
                assert np.array_equal(rows, plan.rows[samples]), "DALI left the plan"
                if self._check_sizes:
                    self._compare_sizes(out["sizes"][:, :2].numpy(), rows)
                batches += 1
                yield out["images"], samples
        except RuntimeError as error:
            self._iterator = None
            raise RuntimeError(self._diagnose(plan, batches, error)) from error
        self._upcoming = self._feed.after(plan)
        if self._check_sizes and not plan.skipped:
            # A whole epoch decoded at the planned sizes: the files are the ones /sizes
            # describes. The next epoch builds the graph without the check.
            self._check_sizes = False
            self._iterator = None

    def _compare_sizes(self, decoded: np.ndarray, rows: np.ndarray) -> None:
        wrong = np.flatnonzero((decoded != self._sizes[rows]).any(axis=1))
        if wrong.size:
            self._iterator = None
            listing = ", ".join(f"{self._paths[rows[i]]} (decodes as {decoded[i].tolist()}, "
                                f"planned {self._sizes[rows[i]].tolist()})"
                                for i in wrong[:_SHOWN])
            raise PlanMismatchError(self._stale_sizes_message(listing))

    def _stale_sizes_message(self, listing: str) -> str:
        return (f"images under {self._image_root!r} are not the size the label-map file "
                f"records (height, width): {listing}. Is this a resized copy of the data set? "
                f"Run `dali-relabel index {self._labelmaps} --images {self._image_root}` to "
                "record their sizes (the label maps stay valid: boxes are relative).")

    def _diagnose(self, plan: EpochPlan, batches: int, error: RuntimeError) -> str:
        """Why DALI failed, naming files: the batches in flight are the one asked for and up
        to `prefetch` more."""
        first = batches * plan.batch_size
        rows = np.unique(plan.rows[first:first + (self._prefetch + 2) * plan.batch_size])
        paths = [self._paths[row] for row in rows]
        from dali_relabel.verify import verify_images  # DALI decoding, only on failure

        bad = verify_images(self._image_root, paths, num_threads=1, progress=False)
        if bad:
            listing = "; ".join(f"{path}: {reason}" for path, reason in bad[:_SHOWN])
            return (f"{len(bad)} image(s) failed to decode: {listing}. Find every such file "
                    f"with `dali-relabel verify {self._image_root} --labelmaps "
                    f"{self._labelmaps}` and pass the list as exclude=.")
        found = read_image_sizes(self._image_root, paths, progress=False)
        wrong = np.flatnonzero((found != self._sizes[rows]).any(axis=1))
        if wrong.size:
            return self._stale_sizes_message(", ".join(
                f"{paths[i]} (is {found[i].tolist()}, planned {self._sizes[rows[i]].tolist()})"
                for i in wrong[:_SHOWN]))
        return (f"the DALI pipeline failed: {error}\nEvery image of the batches in flight "
                "decodes on its own and has the planned size.")
