"""Drop-in training and validation loaders: DALI images plus ReLabel targets.

``ReLabelLoader`` replaces ``torch.utils.data.DataLoader`` for ReLabel training (Yun et al.,
"Re-labeling ImageNet", CVPR 2021): DALI decodes the crop window of each JPEG and reports
its box, and LabelPooling turns the box and the image's label map into the crop's soft target.
Every epoch is a true global shuffle of the whole file list, seeded by (seed, epoch) and
identical on every rank, each rank reading its own disjoint slice; ``state_dict`` resumes
inside an epoch with the same remaining samples, crops and flips (DALI checkpointing).

``ValLoader`` is the matching evaluation loader over an ImageFolder tree.
"""
import dataclasses
import logging
import os
import time
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import nvidia.dali.types as types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dali_relabel.ops import label_pooling
from dali_relabel.pipeline import (IMAGENET_MEAN, IMAGENET_STD, READER_NAME, train_pipeline,
                                   val_pipeline)
from dali_relabel.store import LabelMapStore, read_header

__all__ = ["LABEL_MODES", "IMAGE_EXTENSIONS", "ReLabelBatch", "ReLabelLoader", "ValLoader",
           "find_images", "read_path_list"]

logger = logging.getLogger(__name__)

LABEL_MODES = ("localized_multi", "localized_single", "global_multi", "global_single",
               "original")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Put the whole store on the GPU when it takes at most this share of the GPU's memory.
DEVICE_STORE_FRACTION = 0.2
_SHOWN_PATHS = 5
_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class ReLabelBatch:
    """One training batch with what produced its targets (``return_meta=True``).

    Attributes:
        images (Tensor[B, 3, S, S]): normalized images on the loader's device.
        targets (Tensor[B, C] or Tensor[B, S*S, C]): float32 targets on the device.
        labels (Tensor[B]): original single labels (-1 if unknown).
        boxes (Tensor[B, 4]): crop boxes (x1, y1, x2, y2), normalized to the image.
        flip (Tensor[B]): bool, whether the crop was mirrored horizontally.
        sample_index (Tensor[B]): int64 rows of the label-map store (and of its /paths).
    """

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    flip: torch.Tensor
    sample_index: torch.Tensor


def read_path_list(exclude: Union[None, str, os.PathLike, Sequence[str]]) -> List[str]:
    """Relative image paths from a list file (one per line, '#' comments) or a sequence."""
    if exclude is None:
        return []
    if isinstance(exclude, (str, os.PathLike)):
        with open(exclude, encoding="utf-8") as f:
            lines = (line.split("#", 1)[0].strip() for line in f)
            return [line for line in lines if line]
    return [str(path) for path in exclude]


def find_images(image_root: str) -> Tuple[List[str], List[str]]:
    """Image files of an ImageFolder tree: (relative paths, class names), both sorted.

    Paths are '/' separated and ordered by class folder, then file name, as torchvision's
    ImageFolder orders them.
    """
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(image_root) if entry.is_dir())
    paths = []
    for name in classes:
        for folder, _, files in sorted(os.walk(os.path.join(image_root, name))):
            relative = os.path.relpath(folder, image_root).replace(os.sep, "/")
            paths.extend(f"{relative}/{file}" for file in sorted(files)
                         if file.lower().endswith(IMAGE_EXTENSIONS))
    return paths, classes


def _check_files_exist(image_root: str, paths: Sequence[str], source: str) -> None:
    """One listing per directory; raises naming the count and the first missing paths."""
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    by_folder: Dict[str, List[str]] = defaultdict(list)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].append(name)
    missing = []
    for folder, names in by_folder.items():
        try:
            present = set(os.listdir(os.path.join(image_root, folder)))
        except FileNotFoundError:
            present = set()
        missing.extend(f"{folder}/{name}" if folder else name
                       for name in names if name not in present)
    if missing:
        hint = (" (no listed image exists: is image_root the folder the store's /paths are "
                "relative to?)" if len(missing) == len(paths) else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing under "
            f"{image_root!r}{hint}; first: {', '.join(missing[:_SHOWN_PATHS])}. Pass "
            "exclude= to train without them.")


