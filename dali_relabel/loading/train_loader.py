"""``ReLabelLoader``: the drop-in training loader, DALI images plus ReLabel targets.

It ties together three parts, as FFCV's Loader ties an ordering, a memory manager and an
epoch iterator: the epoch plan (``plan.py``: order, shards, crop windows, flips, augmentation
and mixing draws, all decided on the host), the DALI run of a plan (``decoder.py``) and the
targets (``targets.py``: LabelPooling of the planned boxes in one of the paper's label
modes), then mixes (``mixing.py``) and erases on the device.

It offers what training scripts written for ``torch.utils.data.DataLoader`` use of one
(``len``, ``dataset``, ``sampler.set_epoch``, ``classes``), so that torchvision's or timm's
reference script switches by changing the lines that build its loaders.
"""
import dataclasses
import logging
import os
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dali_relabel import _checks
from dali_relabel import _transfer
from dali_relabel._system import cpu_share
from dali_relabel.augment.augmentations import Augmentations
from dali_relabel.images.files import check_image_files, read_image_sizes
from dali_relabel.images.path_lists import read_path_list
from dali_relabel.labelmaps import LabelMapStore, read_header
from dali_relabel.loading.common import (EpochSampler, LoaderDataset, check_epoch,
                                         check_mean_std, dali_image_dtype, finish_images,
                                         resolve_device, resolve_shard)
from dali_relabel.loading.decode_choice import DECODE_CHOICES, choose_decode, gpu_decoder_options
from dali_relabel.loading.decoder import PlannedDecoder
from dali_relabel.loading.mixing import Mixer, Mixing, check_label_smoothing, mixing_fields, \
    smooth_targets
from dali_relabel.loading.pipeline import IMAGENET_MEAN, IMAGENET_STD
from dali_relabel.loading.plan import EpochPlan, EpochPlanner
from dali_relabel.loading.targets import LABEL_MODES, TargetMaker, check_store
from dali_relabel.ops.sparse_targets import SparseTargets

__all__ = ["ReLabelBatch", "ReLabelLoader"]

logger = logging.getLogger(__name__)

# Put the whole store on the GPU when it takes at most this share of the GPU's memory.
DEVICE_STORE_FRACTION = 0.2
_SHOWN_PATHS = 5
# Bounds that keep a typo from reaching DALI as an abort or an allocation failure: output
# sides up to 4096 (16x ImageNet's), DALI threads and prefetched batches up to 256.
MAX_IMAGE_SIZE = 4096
MAX_THREADS = 256
MAX_PREFETCH = 256
MAX_CROPS = 64


@dataclasses.dataclass
class ReLabelBatch:
    """One training batch with what produced its targets (``return_meta=True``).

    Attributes:
        images (Tensor[B, 3, S, S]): normalized images on the loader's device.
        targets (Tensor[B, C] or Tensor[B, S*S, C]): float32 targets on the device, or
            SparseTargets with rows [B] or [B, S*S] (``sparse_targets=True``); mixed and
            smoothed (``label_smoothing``) as yielded.
        labels (Tensor[B]): original single labels (-1 if unknown).
        boxes (Tensor[B, 4]): crop boxes (x1, y1, x2, y2), normalized to the image.
        flip (Tensor[B]): bool, whether the crop was mirrored horizontally.
        sample_index (Tensor[B]): int64 rows of the label-map store (and of its /paths).
        lam (Tensor[B]): float32 share of each image that is its own after mixing (timm's
            lambda, CutMix's corrected to the pasted area); 1 where nothing was mixed.
        cutmix (Tensor[B]): bool, mixed by CutMix (else by mixup, where lam < 1).
        cut_box (Tensor[B, 4]): CutMix's pasted rectangle (x1, y1, x2, y2), normalized to
            the output image as shown (after the flip); zeros without CutMix.
        partner (Tensor[B]): int64 index in the batch of the image mixed in (the batch
            reversed, as timm's flip(0)).
        crop_targets (Tensor[B, C], optional): with ``crop_targets=True`` and
            output_size > 1, every crop's own (S = 1) target, for a class token beside the
            token targets; else None.
        vflip (Tensor[B], optional): bool, whether the crop was flipped vertically (None
            without ``vflip``).
    """

    images: torch.Tensor
    targets: Union[torch.Tensor, SparseTargets]
    labels: torch.Tensor
    boxes: torch.Tensor
    flip: torch.Tensor
    sample_index: torch.Tensor
    lam: torch.Tensor
    cutmix: torch.Tensor
    cut_box: torch.Tensor
    partner: torch.Tensor
    crop_targets: Optional[torch.Tensor] = None
    vflip: Optional[torch.Tensor] = None


