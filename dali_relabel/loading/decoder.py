"""The DALI side of the training loader: a pipeline per epoch that decodes what the plan says.

``PlannedDecoder`` builds each epoch's pipeline with the epoch's files, in plan order, in a
DALI file reader, which reads them ahead in its own thread, and the planned windows, flips,
rows and augmentation parameters in an external source. A pipeline run decodes one batch, or
with num_crops N the images of N batches. Epochs follow one another without a pause: a few
batches before an epoch ends, a background thread plans the next epoch and builds its
pipeline, and once the last batch is handed out (this epoch's decoding done) lets it decode
its first batches, so the training loop neither builds nor waits at the boundary and the two
epochs' decoding never compete for the CPU threads. An epoch other than the next
(``set_epoch`` elsewhere, a resumed position, an epoch left early) starts from a new pipeline.
Until one whole epoch (not a resumed one) has run to its end, the graph also reports every
image's size, checked against the plan's; later pipelines leave out that operator and output,
which cost throughput. When DALI fails, it knows which files the batches in flight hold, finds
the culprits and names them.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dali_relabel.images.files import read_image_sizes
from dali_relabel.loading.pipeline import train_pipeline
from dali_relabel.loading.plan import EpochPlan

__all__ = ["PlanMismatchError", "PlannedDecoder"]

logger = logging.getLogger(__name__)

_SHOWN = 5


class PlanMismatchError(ValueError):
    """An image's size on disk is not the size its crop window was planned for."""


def batches_per_run(plan: EpochPlan) -> int:
    """The plan's batches one pipeline run decodes: with num_crops N, N batches of B/N
    images each, so that every operator of the graph runs over B images, not B/N (small
    batches cost DALI's CPU operators more per image than the decodes the crops save)."""
    return plan.num_crops


def run_samples(plan: EpochPlan, run: int) -> slice:
    """The plan's samples that pipeline run `run` decodes."""
    first = run * batches_per_run(plan)
    last = min(first + batches_per_run(plan), len(plan)) - 1
    return slice(plan.batch(first).start, plan.batch(last).stop)


class _PlanFeed:
    """An epoch pipeline's external sources: run i of the plan (``batches_per_run`` of its
    batches), StopIteration at its end.

    The graph takes one entry per decoded image (with num_crops N, the N crops of an image
    along a second axis). A short last run is padded with its last image to a whole run, as
    the file reader pads it; the decoder drops the padding.
    """

    def __init__(self, plan: EpochPlan, graph_arrays: Optional[Callable]) -> None:
        self._plan = plan
        self._graph_arrays = graph_arrays

    def _samples(self, iteration: int) -> np.ndarray:
        """The plan's samples of run `iteration`, padded, as [images, crops]."""
        plan = self._plan
        if iteration * batches_per_run(plan) >= len(plan):
            raise StopIteration
        samples = run_samples(plan, iteration)
        index = np.arange(samples.start,
                          samples.start + plan.batch_size * batches_per_run(plan))
        index = np.minimum(index, samples.stop - 1)
        return index.reshape(-1, plan.num_crops)

    def _per_image(self, array: np.ndarray) -> np.ndarray:
        """[images, crops, ...] as the graph takes it: without the crop axis for one crop."""
        return np.ascontiguousarray(array[:, 0] if self._plan.num_crops == 1 else array)

    def plan_batch(self, iteration: int) -> tuple[np.ndarray, ...]:
        """Anchors (y, x), shapes (h, w), flips and rows of run `iteration` (and the
        vertical flips, when the plan has them)."""
        samples = self._samples(iteration)
        windows = self._plan.windows[samples]
        planned = (self._per_image(windows[..., :2]), self._per_image(windows[..., 2:]),
                   self._per_image(self._plan.flips[samples].astype(np.int32)),
                   self._plan.rows[samples[:, 0]])
        if self._plan.vflips is not None:
            planned += (self._per_image(self._plan.vflips[samples].astype(np.int32)),)
        return planned

    def graph_batch(self, iteration: int) -> tuple[np.ndarray, ...]:
        """The planned augmentation parameters the graph takes, for run `iteration`."""
        samples = self._samples(iteration)
        return tuple(self._per_image(array)
                     for array in self._graph_arrays(self._plan.augment[samples]))


