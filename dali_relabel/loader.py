"""Drop-in training and validation loaders: DALI images plus ReLabel targets.

``ReLabelLoader`` replaces ``torch.utils.data.DataLoader`` for ReLabel training. It ties
together three parts: the epoch plan (``dali_relabel.plan``: order, shards, crop windows,
flips and the resume position, all decided on the host), the DALI run of a plan
(``dali_relabel.epoch``) and the targets (``dali_relabel.targets``: LabelPooling of the
planned boxes in one of the paper's label modes).

Both offer what training scripts written for ``torch.utils.data.DataLoader`` use of it
(``len``, ``dataset``, ``sampler.set_epoch``, ``classes``), so that torchvision's or timm's
reference script switches by changing the lines that build its loaders.

``ValLoader`` (``dali_relabel.val_loader``) is the matching evaluation loader.
"""
import dataclasses
import logging
import os
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dali_relabel._loading import (EpochSampler, LoaderDataset, check_epoch, check_mean_std,
                                   check_range, dali_image_dtype, finish_images,
                                   resolve_device, resolve_shard)
from dali_relabel._utils import check_positive_int, cpu_share
from dali_relabel.augment import Augmentations, random_erase
from dali_relabel.epoch import EpochInputs, PlannedDecoder
from dali_relabel.image_files import (IMAGE_EXTENSIONS, check_image_files, find_images,
                                      read_image_sizes)
from dali_relabel.mixing import (MIXUP_MODES, Mixer, Mixing, check_label_smoothing,
                                 mixing_fields, smooth_targets)
from dali_relabel.pipeline import IMAGENET_MEAN, IMAGENET_STD
from dali_relabel.plan import EpochPlan, EpochPlanner
from dali_relabel.sparse_targets import SparseTargets
from dali_relabel.store import LabelMapStore, read_header
from dali_relabel.targets import LABEL_MODES, TargetMaker, check_store
from dali_relabel.val_loader import ValLoader
from dali_relabel.verify import read_path_list

__all__ = ["LABEL_MODES", "IMAGE_EXTENSIONS", "MIXUP_MODES", "LoaderDataset", "ReLabelBatch",
           "ReLabelLoader", "ValLoader", "find_images"]

logger = logging.getLogger(__name__)

# Put the whole store on the GPU when it takes at most this share of the GPU's memory.
DEVICE_STORE_FRACTION = 0.2
_SHOWN_PATHS = 5


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