def _shard(shard_id: Optional[int], num_shards: Optional[int]) -> Tuple[int, int]:
    """(shard_id, num_shards), defaulting to torch.distributed's global rank and world size."""
    if (shard_id is None) != (num_shards is None):
        raise ValueError("shard_id and num_shards must be given together (or neither)")
    if shard_id is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must lie in [0, num_shards={num_shards}), got {shard_id}")
    return shard_id, num_shards


def _default_threads() -> int:
    """The CPU threads of this process's share of the machine (torchrun's local processes)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world))


def _resolve_device(device: Union[str, torch.device]) -> Tuple[torch.device, Optional[int]]:
    """The torch device and DALI's device_id (None runs DALI on the CPU only)."""
    device = torch.device(device)
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        raise ValueError(f"device must be 'cuda' or 'cpu', got {str(device)!r}")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available; pass device='cpu'")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index), index


def _dali_image_dtype(dtype: torch.dtype):
    if dtype not in _IMAGE_DTYPES:
        raise ValueError(f"dtype must be one of {_IMAGE_DTYPES}, got {dtype}")
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def _finish_images(images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                   channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if channels_last:  # DALI wrote NHWC; this view is NCHW in channels_last memory format
        images = images.permute(0, 3, 1, 2)
    return images if images.dtype == dtype else images.to(dtype)


class _Timer:
    """Accumulated time of a code block: wall clock on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._ms = 0.0
        self._events: List[Tuple[Any, Any]] = []

    def __enter__(self) -> None:
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._ms += (time.perf_counter() - self._start) * 1e3

    def pop_ms(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._ms += sum(start.elapsed_time(end) for start, end in self._events)
            self._events.clear()
        ms, self._ms = self._ms, 0.0
        return ms


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_range(name: str, value: Sequence[float], low: float) -> Tuple[float, float]:
    if len(value) != 2 or not low < value[0] <= value[1]:
        raise ValueError(f"{name} must be (min, max) with {low} < min <= max, got {value!r}")
    return float(value[0]), float(value[1])


class ReLabelLoader:
    """Training loader: random-resized-crop images and their ReLabel targets.

    Iterating yields ``(images, targets)`` on ``device`` (or a :class:`ReLabelBatch` with
    ``return_meta=True``); ``len(loader)`` is the number of batches per epoch of this rank.
    Each ``iter()`` runs the next epoch (an epoch left early counts as done), except after
    ``load_state_dict``, when it finishes the saved epoch; ``set_epoch`` chooses one.
    Example::

        loader = ReLabelLoader("train/", "relabel.h5", 256, device="cuda")
        for epoch in range(epochs):
            for images, targets in loader:
                loss = torch.sum(-targets * model(images).log_softmax(-1), -1).mean()

    Args:
        image_root: Folder the store's /paths are relative to.
        labelmaps: Label-map HDF5 file (DESIGN.md format) or an open LabelMapStore; its
            /paths lists the training images and their order.
        batch_size: Images per batch and rank.
        device: "cuda" (DALI decodes on the GPU, "mixed") or "cpu" (default: "cuda").
        image_size: Side of the output images (default: 224).
        scale: RandomResizedCrop area range (default: (0.08, 1.0)).
        ratio: RandomResizedCrop aspect-ratio range (default: (3/4, 4/3)).
        hflip: Probability of a horizontal flip (default: 0.5).
        label_mode: "localized_multi" (ReLabel), "localized_single" (argmax),
            "global_multi" (whole-image box), "global_single" or "original" (one-hot of the
            original label): the rows of the paper's factor analysis (default:
            "localized_multi").
        output_size: S; S > 1 gives token-level targets [B, S*S, C], mirrored with the image
            (default: 1).
        num_classes: The model's number of classes; checked against the store when given.
        seed: Base seed. The shuffle of an epoch is seeded by (seed, epoch), the same on
            every rank; crops and flips by (seed, rank, epoch), so ranks and epochs differ
            and the same seed gives the same batches again (default: 0).
        shuffle: Globally reshuffle every epoch (default: True).
        shard_id: This rank's shard (default: torch.distributed's global rank, else 0).
        num_shards: Number of shards (default: torch.distributed's world size, else 1).
        drop_last: True: every rank yields the same number of full batches. False: the
            shards together yield every sample exactly once; ranks may then differ by one
            batch (default: True).
        num_threads: DALI CPU threads (default: this process's share of the CPUs).
        prefetch: Batches DALI prepares ahead (default: 2).
        dtype: Image dtype: float32, float16 or bfloat16 (default: float32).
        channels_last: Return images in channels_last memory format (default: False).
        mean: Per-channel mean, 0-255 scale (default: ImageNet's).
        std: Per-channel std, 0-255 scale (default: ImageNet's).
        adjust_orientation: Apply EXIF orientation; off, as PIL/torchvision pipelines and
            therefore the official label maps ignore it (default: False).
        exclude: Relative paths (or a file listing them, e.g. from `dali-relabel verify`) to
            leave out.
        labelmaps_placement: Store placement; default: "device" on CUDA when the store
            takes at most 20% of the GPU's memory (fused gather), else "mmap".
        fused_gather: Pool straight from the whole store by row (default: when the store
            is on `device`); otherwise the batch's rows are gathered on the host into pinned
            memory and copied.
        return_meta: Yield ReLabelBatch objects (default: False).
    """

    def __init__(
        self,
        image_root: str,
        labelmaps: Union[str, os.PathLike, LabelMapStore],
        batch_size: int,
        *,
        device: Union[str, torch.device] = "cuda",
        image_size: int = 224,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        label_mode: str = "localized_multi",
        output_size: int = 1,
        num_classes: Optional[int] = None,
        seed: int = 0,
        shuffle: bool = True,
        shard_id: Optional[int] = None,
        num_shards: Optional[int] = None,
        drop_last: bool = True,
        num_threads: Optional[int] = None,
        prefetch: int = 2,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        adjust_orientation: bool = False,
        exclude: Union[None, str, os.PathLike, Sequence[str]] = None,
        labelmaps_placement: Optional[str] = None,
        fused_gather: Optional[bool] = None,
        return_meta: bool = False,
    ) -> None:
        _check_size("batch_size", batch_size)
        _check_size("image_size", image_size)
        _check_size("output_size", output_size)
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        self.scale = _check_range("scale", scale, 0.0)
        self.ratio = _check_range("ratio", ratio, 0.0)
        if self.scale[1] > 1.0:
            raise ValueError(f"scale must lie within (0, 1], got {scale!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.device, self._device_id = _resolve_device(device)
        self._dali_dtype = _dali_image_dtype(dtype)
        self.shard_id, self.num_shards = _shard(shard_id, num_shards)

        self.store = self._open_store(labelmaps, labelmaps_placement)
        if num_classes is not None and num_classes != self.store.num_classes:
            raise ValueError(
                f"num_classes={num_classes} (the model's) but {self.store.path} has "
                f"{self.store.num_classes} classes")
        self.image_root = os.fspath(image_root)
        excluded = set(read_path_list(exclude))
        keep = np.array([path not in excluded for path in self.store.paths], dtype=bool)
        self._rows = np.flatnonzero(keep).astype(np.int64)
        if excluded:
            unmatched = len(excluded) - (len(self.store) - len(self._rows))
            logger.info("excluding %d of %d images", len(self.store) - len(self._rows),
                        len(self.store))
            if unmatched:
                warnings.warn(f"{unmatched} of the {len(excluded)} excluded paths are not "
                              f"listed in {self.store.path}; they were ignored")
        _check_files_exist(self.image_root, [self.store.paths[row] for row in self._rows],
                           self.store.path)
        self._check_class_range()

        self.batch_size = batch_size
        self.image_size = image_size
        self.hflip = hflip
        self.label_mode = label_mode
        self.output_size = output_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_threads = num_threads or _default_threads()
        self.prefetch = prefetch
        self.dtype = dtype
        self.channels_last = channels_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.adjust_orientation = adjust_orientation
        self.return_meta = return_meta
        if len(self) == 0:
            raise ValueError(
                f"batch_size={batch_size} leaves no {'full ' if drop_last else ''}batch: "
                f"{len(self._rows)} images over {self.num_shards} shards")
        if not drop_last and self.num_shards > 1:
            warnings.warn("drop_last=False: ranks may yield different numbers of batches, "
                          "which stalls DDP's gradient all-reduce; use it for evaluation-like "
                          "passes, drop_last=True for training")

        if fused_gather is None:
            fused_gather = self.store.values.device == self.device
        elif fused_gather and self.store.values.device != self.device:
            raise ValueError(f"fused_gather=True needs the store on {self.device}; it is on "
                             f"{self.store.values.device} (labelmaps_placement='device')")
        self._fused = fused_gather
        self._labels = self.store.labels.to(self.device)
        self._whole_image = torch.tensor([0.0, 0.0, 1.0, 1.0], device=self.device)
        self._epoch = 0
        self._batches_done = 0
        self._iterator: Optional[DALIGenericIterator] = None
        self._pending_checkpoint: Optional[str] = None
        self._label_pooling_timer = _Timer(self.device)

    def _open_store(self, labelmaps, placement: Optional[str]) -> LabelMapStore:
        if isinstance(labelmaps, LabelMapStore):
            return labelmaps
        if placement is None:
            placement = "mmap"
            if self.device.type == "cuda":
                header = read_header(labelmaps)
                store_bytes = sum(layout.nbytes for layout in header.layout.values())
                total = torch.cuda.get_device_properties(self.device).total_memory
                if store_bytes <= DEVICE_STORE_FRACTION * total:
                    placement = "device"
        device = self.device if placement == "device" else None
        return LabelMapStore.open(labelmaps, placement=placement, device=device)

    def _check_class_range(self) -> None:
        """The kernels run with check_inputs=False, so check the store's classes once.

        Opening a store checks its metadata; this reads /indices once (memory-mapped: a few
        seconds for ImageNet, from the page cache every rank of the node shares).
        """
        indices = self.store.indices.view(-1)
        chunk = 1 << 26
        low, high = 0, 0
        for start in range(0, indices.numel(), chunk):
            part_low, part_high = torch.aminmax(indices[start:start + chunk])
            low, high = min(low, int(part_low)), max(high, int(part_high))
        if low < 0 or high >= self.store.num_classes:
            raise ValueError(
                f"{self.store.path}: dataset '/indices' holds class ids in [{low}, {high}], "
                f"expected [0, {self.store.num_classes}); run `dali-relabel info "
                f"{self.store.path} --full` to find the rows")

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) iteration runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Run `epoch` next, as DistributedSampler.set_epoch does.

        Setting the epoch a resumed loader is in keeps its position (so the usual
        ``load_state_dict`` then ``set_epoch`` loop neither repeats nor skips samples).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch == self._epoch and self._pending_checkpoint is not None:
            return
        self._epoch, self._batches_done = epoch, 0
        self._iterator, self._pending_checkpoint = None, None

    def _shard_size(self) -> int:
        total = len(self._rows)
        if self.drop_last:
            return (total // self.num_shards) // self.batch_size * self.batch_size
        return len(range(self.shard_id, total, self.num_shards))

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Store rows this rank reads in `epoch`, in order: its slice of the global shuffle."""
        total = len(self._rows)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(total)
        else:
            order = np.arange(total)
        return self._rows[order[self.shard_id::self.num_shards][:self._shard_size()]]

    def _pipeline_seed(self, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.shard_id, epoch]).generate_state(1)[0]
                   & 0x7FFFFFFF)

    def _start_epoch(self) -> DALIGenericIterator:
        rows = self.epoch_order(self._epoch)
        files = [os.path.join(self.image_root, self.store.paths[row]) for row in rows]
        pipe = train_pipeline(
            files, rows.tolist(),
            decoder_device="mixed" if self._device_id is not None else "cpu",
            image_size=self.image_size, scale=self.scale, ratio=self.ratio, hflip=self.hflip,
            mean=self.mean, std=self.std, dtype=self._dali_dtype,
            channels_last=self.channels_last, adjust_orientation=self.adjust_orientation,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
            seed=self._pipeline_seed(self._epoch), prefetch_queue_depth=self.prefetch,
            checkpoint=self._pending_checkpoint)
        pipe.build()
        self._pending_checkpoint = None
        # DROP: every rank the same number of full batches (the lists are cut to a multiple
        # of batch_size anyway); PARTIAL: the padding of the last batch is trimmed.
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], ["images", "boxes", "flip", "rows"],
                                   reader_name=READER_NAME, last_batch_policy=policy,
                                   auto_reset=False)

    def __iter__(self) -> Iterator[Union[Tuple[torch.Tensor, torch.Tensor], ReLabelBatch]]:
        if self._iterator is not None:  # the previous iteration stopped early: next epoch
            self._iterator = None
            self._epoch += 1
            self._batches_done = 0
        while True:
            outputs = self._next_outputs()
            if outputs is None:
                break
            self._batches_done += 1
            yield self._batch(outputs[0])
        self._iterator = None
        self._epoch += 1
        self._batches_done = 0

    def _next_outputs(self) -> Optional[List[Dict[str, torch.Tensor]]]:
        """The next batch from DALI (None at the end of the epoch); a decoding error says
        how to find and exclude every bad file."""
        try:
            if self._iterator is None:
                self._iterator = self._start_epoch()
            return next(self._iterator)
        except StopIteration:
            return None
        except RuntimeError as error:
            # The epoch cannot go on; a later iter() or state_dict() restarts it.
            self._iterator = None
            self._batches_done = 0
            raise RuntimeError(
                f"{error}\nThe DALI pipeline failed. If an image failed to decode (DALI names "
                f"it above), find every such file with `dali-relabel verify "
                f"{self.image_root} --labelmaps {self.store.path}` and pass the list as "
                "exclude=.") from error

    def _batch(self, out: Dict[str, torch.Tensor]):
        rows = out["rows"].view(-1).to(torch.int64)
        flip = out["flip"].view(-1).to(torch.bool)
        boxes = out["boxes"].to(self.device, non_blocking=True)
        images = _finish_images(out["images"], self.device, self.dtype, self.channels_last)
        with self._label_pooling_timer:
            targets = self.targets(boxes, flip, rows)
        if not self.return_meta:
            return images, targets
        return ReLabelBatch(images=images, targets=targets, labels=self._labels[
            rows.to(self.device)], boxes=boxes, flip=flip.to(self.device),
            sample_index=rows.to(self.device))

    def targets(self, boxes: torch.Tensor, flip: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """Targets of the loader's label_mode for crops `boxes` of store rows `rows`.

        Args:
            boxes (Tensor[B, 4]): crop boxes (x1, y1, x2, y2), normalized, on the device.
            flip (Tensor[B]): bool, mirrored crops.
            rows (Tensor[B]): int64 store rows, on the CPU.

        Returns:
            Tensor[B, C] (or [B, S*S, C]) float32 on the device.
        """
        num_classes = self.store.num_classes
        if self.label_mode == "original":
            labels = self._labels[rows.to(self.device)]
            if bool((labels < 0).any()):
                bad = rows[(labels < 0).cpu()][:_SHOWN_PATHS].tolist()
                raise ValueError(
                    f"label_mode='original' needs /labels, but {self.store.path} has -1 "
                    f"(unknown) for {[self.store.paths[row] for row in bad]}")
            one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
            if self.output_size == 1:
                return one_hot
            return one_hot[:, None, :].expand(-1, self.output_size ** 2, -1).contiguous()
        output_size = self.output_size
        if self.label_mode.startswith("global"):
            # No localization: one whole-image target, the same for every token.
            boxes = self._whole_image.expand(len(rows), 4)
            output_size = 1
        mode = "softmax" if self.label_mode.endswith("multi") else "argmax"
        flip = flip.to(self.device, non_blocking=True)
        if self._fused:
            values, indices = self.store.values, self.store.indices
            sample_index = rows.to(self.device, non_blocking=True)
        else:  # gather the rows on the host (into pinned memory for a GPU), then copy
            values, indices = (self._host_gather(data, rows)
                               for data in (self.store.values, self.store.indices))
            sample_index = None
        # The class ids were checked at start and DALI made the boxes: skip the data checks,
        # which would cost a host sync on CUDA.
        targets = label_pooling(values, indices, boxes, num_classes=num_classes,
                                output_size=output_size, flip=flip, sample_index=sample_index,
                                mode=mode, check_inputs=False)
        if output_size != self.output_size:
            return targets[:, None, :].expand(-1, self.output_size ** 2, -1).contiguous()
        return targets

    def _host_gather(self, data: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pinned = self.device.type == "cuda"
        out = torch.empty((len(rows), *data.shape[1:]), dtype=data.dtype, pin_memory=pinned)
        torch.index_select(data, 0, rows, out=out)
        return out.to(self.device, non_blocking=True)

    def time_label_pooling(self) -> "_Timer":
        """A context manager that counts its block into label_pooling_ms() (for targets made
        outside the loader, e.g. by CutMix)."""
        return self._label_pooling_timer

    def label_pooling_ms(self) -> float:
        """Milliseconds spent making targets (LabelPooling) since the last call.

        Wall clock on CPU; CUDA events on a GPU, read here (this waits for the last batch's
        targets), so measuring costs no synchronisation per batch.
        """
        return self._label_pooling_timer.pop_ms()

    def state_dict(self) -> Dict[str, Any]:
        """Position in the current epoch; load_state_dict continues right after it."""
        checkpoint = None
        if self._iterator is not None and self._batches_done > 0:
            checkpoint = self._iterator.checkpoints()[0]
        elif self._pending_checkpoint is not None:
            checkpoint = self._pending_checkpoint
        return dict(epoch=self._epoch, batches_done=self._batches_done,
                    dali_checkpoint=checkpoint, **self._identity())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a state_dict; the settings that fix the sample order must match."""
        mismatched = {key: (state.get(key), value) for key, value in self._identity().items()
                      if state.get(key) != value}
        if mismatched:
            listing = ", ".join(f"{key}: saved {saved!r}, now {now!r}"
                                for key, (saved, now) in mismatched.items())
            raise ValueError(f"state_dict was saved by a different loader set-up ({listing})")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._iterator = None
        self._pending_checkpoint = state["dali_checkpoint"]

    def _identity(self) -> Dict[str, Any]:
        return dict(num_samples=len(self._rows), batch_size=self.batch_size, seed=self.seed,
                    shuffle=self.shuffle, shard_id=self.shard_id, num_shards=self.num_shards,
                    drop_last=self.drop_last)


class ValLoader:
    """Validation loader over an ImageFolder tree: resize, centre crop, original labels.

    As torchvision's Resize(resize_size) + CenterCrop(image_size) on PIL images, except that
    the crop offset rounds half up where torchvision rounds half to even (at most one pixel).

    Yields ``(images, labels)`` on ``device``; across shards every image comes exactly once
    (the last batch is partial). Iterate it once per evaluation.

    Args:
        image_root: ImageFolder root (one folder per class).
        batch_size: Images per batch and rank.
        device: "cuda" or "cpu" (default: "cuda").
        image_size: Side of the centre crop (default: 224).
        resize_size: Shorter side after resizing (default: 256).
        classes: Class names in index order (e.g. the training store's /classes); default:
            the sorted folder names. Folders not listed raise a ValueError.
        shard_id: This rank's shard (default: torch.distributed's global rank, else 0).
        num_shards: Number of shards (default: torch.distributed's world size, else 1).
        num_threads: DALI CPU threads (default: this process's share of the CPUs).
        dtype: Image dtype: float32, float16 or bfloat16 (default: float32).
        channels_last: Return images in channels_last memory format (default: False).
        mean: Per-channel mean, 0-255 scale (default: ImageNet's).
        std: Per-channel std, 0-255 scale (default: ImageNet's).
        adjust_orientation: Apply EXIF orientation (default: False, as PIL does).
        exclude: Relative paths (or a list file) to leave out.
    """

    def __init__(
        self,
        image_root: str,
        batch_size: int,
        *,
        device: Union[str, torch.device] = "cuda",
        image_size: int = 224,
        resize_size: int = 256,
        classes: Optional[Sequence[str]] = None,
        shard_id: Optional[int] = None,
        num_shards: Optional[int] = None,
        num_threads: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        adjust_orientation: bool = False,
        exclude: Union[None, str, os.PathLike, Sequence[str]] = None,
    ) -> None:
        _check_size("batch_size", batch_size)
        _check_size("image_size", image_size)
        _check_size("resize_size", resize_size)
        if resize_size < image_size:
            raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}")
        self.device, self._device_id = _resolve_device(device)
        self.shard_id, self.num_shards = _shard(shard_id, num_shards)
        self.image_root = os.fspath(image_root)
        paths, folders = find_images(self.image_root)
        self.classes = list(classes) if classes is not None else folders
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(folders) - set(index))
        if unknown:
            raise ValueError(f"{len(unknown)} class folders of {self.image_root!r} are not in "
                             f"classes: {unknown[:_SHOWN_PATHS]}")
        excluded = set(read_path_list(exclude))
        self.paths = [path for path in paths if path not in excluded]
        if not self.paths:
            raise ValueError(f"no images found under {self.image_root!r}")
        self.labels = [index[path.split("/", 1)[0]] for path in self.paths]
        self.batch_size = batch_size
        self.dtype = dtype
        self.channels_last = channels_last
        self.indices = list(range(self.shard_id, len(self.paths), self.num_shards))
        self._pipeline_args = dict(
            decoder_device="mixed" if self._device_id is not None else "cpu",
            image_size=image_size, resize_size=resize_size, mean=tuple(mean), std=tuple(std),
            dtype=_dali_image_dtype(dtype), channels_last=channels_last,
            adjust_orientation=adjust_orientation, batch_size=batch_size,
            num_threads=num_threads or _default_threads(), device_id=self._device_id, seed=0)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        # A fresh pipeline per pass: an evaluation left early does not shift the next one.
        pipe = val_pipeline([os.path.join(self.image_root, self.paths[i]) for i in self.indices],
                            [self.labels[i] for i in self.indices], **self._pipeline_args)
        pipe.build()
        # PARTIAL: the reader pads the last batch; the padding is trimmed, so across shards
        # every image is evaluated exactly once.
        iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER_NAME,
                                       last_batch_policy=LastBatchPolicy.PARTIAL)
        for outputs in iterator:
            out = outputs[0]
            images = _finish_images(out["images"], self.device, self.dtype, self.channels_last)
            yield images, out["labels"].view(-1).to(torch.int64).to(self.device)
