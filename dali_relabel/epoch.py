"""The DALI side of the training loader: a pipeline per epoch that decodes what the plan says.

``PlannedDecoder`` builds each epoch's pipeline with the epoch's files, in plan order, in a
DALI file reader, which reads them ahead in its own thread, and the planned windows, flips,
rows and augmentation parameters in an external source. Epochs follow one another without a
pause: a few batches before an epoch ends, the next epoch is planned and its pipeline starts
decoding, so the training loop finds its first batches ready. An epoch other than the next
(``set_epoch`` elsewhere, a resumed position, an epoch left early) starts from a new
pipeline. Until one whole epoch (not a resumed one) has run to its end, the graph also
reports every image's size, checked against the plan's; later pipelines leave out that
operator and output, which cost throughput. When DALI fails, it knows which files the
batches in flight hold, finds the culprits and names them.
"""
from __future__ import annotations

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
    """An epoch pipeline's external sources: batch i of the plan, StopIteration at its end.

    A short last batch (drop_last=False) is padded with its last sample to a whole batch, as
    the file reader pads it; the decoder drops the padding.
    """

    def __init__(self, inputs: EpochInputs, graph_names: list[str]) -> None:
        self._plan, self._draws = inputs
        self._graph_names = graph_names

    def _samples(self, iteration: int) -> np.ndarray:
        plan = self._plan
        if iteration >= len(plan):
            raise StopIteration
        samples = plan.batch(iteration)
        index = np.arange(samples.start, samples.start + plan.batch_size)
        return np.minimum(index, samples.stop - 1)

    def plan_batch(self, iteration: int) -> tuple[np.ndarray, ...]:
        """Anchors (y, x), shapes (h, w), flips and rows of batch `iteration`."""
        samples = self._samples(iteration)
        windows = self._plan.windows[samples]
        return (np.ascontiguousarray(windows[:, :2]), np.ascontiguousarray(windows[:, 2:]),
                self._plan.flips[samples].astype(np.int32), self._plan.rows[samples])

    def graph_batch(self, iteration: int) -> tuple[np.ndarray, ...]:
        """The planned augmentation parameters the graph takes, for batch `iteration`."""
        samples = self._samples(iteration)
        return tuple(np.ascontiguousarray(self._draws[name][samples])
                     for name in self._graph_names)


class PlannedDecoder:
    """Decodes epoch plans, one DALI pipeline per epoch, the next started ahead.

    Args:
        image_root: The folder the store's paths are relative to.
        labelmaps: The label-map file's path, for messages.
        paths: The store's /paths (indexed by row).
        sizes (ndarray[N, 2]): The sizes the plans are made with, by row.
        check_sizes: Compare every decoded image's size with the planned one until a whole
            epoch has run to its end (every image this rank decoded in it has been checked).
        following: ``following(epoch)`` plans epoch `epoch` whole: its pipeline starts
            while the loop takes the previous epoch's last batches.
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
        self._following = following
        self._pipeline_args = pipeline_args
        self._prefetch = pipeline_args.get("prefetch_queue_depth", 2)
        augment = pipeline_args.get("augment")
        self._graph_names = list(augment.graph_inputs) if augment is not None else []
        # The next epoch, planned, and its pipeline, started.
        self._upcoming: tuple[EpochInputs, DALIGenericIterator] | None = None

    @property
    def checking_sizes(self) -> bool:
        """Whether the pipelines still report the decoded sizes for the check."""
        return self._check_sizes

    def ahead(self, epoch: int) -> EpochInputs | None:
        """Epoch `epoch` whole, planned, if its pipeline has started."""
        if self._upcoming is not None and self._upcoming[0][0].epoch == epoch:
            return self._upcoming[0]
        return None

    def _open(self, inputs: EpochInputs, check_sizes: bool) -> DALIGenericIterator:
        """Builds and starts the pipeline of `inputs` (its first batches get decoded)."""
        feed = _PlanFeed(inputs, self._graph_names)
        root = self._image_root
        files = [os.path.join(root, self._paths[row]) for row in inputs[0].rows]
        pipe = train_pipeline(
            files, feed.plan_batch, check_sizes=check_sizes,
            augment_source=feed.graph_batch if self._graph_names else None,
            **self._pipeline_args)
        pipe.build()
        outputs = ["images", "rows"] + (["sizes"] if check_sizes else [])
        # The feed ends the epoch (StopIteration), so the pipeline decodes nothing past it.
        return DALIGenericIterator([pipe], outputs, auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.PARTIAL,
                                   prepare_first_batch=True)

    def run(self, inputs: EpochInputs) -> Iterator[tuple[torch.Tensor, slice]]:
        """Yields (images as DALI made them, the plan's samples of that batch) for every
        batch of the plan in `inputs`."""
        plan = inputs[0]
        upcoming, self._upcoming = self._upcoming, None
        batches, started, tried = 0, None, False
        try:
            if upcoming is not None and upcoming[0][0] is plan:
                iterator = upcoming[1]
            else:
                del upcoming  # another epoch's pipeline: stop it before starting this one
                iterator = self._open(inputs, self._check_sizes)
            while batches < len(plan):
                out = next(iterator)[0]
                samples = plan.batch(batches)
                count = samples.stop - samples.start  # without the padding of a short batch
                rows = out["rows"].view(-1).numpy()[:count]
                assert np.array_equal(rows, plan.rows[samples]), "DALI left the plan"
                if self._check_sizes:
                    self._compare_sizes(out["sizes"][:count, :2].numpy(), rows)
                    if batches + 1 == len(plan) and not plan.skipped:
                        # A whole epoch decoded at the planned sizes: the files are the
                        # ones /sizes describes. The next pipeline leaves out the check.
                        self._check_sizes = False
                batches += 1
                if not tried and len(plan) - batches <= self._prefetch:
                    tried, started = True, self._start_following(plan)
                    self._upcoming = started
                yield out["images"][:count], samples
        except RuntimeError as error:
            raise RuntimeError(self._diagnose(plan, batches, error)) from error
        finally:
            if batches < len(plan) and self._upcoming is started:
                self._upcoming = None  # left early or failed: the next epoch starts anew

    def _start_following(self, plan: EpochPlan
                         ) -> tuple[EpochInputs, DALIGenericIterator] | None:
        """Plans the epoch after `plan` and starts its pipeline, while this one decodes its
        last batches. It leaves out the size check if this whole epoch completes it.

        A failure there belongs to the next epoch: that epoch then starts anew and reports
        it, naming the files.
        """
        inputs = self._following(plan.epoch + 1)
        check = self._check_sizes and bool(plan.skipped)
        try:
            return inputs, self._open(inputs, check)
        except RuntimeError as error:
            logger.debug("epoch %d could not start ahead: %s", plan.epoch + 1, error)
            return None

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