def _open_store(labelmaps, placement: Optional[str], device: torch.device) -> LabelMapStore:
    if isinstance(labelmaps, LabelMapStore):
        return labelmaps
    labelmaps = _checks.check_path_arg("labelmaps", labelmaps, kind="label-map file")
    if not os.path.isfile(labelmaps):
        raise FileNotFoundError(f"labelmaps: {labelmaps} is not a file (expected the label-map "
                                "HDF5 file of the training images)")
    if placement is None:
        placement = "mmap"
        if device.type == "cuda":
            header = read_header(labelmaps)
            store_bytes = sum(layout.nbytes for layout in header.layout.values())
            total = torch.cuda.get_device_properties(device).total_memory
            if store_bytes <= DEVICE_STORE_FRACTION * total:
                placement = "device"
    return LabelMapStore.open(labelmaps, placement=placement,
                              device=device if placement == "device" else None)


def _image_root(image_root: Any) -> str:
    image_root = _checks.check_path_arg("image_root", image_root, kind="folder")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root: {image_root} is not a folder (expected the folder "
                                "the label-map file's /paths are relative to)")
    return image_root


def _training_rows(store: LabelMapStore, exclude) -> np.ndarray:
    """The store rows to train on: all but the excluded paths."""
    excluded = set(read_path_list(exclude))
    rows = np.flatnonzero([path not in excluded for path in store.paths]).astype(np.int64)
    if excluded:
        logger.info("excluding %d of %d images", len(store) - len(rows), len(store))
        unmatched = len(excluded) - (len(store) - len(rows))
        if unmatched:
            warnings.warn(f"{unmatched} of the {len(excluded)} excluded paths are not listed "
                          f"in {store.path}; they were ignored")
    return rows


def _image_sizes(store: LabelMapStore, image_root: str, rows: np.ndarray,
                 adjust_orientation: bool) -> np.ndarray:
    """Every row's image (height, width): the store's /sizes, else read from the headers."""
    if store.sizes is not None and store.sizes_adjust_orientation == adjust_orientation:
        return store.sizes.numpy()
    sizes = np.zeros((len(store), 2), dtype=np.int32)
    sizes[rows] = read_image_sizes(image_root, [store.paths[row] for row in rows],
                                   adjust_orientation=adjust_orientation)
    why = ("has no /sizes" if store.sizes is None else
           f"records sizes with adjust_orientation={not adjust_orientation}")
    logger.warning("%s %s: read %d image headers. Run `dali-relabel index %s --images %s%s` "
                   "once to store them and start faster.", store.path, why, len(rows),
                   store.path, image_root, " --adjust-orientation" if adjust_orientation else "")
    return sizes


