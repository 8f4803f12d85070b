"""One epoch of the training loader: a DALI pipeline that decodes what the plan says.

``EpochRun`` builds the training graph over the plan's files, feeds it the planned windows
and flips batch by batch, and yields DALI's image batches with the plan's slice for them.
When DALI fails, it knows which files the failing batch held, finds the culprits and names
them.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dali_relabel.image_files import read_image_sizes
from dali_relabel.pipeline import READER_NAME, train_pipeline
from dali_relabel.plan import EpochPlan

__all__ = ["EpochRun", "PlanMismatchError"]

logger = logging.getLogger(__name__)

_SHOWN = 5


class PlanMismatchError(ValueError):
    """An image's size on disk is not the size its crop window was planned for."""


class _PlanFeed:
    """The external source of the graph: batch i's anchors, shapes and flips.

    The reader pads the last batch with its last sample and then wraps around to the first
    batch while DALI prefetches, so batch i of the reader is batch i mod len(plan) here.
    """

    def __init__(self, plan: EpochPlan) -> None:
        self._plan = plan
        self._anchors = np.ascontiguousarray(plan.windows[:, :2])
        self._shapes = np.ascontiguousarray(plan.windows[:, 2:])
        self._flips = plan.flips.astype(np.int32)

    def __call__(self, iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        samples = self._plan.batch(iteration % len(self._plan))
        anchors, shapes, flips = (data[samples]
                                  for data in (self._anchors, self._shapes, self._flips))
        missing = self._plan.batch_size - len(flips)
        if missing:
            anchors, shapes, flips = (np.concatenate([data, np.repeat(data[-1:], missing, 0)])
                                      for data in (anchors, shapes, flips))
        return anchors, shapes, flips


class EpochRun:
    """Decodes one (possibly resumed) epoch plan with DALI.

    Args:
        plan: What to read, in order.
        image_root: The folder the store's paths are relative to.
        labelmaps: The label-map file's path, for messages.
        paths: The store's /paths (indexed by row).
        sizes (ndarray[N, 2]): The sizes the plan was made with, by row.
        drop_last: Whether the plan holds full batches only.
        check_sizes: Compare every decoded image's size with the planned one.
        pipeline_args: The rest of `train_pipeline`'s arguments.
    """

    def __init__(self, plan: EpochPlan, *, image_root: str, labelmaps: str, paths: list[str],
                 sizes: np.ndarray, drop_last: bool, check_sizes: bool,
                 **pipeline_args: Any) -> None:
        self.plan = plan
        self._image_root = image_root
        self._labelmaps = labelmaps
        self._paths = paths
        self._sizes = sizes
        self._check_sizes = check_sizes
        self._prefetch = pipeline_args.get("prefetch_queue_depth", 2)
        files = [os.path.join(image_root, paths[row]) for row in plan.rows]
        pipe = train_pipeline(files, plan.rows.tolist(), _PlanFeed(plan),
                              check_sizes=check_sizes, **pipeline_args)
        pipe.build()
        outputs = ["images", "rows"] + (["sizes"] if check_sizes else [])
        # DROP: the plan holds full batches only; PARTIAL: the reader's padding of the last
        # batch is trimmed, so the shards together yield every sample exactly once.
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        self._batches = 0
        self._iterator = self._guard(lambda: DALIGenericIterator(
            [pipe], outputs, reader_name=READER_NAME, last_batch_policy=policy,
            auto_reset=False))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, slice]]:
        """Yields (images as DALI made them, the plan's samples of that batch)."""
        while True:
            try:
                out = self._guard(lambda: next(self._iterator))[0]
            except StopIteration:
                return
            samples = self.plan.batch(self._batches)
            rows = out["rows"].view(-1).numpy()
            assert np.array_equal(rows, self.plan.rows[samples]), "reader left the plan"
            if self._check_sizes:
                self._compare_sizes(out["sizes"][:, :2].numpy(), self.plan.rows[samples])
            self._batches += 1
            yield out["images"], samples

    def _compare_sizes(self, decoded: np.ndarray, rows: np.ndarray) -> None:
        wrong = np.flatnonzero((decoded != self._sizes[rows]).any(axis=1))
        if wrong.size:
            listing = ", ".join(f"{self._paths[rows[i]]} (decodes as {decoded[i].tolist()}, "
                                f"planned {self._sizes[rows[i]].tolist()})"
                                for i in wrong[:_SHOWN])
            raise PlanMismatchError(self._stale_sizes_message(listing))

    def _stale_sizes_message(self, listing: str) -> str:
        return (f"images under {self._image_root!r} are not the size the label-map file "
                f"records (height, width): {listing}. Is this a resized copy of the data set? "
                f"Run `dali-relabel index {self._labelmaps} --images {self._image_root}` to "
                "record their sizes (the label maps stay valid: boxes are relative).")

    def _guard(self, call):
        """Runs a DALI call; a failure names the bad files of the batches in flight."""
        try:
            return call()
        except RuntimeError as error:
            raise RuntimeError(self._diagnose(error)) from error

    def _diagnose(self, error: RuntimeError) -> str:
        # DALI runs up to `prefetch` batches ahead of the one being asked for.
        first = self._batches * self.plan.batch_size
        stop = first + (self._prefetch + 2) * self.plan.batch_size
        rows = np.unique(self.plan.rows[first:stop])
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