def _open_store(labelmaps, placement: Optional[str], device: torch.device) -> LabelMapStore:
    if isinstance(labelmaps, LabelMapStore):
        return labelmaps
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
    parameters) is planned on the host before DALI runs, from the images' sizes: the store's
    /sizes, or their headers, read at start when the store has none (`dali-relabel index`
    stores them).

    Augmentations take timm's ``create_loader`` names and are off by default; none moves the
    crop window, so the targets are those of the crop. Per image, in order: crop, flip,
    ``auto_augment``, ``color_jitter``, ``lighting``, normalization (all in the DALI graph,
    on the GPU when there is one); then per batch on the device: mixup/CutMix, then random
    erasing (the order of timm's GPU prefetcher). ``label_smoothing`` smooths the targets
    last, mixed or not, as timm's Mixup does.

    Args:
        image_root: Folder the store's /paths are relative to.
        labelmaps: Label-map HDF5 file or an open LabelMapStore; its /paths lists the
            training images and their order.
        batch_size: Images per batch and rank.
        device: "cuda" (DALI decodes on the GPU, "mixed"; a bare "cuda" is the GPU of
            LOCAL_RANK when set) or "cpu" (default: "cuda").
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
        sparse_targets: Yield targets as SparseTargets (per row the probability every
            unlisted class gets and the listed (class, probability) pairs; ``.dense()`` gives
            the tensor), which ``dali_relabel.soft_target_cross_entropy`` takes without
            densifying (ImageNet's maps, S = 14, C = 1000: 15x less memory than dense)
            (default: False).
        num_classes: The model's number of classes; checked against the store when given.
        seed: Base seed. The order of an epoch is seeded by (seed, epoch), the same on every
            rank; crops and flips by (seed, rank, epoch), so ranks and epochs differ and the
            same seed gives the same batches again (default: 0).
        shuffle: Globally reshuffle every epoch (default: True).
        shard_id: This rank's shard (default: the global rank: torch.distributed's, else
            the RANK environment variable, else 0).
        num_shards: Number of shards (default: the world size, likewise).
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
        jpeg_fancy_upsampling: On the GPU decoder, interpolate JPEG chroma as libjpeg and
            PIL do, for pixels equal to a PIL pipeline's, instead of DALI's faster default
            (which differs only in the colour of fine edges); DALI's CPU decoder always
            interpolates (default: False).
        exclude: Relative paths (or a file listing them, e.g. from `dali-relabel verify`) to
            leave out.
        labelmaps_placement: Store placement; default: "device" on CUDA when the store
            takes at most 20% of the GPU's memory (fused gather), else "mmap".
        fused_gather: Pool straight from the whole store by row (default: when the store
            is on `device`); otherwise the batch's rows are gathered on the host into pinned
            memory and copied.
        check_sizes: Check every decoded image's size against the planned one until the
            loader has run one whole epoch (not a resumed one) to its end, so that a stale
            /sizes (e.g. a resized copy of the data set) stops with a named file instead of
            training on wrong windows; the check is an extra operator per image, so later
            epochs run without it (default: True).
        color_jitter: torchvision's ColorJitter: a float x (brightness, contrast and
            saturation factors uniform in [max(0, 1-x), 1+x]) or (b, c, s) or (b, c, s, h),
            each a float or a (min, max) range (hue: h gives [-h, h], h <= 0.5). Applied in
            a random order per image, as torchvision does, on float pixels clamped to
            [0, 255] after each operation (default: None, off).
        force_color_jitter: Apply color_jitter together with auto_augment; as in timm, a
            policy replaces colour jitter otherwise (default: False).
        lighting: alphastd of the PCA lighting noise of fb.resnet.torch and the official
            ReLabel recipe (0.1 there): each image gets eigvec @ (alpha * eigval) added
            (AlexNet's ImageNet eigenvalues and eigenvectors, 0-1 scale), alpha ~
            N(0, alphastd) per component (default: 0.0, off).
        auto_augment: A policy by timm's or torchvision's name. timm's --aa:
            "rand-m9-mstd0.5-inc1" style RandAugment (m, n, p, mstd, mmax, inc, tweights;
            timm's operations and magnitude scale, m out of 10), AutoAugment "original",
            "originalr", "v0", "v0r" (optionally "-mstd0.5"). torchvision's --auto-augment:
            "ra" (RandAugment: 2 operations of torchvision's 14 at bin ra_magnitude of 31),
            "ta_wide" / "trivialaugment" (TrivialAugmentWide), "imagenet", "cifar10", "svhn"
            (AutoAugment's policies). AugMix is refused. DALI runs the operations with
            arguments computed as the library does; bilinear warps, OpenCV's equalize, and
            fill: timm's mean grey, torchvision's black (see
            ``dali_relabel.augment.parse_auto_augment``) (default: None, off).
        ra_magnitude: torchvision's --ra-magnitude: the magnitude bin (of 31) of
            auto_augment="ra"; an int in [0, 30] (default: 9).
        re_prob: Random erasing probability per image, as timm's RandomErasing on the
            normalized image (default: 0.0, off).
        re_mode: Erased pixels: "const" (zeros), "rand" (a normal colour per rectangle) or
            "pixel" (normal noise per pixel) (default: "const").
        re_count: Rectangles per erased image, uniform in [1, re_count] (default: 1).
        mixup_alpha: Mixup Beta(alpha, alpha), as timm's Mixup; > 0 turns it on (default:
            0.0).
        cutmix_alpha: CutMix Beta(alpha, alpha); > 0 turns it on. With localized labels the
            pasted rectangle's share of the target is LabelPooling over the partner's pasted
            pixels (default: 0.0).
        cutmix_minmax: CutMix box sides as fractions (min, max) of the image's instead of
            drawn from lambda; turns CutMix on (default: None).
        mixup_prob: Probability of mixing per batch, pair or element (default: 1.0).
        mixup_switch_prob: Probability of CutMix instead of mixup when both are on
            (default: 0.5).
        mixup_mode: "batch" (one draw per batch), "pair" or "elem" (default: "batch").
        label_smoothing: eps in [0, 1): targets become (1 - eps) * t + eps / C after mixing,
            mixed or not (also when mixup_enabled is switched off), for every label mode
            and for SparseTargets (exact: the fill is smoothed too); timm's --smoothing,
            which its Mixup applies and its loss then leaves out (default: 0.0, off).
        return_meta: Yield ReLabelBatch objects (default: False).
        return_labels: Yield (images, targets, labels), the original labels (-1 if unknown)
            on the device beside the targets (default: False).
    """

    # DataLoader's attribute; None as batching is the loader's own. Scripts that call
    # loader.batch_sampler.set_epoch when it has one (timm's train.py) then use loader.sampler.
    batch_sampler = None

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
        sparse_targets: bool = False,
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
        force_color_jitter: bool = False,
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
        for name, value in (("batch_size", batch_size), ("image_size", image_size),
                            ("output_size", output_size), ("prefetch", prefetch)):
            check_positive_int(name, value)
        if return_meta and return_labels:
            raise ValueError("return_meta and return_labels are exclusive: a ReLabelBatch "
                             "holds the labels")
        self.augment = Augmentations.create(
            color_jitter=color_jitter, force_color_jitter=force_color_jitter,
            lighting=lighting, auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode,
            re_count=re_count, ra_magnitude=ra_magnitude)
        self.mixing = Mixing.create(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,
            mixup_prob=mixup_prob, mixup_switch_prob=mixup_switch_prob, mixup_mode=mixup_mode,
            image_size=image_size)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        if sparse_targets and self.mixing.enabled:
            raise ValueError("sparse_targets=True cannot be mixed yet (mixup_alpha, "
                             "cutmix_alpha): mixing blends dense targets")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        scale, ratio = check_range("scale", scale, 0.0), check_range("ratio", ratio, 0.0)
        if scale[1] > 1.0:
            raise ValueError(f"scale must lie within (0, 1], got {scale!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        mean, std = check_mean_std(mean, std)
        self.device, device_id = resolve_device(device)
        shard_id, num_shards = resolve_shard(shard_id, num_shards)
        self.store = _open_store(labelmaps, labelmaps_placement, self.device)
        if num_classes is not None and num_classes != self.store.num_classes:
            raise ValueError(f"num_classes={num_classes} (the model's) but {self.store.path} "
                             f"has {self.store.num_classes} classes")
        self.image_root = os.fspath(image_root)
        rows = _training_rows(self.store, exclude)
        check_image_files(self.image_root, [self.store.paths[row] for row in rows],
                          self.store.path)
        check_store(self.store, rows, label_mode=label_mode)
        self.planner = EpochPlanner(
            _image_sizes(self.store, self.image_root, rows, adjust_orientation), rows,
            batch_size=batch_size, seed=seed, shuffle=shuffle, shard_id=shard_id,
            num_shards=num_shards, drop_last=drop_last, scale=scale, ratio=ratio, hflip=hflip)
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
        self.image_size, self.dtype, self.channels_last = image_size, dtype, channels_last
        self.return_meta, self.return_labels = return_meta, return_labels
        self._mixer = Mixer(self.targets, image_size) if self.mixing.enabled else None
        self.mixup_enabled = self.mixing.enabled  # timm's switch (--mixup-off-epoch)
        self.dataset = LoaderDataset(self.image_root, self.store.classes, len(rows))
        self.sampler = EpochSampler(self.set_epoch, self.planner.shard_size)
        in_graph = self.augment.in_graph
        self._decoder = PlannedDecoder(
            image_root=self.image_root, labelmaps=self.store.path, paths=self.store.paths,
            sizes=self.planner.sizes, check_sizes=check_sizes, following=self._epoch_inputs,
            decoder_device="mixed" if device_id is not None else "cpu", image_size=image_size,
            mean=mean, std=std, dtype=dali_image_dtype(dtype),
            channels_last=channels_last, adjust_orientation=adjust_orientation,
            jpeg_fancy_upsampling=jpeg_fancy_upsampling, batch_size=batch_size,
            num_threads=num_threads or cpu_share(), device_id=device_id,
            prefetch_queue_depth=prefetch, augment=self.augment if in_graph else None,
            enable_conditionals=in_graph)
        self._epoch, self._batches_done = 0, 0
        # The whole plan of the epoch being iterated (host arrays), for code that needs a
        # batch's boxes, flips or rows without copying them back from the device.
        self.plan: Optional[EpochPlan] = None
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
        """Store rows this rank reads in `epoch`, in order: its slice of the global shuffle."""
        return self.planner.order(epoch)

    def __iter__(self) -> Iterator[Union[Tuple[torch.Tensor, ...], ReLabelBatch]]:
        whole = True  # the previous iteration, if any, took every batch of its epoch
        if self._running:  # the previous iteration stopped early: next epoch
            whole = self._batches_done == len(self)
            self._epoch, self._batches_done = self._epoch + 1, 0
        self._running, self._resuming = True, False
        # The decoder has started the next epoch already, unless this one resumes or the
        # last one was left before its end.
        ahead = self._decoder.ahead(self._epoch) if whole and self._batches_done == 0 else None
        self.plan, extras = ahead or self._epoch_inputs(self._epoch)
        plan = self.plan.skip(self._batches_done)
        start = self._batches_done * self.planner.batch_size
        if len(plan.rows):
            extras = {name: value[start:] for name, value in extras.items()}
            for images, samples in self._decoder.run((plan, extras)):
                self._batches_done += 1
                yield self._batch(images, plan.boxes[samples], plan.flips[samples],
                                  plan.rows[samples],
                                  {name: value[samples] for name, value in extras.items()})
        self._epoch, self._batches_done, self._running = self._epoch + 1, 0, False

    def _epoch_inputs(self, epoch: int) -> EpochInputs:
        """Epoch `epoch`'s plan and its augmentation and mixing draws (seeded by seed, rank
        and epoch, apart from the crops)."""
        planner = self.planner
        plan = planner.plan(epoch)
        rng = np.random.default_rng([planner.seed, planner.shard_id, epoch, 1])
        extras = self.augment.plan(len(plan.rows), self.image_size, rng)
        if self.mixing.enabled:
            extras.update(self.mixing.plan(len(plan.rows), planner.batch_size, self.image_size,
                                           rng))
        return plan, extras

    def _batch(self, images: torch.Tensor, boxes: np.ndarray, flips: np.ndarray,
               rows: np.ndarray, extras: Dict[str, np.ndarray]):
        boxes, flips, rows = (torch.from_numpy(a) for a in (boxes, flips, rows))
        targets = self.targets(boxes, flips, rows)
        images = finish_images(images, self.device, self.dtype, self.channels_last)
        mixed = self._mixer is not None and self.mixup_enabled
        if mixed:
            images, targets = self._mixer(images, targets, boxes, flips, rows, extras)
        targets = smooth_targets(targets, self.label_smoothing)
        if self.augment.re_prob > 0:
            images = random_erase(images, extras["erase_boxes"], self.augment.re_mode,
                                  int(extras["erase_seed"][0]))
        if self.return_labels:
            return images, targets, self.targets.labels(rows)
        if not self.return_meta:
            return images, targets
        return ReLabelBatch(images=images, targets=targets, labels=self.targets.labels(rows),
                            boxes=boxes.to(self.device), flip=flips.to(self.device),
                            sample_index=rows.to(self.device),
                            **mixing_fields(extras if mixed else None, len(rows),
                                            self.image_size, self.device))

    def time_label_pooling(self):
        """A context manager that counts its block into label_pooling_ms() (for targets made
        outside the loader, e.g. by CutMix)."""
        return self.targets.timer

    def label_pooling_ms(self) -> float:
        """Milliseconds spent making targets (LabelPooling) since the last call.

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