class ReLabelLoader:
    """Training loader: random-resized-crop images and their ReLabel targets.

    Iterating yields ``(images, targets)`` on ``device`` (``(images, targets, labels)`` with
    ``return_labels=True``, a :class:`ReLabelBatch` with ``return_meta=True``);
    ``len(loader)`` is the number of batches per epoch of this rank. Each ``iter()`` runs the
    next epoch (an epoch left early counts as done), except after ``load_state_dict``, when it
    finishes the saved epoch; ``set_epoch`` (or ``loader.sampler.set_epoch``) chooses one.
    Example::

        loader = ReLabelLoader("train/", "relabel.h5", 256, device="cuda")
        for epoch in range(epochs):
            for images, targets in loader:
                loss = torch.sum(-targets * model(images).log_softmax(-1), -1).mean()

    Everything random about an epoch (order, crop windows, flips, augmentation and mixing
    draws) is planned on the host before DALI runs, from the images' sizes (the store's
    /sizes, or their headers). Per image, in the DALI graph: crop, resize, flip,
    ``auto_augment``, ``color_jitter``, ``lighting``, normalization; per batch on the
    device: mixup/CutMix, then random erasing (timm's GPU prefetcher's order);
    ``label_smoothing`` last. docs/training.md explains every option; the augmentation
    strings follow timm's and torchvision's parsers (``dali_relabel.augment``).

    Args:
        image_root: Folder the store's /paths are relative to.
        labelmaps: Label-map HDF5 file (or an open LabelMapStore); its /paths lists the images.
        batch_size: Samples per batch and rank (a multiple of num_crops).
        device: "cuda" (GPU decoding; a bare "cuda" is LOCAL_RANK's GPU) or "cpu".
        image_size: Side of the output images.
        scale: RandomResizedCrop area range, as torchvision's.
        ratio: RandomResizedCrop aspect-ratio range, as torchvision's.
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip (timm's --vflip; token targets follow it).
        interpolation: Training resize filter: "bilinear", "bicubic" or "random" (one of the
            two per crop: timm's default --train-interpolation); antialiased.
        label_mode: One of LABEL_MODES, the rows of the paper's factor analysis.
        output_size: S; S > 1 gives token targets [B, S*S, C], mirrored with the image.
        sparse_targets: Yield SparseTargets (docs/design.md#token-targets).
        crop_targets: With output_size > 1, also each crop's S = 1 target
            (ReLabelBatch.crop_targets; needs return_meta).
        num_crops: Crops per decoded image, each with its own window, flip, draws and
            target; an epoch takes 1/N of the images (docs/training.md#several-crops).
        decode: "roi", "full" or "auto" (docs/training.md#decoding).
        decoder_options: DALI decoder arguments for the GPU ("mixed") decoder, over the
            defaults of ``loading.decode_choice.gpu_decoder_options``.
        num_classes: The model's number of classes; checked against the store.
        seed: Base seed of every draw (order by (seed, epoch); the rest by (seed, rank,
            epoch)).
        shuffle: Globally reshuffle every epoch.
        shard_id: This rank's shard (default: the torch.distributed rank).
        num_shards: Number of shards (default: the world size).
        drop_last: Every rank the same number of full batches (False: every sample once).
        num_threads: DALI CPU threads (default: this process's share of the CPUs).
        prefetch: Batches DALI prepares ahead.
        dtype: Image dtype: float32, float16 or bfloat16.
        channels_last: Images in channels_last memory format.
        mean: Per-channel mean, 0-255 scale.
        std: Per-channel std, 0-255 scale.
        adjust_orientation: Apply EXIF orientation (off, as PIL and the official maps).
        jpeg_fancy_upsampling: GPU decoder: chroma upsampled as libjpeg and PIL do.
        exclude: Relative paths, or a list file (`dali-relabel verify`), to leave out.
        labelmaps_placement: Store placement (default: "device" on a GPU it fits in, else
            "mmap"); see LabelMapStore.open.
        fused_gather: Pool straight from the whole store by row (default: when the store is
            on `device`).
        check_sizes: Check decoded sizes against the plan until one whole epoch has run.
        color_jitter: torchvision ColorJitter: a float, or (b, c, s[, h]) floats or ranges.
        color_jitter_prob: Share of the crops jittered (timm's --color-jitter-prob).
        force_color_jitter: Apply color_jitter beside auto_augment (timm replaces it).
        grayscale_prob: Probability of a grey crop (timm's --grayscale-prob).
        gaussian_blur_prob: Probability of a Gaussian blur (timm's --gaussian-blur-prob).
        lighting: alphastd of the PCA lighting noise (0.1 in the official ReLabel recipe).
        auto_augment: A policy by timm's (--aa) or torchvision's (--auto-augment) name; see
            ``augment.parse_auto_augment``.
        ra_magnitude: torchvision's --ra-magnitude, the bin of auto_augment="ra".
        re_prob: Random erasing probability per image (timm's --reprob).
        re_mode: Erased pixels: "const", "rand" or "pixel" (timm's --remode).
        re_count: Most rectangles per erased image (timm's --recount).
        mixup_alpha: Mixup Beta(alpha, alpha), as timm's Mixup; > 0 turns it on.
        cutmix_alpha: CutMix Beta(alpha, alpha); > 0 turns it on (localized targets:
            docs/training.md#mixing).
        cutmix_minmax: CutMix box sides as fractions (min, max); turns CutMix on.
        mixup_prob: Probability of mixing per batch, pair or element.
        mixup_switch_prob: Probability of CutMix instead of mixup when both are on.
        mixup_mode: "batch", "pair" or "elem".
        label_smoothing: eps: targets become (1 - eps) * t + eps / C after mixing.
        return_meta: Yield ReLabelBatch objects.
        return_labels: Yield (images, targets, labels).
    """

    # DataLoader's attribute; None as batching is the loader's own. Scripts that call
    # loader.batch_sampler.set_epoch when it has one (timm's train.py) then use loader.sampler.
    batch_sampler = None

    def __init__(
        self,
        image_root: Union[str, os.PathLike],
        labelmaps: Union[str, os.PathLike, LabelMapStore],
        batch_size: int,
        *,
        device: Union[str, torch.device] = "cuda",
        image_size: int = 224,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        interpolation: str = "bilinear",
        label_mode: str = "localized_multi",
        output_size: int = 1,
        sparse_targets: bool = False,
        crop_targets: bool = False,
        num_crops: int = 1,
        decode: str = "auto",
        decoder_options: Optional[Mapping[str, Any]] = None,
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
        jpeg_fancy_upsampling: bool = False,
        exclude: Union[None, str, os.PathLike, Sequence[str]] = None,
        labelmaps_placement: Optional[str] = None,
        fused_gather: Optional[bool] = None,
        check_sizes: bool = True,
        color_jitter: Union[None, float, Sequence[Any]] = None,
        color_jitter_prob: Optional[float] = None,
        force_color_jitter: bool = False,
        grayscale_prob: float = 0.0,
        gaussian_blur_prob: float = 0.0,
        lighting: float = 0.0,
        auto_augment: Optional[str] = None,
        ra_magnitude: int = 9,
        re_prob: float = 0.0,
        re_mode: str = "const",
        re_count: int = 1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Optional[Tuple[float, float]] = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        label_smoothing: float = 0.0,
        return_meta: bool = False,
        return_labels: bool = False,
    ) -> None:
        check = _checks
        check.check_int("batch_size", batch_size, 1)
        check.check_int("image_size", image_size, 1, MAX_IMAGE_SIZE)
        check.check_int("output_size", output_size, 1)
        check.check_int("prefetch", prefetch, 1, MAX_PREFETCH)
        check.check_int("num_crops", num_crops, 1, MAX_CROPS)
        if num_threads is not None:
            check.check_int("num_threads", num_threads, 1, MAX_THREADS)
        for name, value in (("sparse_targets", sparse_targets), ("crop_targets", crop_targets),
                            ("shuffle", shuffle), ("drop_last", drop_last),
                            ("channels_last", channels_last),
                            ("adjust_orientation", adjust_orientation),
                            ("jpeg_fancy_upsampling", jpeg_fancy_upsampling),
                            ("check_sizes", check_sizes), ("return_meta", return_meta),
                            ("return_labels", return_labels)):
            check.check_bool(name, value)
        check.check_int("seed", seed, 0, 2 ** 63 - 1)
        if return_meta and return_labels:
            raise ValueError("return_meta and return_labels are exclusive: a ReLabelBatch "
                             "holds the labels")
        if batch_size % num_crops:
            raise ValueError(f"batch_size={batch_size} must be a multiple of num_crops="
                             f"{num_crops}: the crops of an image sit in one batch")
        if num_crops > 1 and not drop_last:
            raise ValueError("num_crops > 1 needs drop_last=True: each epoch takes an N-th of "
                             "the images, in whole batches (as timm's and torchvision's "
                             "repeated-augmentation samplers drop the tail)")
        check.check_choice("decode", decode, DECODE_CHOICES)
        if decode == "roi" and num_crops > 1:
            raise ValueError("decode='roi' decodes one window per image; num_crops > 1 decodes "
                             "each image whole once and cuts its crops (decode='full' or "
                             "'auto')")
        self.augment = Augmentations.create(
            color_jitter=color_jitter, force_color_jitter=force_color_jitter,
            lighting=lighting, auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode,
            re_count=re_count, ra_magnitude=ra_magnitude, color_jitter_prob=color_jitter_prob,
            grayscale_prob=grayscale_prob, gaussian_blur_prob=gaussian_blur_prob,
            interpolation=interpolation)
        self.mixing = Mixing.create(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,
            mixup_prob=mixup_prob, mixup_switch_prob=mixup_switch_prob, mixup_mode=mixup_mode,
            image_size=image_size)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        if sparse_targets and self.mixing.enabled:
            raise ValueError("sparse_targets=True cannot be mixed yet (mixup_alpha, "
                             "cutmix_alpha): mixing blends dense targets")
        if crop_targets and (output_size == 1 or not return_meta or self.mixing.enabled):
            raise ValueError("crop_targets=True gives each crop's S = 1 target beside token "
                             "targets: it needs output_size > 1 and return_meta=True, and no "
                             "mixing")
        check.check_choice("label_mode", label_mode, LABEL_MODES)
        scale = check.check_range("scale", scale, 0.0, 1.0)
        ratio = check.check_range("ratio", ratio, 0.0)
        hflip = check.check_probability("hflip", hflip)
        vflip = check.check_probability("vflip", vflip)
        mean, std = check_mean_std(mean, std)
        self.device, device_id = resolve_device(device)
        shard_id, num_shards = resolve_shard(shard_id, num_shards)
        self.image_root = _image_root(image_root)
        self.store = _open_store(labelmaps, labelmaps_placement, self.device)
        if num_classes is not None and num_classes != self.store.num_classes:
            raise ValueError(f"num_classes={num_classes} (the model's) but {self.store.path} "
                             f"has {self.store.num_classes} classes")
        rows = _training_rows(self.store, exclude)
        check_image_files(self.image_root, [self.store.paths[row] for row in rows],
                          self.store.path)
        check_store(self.store, rows, label_mode=label_mode)
        self.planner = EpochPlanner(
            _image_sizes(self.store, self.image_root, rows, adjust_orientation), rows,
            batch_size=batch_size, seed=seed, shuffle=shuffle, shard_id=shard_id,
            num_shards=num_shards, drop_last=drop_last, scale=scale, ratio=ratio, hflip=hflip,
            vflip=vflip, augment=self.augment, mixing=self.mixing, image_size=image_size,
            num_crops=num_crops)
        if len(self) == 0:
            raise ValueError(
                f"batch_size={batch_size} leaves no {'full ' if drop_last else ''}batch: "
                f"{len(rows)} images over {num_shards} shards")
        if not drop_last and num_shards > 1:
            warnings.warn("drop_last=False: ranks may yield different numbers of batches, "
                          "which stalls DDP's gradient all-reduce; use it for evaluation-like "
                          "passes, drop_last=True for training")
        if fused_gather is None:
            fused_gather = self.store.values.device == self.device
        elif fused_gather and self.store.values.device != self.device:
            raise ValueError(f"fused_gather=True needs the store on {self.device}; it is on "
                             f"{self.store.values.device} (labelmaps_placement='device')")
        self.targets = TargetMaker(self.store, self.device, label_mode=label_mode,
                                   output_size=output_size, fused_gather=fused_gather,
                                   sparse=sparse_targets)
        # The class token's target beside token targets: the whole crop, one timer for both.
        self._crop_targets = TargetMaker(
            self.store, self.device, label_mode=label_mode, output_size=1,
            fused_gather=fused_gather, timer=self.targets.timer) if crop_targets else None
        self.image_size, self.dtype, self.channels_last = image_size, dtype, channels_last
        self.return_meta, self.return_labels = return_meta, return_labels
        self._mixer = Mixer(self.targets, image_size) if self.mixing.enabled else None
        self.mixup_enabled = self.mixing.enabled  # timm's switch (--mixup-off-epoch)
        self.dataset = LoaderDataset(self.image_root, self.store.classes, len(rows))
        self.sampler = EpochSampler(self.set_epoch, self.planner.shard_size)
        decoder_device = "mixed" if device_id is not None else "cpu"
        in_graph = self.augment.in_graph
        self.decode, why = choose_decode(
            decode, num_crops=num_crops, decoder_device=decoder_device, device_id=device_id,
            files=[os.path.join(self.image_root, self.store.paths[row]) for row in rows[:4]],
            adjust_orientation=adjust_orientation)
        logger.info("decoding with decode=%r on %s: %s", self.decode, decoder_device, why)
        self._decoder = PlannedDecoder(
            image_root=self.image_root, labelmaps=self.store.path, paths=self.store.paths,
            sizes=self.planner.sizes, check_sizes=check_sizes, planner=self.planner,
            decoder_device=decoder_device, decode=self.decode,
            decoder_options=gpu_decoder_options(self.decode, decoder_options),
            image_size=image_size, interpolation=interpolation, mean=mean, std=std,
            dtype=dali_image_dtype(dtype), channels_last=channels_last,
            adjust_orientation=adjust_orientation,
            jpeg_fancy_upsampling=jpeg_fancy_upsampling,
            num_threads=num_threads or cpu_share(), device_id=device_id,
            prefetch_queue_depth=prefetch, augment=self.augment if in_graph else None,
            enable_conditionals=in_graph)
        self._epoch, self._batches_done = 0, 0
        self._plan: Optional[EpochPlan] = None  # the whole plan of the epoch being iterated
        self._running = False  # an iteration has started and not finished
        self._resuming = False  # load_state_dict set a position for the next iteration

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def classes(self) -> List[str]:
        return self.dataset.classes

    @property
    def shard_id(self) -> int:
        return self.planner.shard_id

    @property
    def num_shards(self) -> int:
        return self.planner.num_shards

    @property
    def num_crops(self) -> int:
        return self.planner.num_crops

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) iteration runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Run `epoch` next, as DistributedSampler.set_epoch does.

        Setting the epoch a resumed loader is in keeps its position (so the usual
        ``load_state_dict`` then ``set_epoch`` loop neither repeats nor skips samples).
        """
        check_epoch(epoch)
        if epoch == self._epoch and self._resuming:
            return
        self._epoch, self._batches_done = epoch, 0
        self._running = self._resuming = False

    def __len__(self) -> int:
        return len(self.planner)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Store rows of this rank's samples in `epoch`, in order: its slice of the global
        shuffle (each image's row once per crop)."""
        return self.planner.order(epoch)

    def __iter__(self) -> Iterator[Union[Tuple[torch.Tensor, ...], ReLabelBatch]]:
        whole = True  # the previous iteration, if any, took every batch of its epoch
        if self._running:  # the previous iteration stopped early: next epoch
            whole = self._batches_done == len(self)
            self._epoch, self._batches_done = self._epoch + 1, 0
        self._running, self._resuming = True, False
        self.store.check_unchanged()  # a store rewritten in place is refused, by name
        # The decoder has started the next epoch already, unless this one resumes or the
        # last one was left before its end.
        ahead = self._decoder.ahead(self._epoch) if whole and self._batches_done == 0 else None
        self._plan = ahead or self.planner.plan(self._epoch)
        plan = self._plan.skip(self._batches_done)
        if plan.num_samples:
            for images, samples in self._decoder.run(plan):
                self._batches_done += 1
                yield self._batch(images, plan[samples])
        self._epoch, self._batches_done, self._running = self._epoch + 1, 0, False

    def _batch(self, images: torch.Tensor, batch: EpochPlan):
        self.store.check_unchanged()  # one fstat; a truncated memory map would be a SIGBUS
        boxes, flips, rows = (torch.from_numpy(a) for a in (batch.boxes, batch.flips,
                                                              batch.rows))
        vflips = None if batch.vflips is None else torch.from_numpy(batch.vflips)
        targets = self.targets(boxes, flips, rows, vflips)
        crop_targets = (self._crop_targets(boxes, flips, rows)
                        if self._crop_targets is not None else None)
        images = finish_images(images, self.device, self.dtype, self.channels_last)
        mixed = self._mixer is not None and self.mixup_enabled
        if mixed:
            images, targets = self._mixer(images, targets, boxes, flips, rows, batch.mixing,
                                          vflips)
        targets = smooth_targets(targets, self.label_smoothing)
        if crop_targets is not None:
            crop_targets = smooth_targets(crop_targets, self.label_smoothing)
        images = self.augment.device_step(images, batch.augment)
        if self.return_labels:
            return images, targets, self.targets.labels(rows)
        if not self.return_meta:
            return images, targets
        return ReLabelBatch(images=images, targets=targets, labels=self.targets.labels(rows),
                            boxes=_transfer.to_device(boxes, self.device),
                            flip=_transfer.to_device(flips, self.device),
                            sample_index=_transfer.to_device(rows, self.device),
                            crop_targets=crop_targets,
                            vflip=None if vflips is None else _transfer.to_device(
                                vflips, self.device),
                            **mixing_fields(batch.mixing if mixed else None, len(rows),
                                            self.image_size, self.device))

    @classmethod
    def from_torchvision_args(cls, args: Any, **overrides: Any) -> "ReLabelLoader":
        """The loader of torchvision's references/classification/train.py flags (its parsed
        namespace); keyword arguments override the mapped ones. A flag set to a value the
        loader cannot honour raises a ValueError naming it (docs/switching.md)."""
        from dali_relabel.loading.script_args import torchvision_train_kwargs

        return cls(**torchvision_train_kwargs(args, **overrides))

    @classmethod
    def from_timm_args(cls, args: Any, data_config: Mapping[str, Any], *, device: Any,
                       **overrides: Any) -> "ReLabelLoader":
        """The loader of timm's train.py flags and its resolved data_config; keyword
        arguments override the mapped ones. A flag set to a value the loader cannot honour
        raises a ValueError naming it (docs/switching.md)."""
        from dali_relabel.loading.script_args import timm_train_kwargs

        return cls(**timm_train_kwargs(args, data_config, device=device, **overrides))

    def label_pooling_ms(self) -> float:
        """Milliseconds spent making targets (LabelPooling, CutMix's and crop targets
        included) since the last call.

        Wall clock on CPU; CUDA events on a GPU, read here (this waits for the last batch's
        targets), so measuring costs no synchronisation per batch.
        """
        return self.targets.timer.pop_ms()

    def state_dict(self) -> Dict[str, Any]:
        """Position in the current epoch; load_state_dict continues right after it."""
        return dict(epoch=self._epoch, batches_done=self._batches_done,
                    **self.planner.identity())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state_dict; the settings that fix the sample order must match.

        Raises:
            ValueError: The state is not one of this loader's (malformed, or saved by a
                loader with other data, batch size, seed, shuffle or shards).
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state_dict is unusable: expected a mapping, got "
                             f"{type(state).__name__}")
        for key, high in (("epoch", None), ("batches_done", len(self))):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
                    value < 0 or (high is not None and value > high)):
                bound = f" and <= {high}" if high is not None else ""
                raise ValueError(f"state_dict is unusable: {key!r} must be an int >= 0{bound}, "
                                 f"found {value!r}")
        mismatched = {key: (state.get(key), value)
                      for key, value in self.planner.identity().items() if state.get(key) != value}
        if mismatched:
            listing = ", ".join(f"{key}: saved {saved!r}, now {now!r}"
                                for key, (saved, now) in mismatched.items())
            raise ValueError(f"state_dict was saved by a different loader set-up ({listing})")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        self._running, self._resuming = False, True