class _Upcoming:
    """The next epoch's background start, in two jobs on the one background thread: plan and
    build at once; decode (start the pipeline) once released. Nothing ever waits for a
    release, so an epoch that is never released costs a built pipeline, not a thread."""

    def __init__(self, epoch: int, executor: concurrent.futures.Executor,
                 build: Callable[[], tuple[EpochPlan, Any]],
                 start: Callable[..., DALIGenericIterator]) -> None:
        self.epoch = epoch
        self._executor = executor
        self._built = executor.submit(self._guarded, build)
        self._start = start
        self._started: Optional[concurrent.futures.Future] = None
        self._cancelled = False

    def _guarded(self, job: Callable[[], Any]) -> Any:
        try:
            return job()
        except Exception as error:  # noqa: BLE001 (the epoch starts anew and reports it)
            logger.debug("epoch %d could not start ahead: %s", self.epoch, error)
            return None

    def _decode(self) -> Optional[tuple[EpochPlan, DALIGenericIterator]]:
        built = self._built.result()  # done: the one background thread ran it first
        if built is None or self._cancelled:
            return None
        plan, pipeline = built
        started = self._guarded(lambda: self._start(*pipeline))
        return None if started is None else (plan, started)

    def release(self) -> None:
        """Lets the built pipeline start decoding."""
        if self._started is None:
            self._started = self._executor.submit(self._decode)

    def cancel(self) -> None:
        """Not to be decoded: a release after this starts nothing."""
        self._cancelled = True

    def result(self) -> Optional[tuple[EpochPlan, DALIGenericIterator]]:
        """(plan, started pipeline), or None; a start not released yet is released."""
        self.release()
        return self._started.result()


class PlannedDecoder:
    """Decodes epoch plans, one DALI pipeline per epoch, the next started ahead.

    Args:
        image_root: The folder the store's paths are relative to.
        labelmaps: The label-map file's path, for messages.
        paths: The store's /paths (indexed by row).
        sizes (ndarray[N, 2]): The sizes the plans are made with, by row.
        check_sizes: Compare every decoded image's size with the planned one until a whole
            epoch has run to its end (every image this rank decoded in it has been checked).
        planner: Plans an epoch whole (``planner.plan(epoch)``): the next epoch's pipeline
            starts, on a background thread, while the loop takes this epoch's last batches.
        pipeline_args: The rest of `train_pipeline`'s arguments (batch size, threads,
            augmentations, ...).
    """

    def __init__(self, *, image_root: str, labelmaps: str, paths: list[str], sizes: np.ndarray,
                 check_sizes: bool, planner: Any, **pipeline_args: Any) -> None:
        self._image_root = image_root
        self._labelmaps = labelmaps
        self._paths = paths
        self._sizes = sizes
        self._check_sizes = check_sizes  # cleared when a whole epoch ends, every size checked
        self._planner = planner
        self._pipeline_args = pipeline_args
        self._prefetch = pipeline_args.get("prefetch_queue_depth", 2)
        augment = pipeline_args.get("augment")
        self._graph_arrays = augment.graph_arrays if augment is not None else None
        # The next epoch, planned and built in the background, decoding once released.
        self._upcoming: Optional[_Upcoming] = None
        self._starter = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dali-relabel-next-epoch")

    @property
    def checking_sizes(self) -> bool:
        """Whether the pipelines still report the decoded sizes for the check."""
        return self._check_sizes

    def ahead(self, epoch: int) -> Optional[EpochPlan]:
        """Epoch `epoch` whole, planned, if its pipeline has started (waits for the start
        if the background thread is still at it)."""
        if self._upcoming is None or self._upcoming.epoch != epoch:
            return None
        started = self._upcoming.result()
        return None if started is None else started[0]

    def _open(self, plan: EpochPlan, check_sizes: bool) -> DALIGenericIterator:
        """Builds and starts the pipeline of `plan` (its first batches get decoded)."""
        return self._iterate(*self._build(plan, check_sizes))

    def _build(self, plan: EpochPlan, check_sizes: bool) -> tuple[Any, list[str]]:
        """The built pipeline of `plan` and its outputs' names; nothing decoded yet."""
        feed = _PlanFeed(plan, self._graph_arrays)
        root = self._image_root
        files = [os.path.join(root, self._paths[row]) for row in plan.rows[::plan.num_crops]]
        pipe = train_pipeline(
            files, feed.plan_batch, check_sizes=check_sizes, num_crops=plan.num_crops,
            vflip=plan.vflips is not None,
            batch_size=plan.batch_size // plan.num_crops * batches_per_run(plan),
            augment_source=feed.graph_batch if self._graph_arrays is not None else None,
            **self._pipeline_args)
        pipe.build()
        return pipe, ["images", "rows"] + (["sizes"] if check_sizes else [])

    @staticmethod
    def _iterate(pipe: Any, outputs: list[str]) -> DALIGenericIterator:
        """Starts `pipe`: its first batches get decoded."""
        # The feed ends the epoch (StopIteration), so the pipeline decodes nothing past it.
        return DALIGenericIterator([pipe], outputs, auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.PARTIAL,
                                   prepare_first_batch=True)

    def _take_upcoming(self, plan: EpochPlan) -> Optional[DALIGenericIterator]:
        """The started pipeline of `plan`, if any; another epoch's is stopped."""
        upcoming, self._upcoming = self._upcoming, None
        if upcoming is None:
            return None
        if upcoming.epoch != plan.epoch:
            upcoming.cancel()
        started = upcoming.result()  # an abandoned start finishes before the next one
        if started is not None and started[0] is plan:
            return started[1]
        return None

    def run(self, plan: EpochPlan) -> Iterator[tuple[torch.Tensor, slice]]:
        """Yields (images as DALI made them, the plan's samples of that batch) for every
        batch of `plan`."""
        crops = plan.num_crops
        batches, started, runs = 0, None, 0
        try:
            iterator = self._take_upcoming(plan)
            if iterator is None:
                iterator = self._open(plan, self._check_sizes)
            while batches < len(plan):
                out = next(iterator)[0]
                decoded = run_samples(plan, runs)
                runs += 1
                count = decoded.stop - decoded.start  # without the padding of a short run
                rows = out["rows"].view(-1).numpy()[:count // crops]
                assert np.array_equal(rows, plan.rows[decoded][::crops]), "DALI left the plan"
                if self._check_sizes:
                    self._compare_sizes(out["sizes"][:count // crops, :2].numpy(), rows)
                    if decoded.stop == plan.num_samples and not plan.skipped:
                        # A whole epoch decoded at the planned sizes: the files are the
                        # ones /sizes describes. The next pipeline leaves out the check.
                        self._check_sizes = False
                images = out["images"]
                if crops > 1:  # [images, crops, ...]: crops of an image side by side
                    images = images.reshape(-1, *images.shape[2:])
                while batches < len(plan) and plan.batch(batches).start < decoded.stop:
                    samples = plan.batch(batches)
                    batches += 1
                    if started is None and len(plan) - batches <= self._prefetch:
                        started = self._start_following(plan)
                    if batches == len(plan) and started is not None:
                        started.release()  # this epoch's decoding is done: the next begins
                    yield (images[samples.start - decoded.start:samples.stop - decoded.start],
                           samples)
        except RuntimeError as error:
            raise RuntimeError(self._diagnose(plan, batches, error)) from error
        finally:
            if batches < len(plan) and started is not None:
                started.cancel()  # left early or failed: the next epoch starts anew
                if self._upcoming is started:
                    self._upcoming = None

    def _start_following(self, plan: EpochPlan) -> _Upcoming:
        """Starts, on the background thread, planning the epoch after `plan` and building its
        pipeline, while this one decodes its last batches; the pipeline starts decoding when
        released (this epoch's last batch handed out). It leaves out the size check if this
        whole epoch completes it.

        A failure there belongs to the next epoch: that epoch then starts anew and reports
        it, naming the files.
        """
        epoch, check = plan.epoch + 1, self._check_sizes and bool(plan.skipped)

        def build() -> tuple[EpochPlan, Any]:
            following = self._planner.plan(epoch)
            return following, self._build(following, check)

        self._upcoming = _Upcoming(epoch, self._starter, build, self._iterate)
        return self._upcoming

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
        """Why DALI failed, naming files: the runs in flight are the one asked for and up
        to `prefetch` more."""
        first = plan.batch(min(batches, len(plan) - 1)).start
        in_flight = (self._prefetch + 2) * plan.batch_size * batches_per_run(plan)
        rows = np.unique(plan.rows[first:first + in_flight])
        paths = [self._paths[row] for row in rows]
        from dali_relabel.images.verify import verify_images  # DALI decoding, only on failure

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
