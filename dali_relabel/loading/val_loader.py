"""The validation loader: resize, centre crop and original labels over an ImageFolder tree,
decoded by DALI on the GPU ("mixed") or the CPU, sharded so that every image counts once."""
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dali_relabel import _transfer
from dali_relabel.loading.common import (EpochSampler, LoaderDataset, check_epoch, check_mean_std,
                                   dali_image_dtype, finish_images, resolve_device,
                                   resolve_shard)
from dali_relabel import _checks
from dali_relabel._system import cpu_share
from dali_relabel.images.files import find_images
from dali_relabel.loading.pipeline import (IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, READER_NAME,
                                   val_pipeline)
from dali_relabel.images.path_lists import read_path_list

__all__ = ["ValLoader"]

logger = logging.getLogger(__name__)

_SHOWN_PATHS = 5


class ValLoader:
    """Validation loader over an ImageFolder tree: resize, centre crop, original labels.

    As torchvision's Resize(resize_size) + CenterCrop(image_size) on PIL images (antialiased
    bilinear or bicubic), except that the crop offset rounds half up where torchvision rounds
    half to even (at most one pixel). timm's evaluation transform is the same with
    resize_size = floor(image_size / crop_pct): give resize_size (torchvision's reference
    script) or crop_pct (timm's), not both.

    Yields ``(images, labels)`` on ``device``; across shards every image comes exactly once
    (the last batch is partial). Iterate it once per evaluation. ``len(loader.dataset)``
    counts the images of every shard; ``loader.sampler.set_epoch`` does nothing.

    Args:
        image_root: ImageFolder root (one folder per class).
        batch_size: Images per batch and rank.
        device: "cuda" or "cpu" (default: "cuda").
        image_size: Side of the centre crop (default: 224).
        resize_size: Shorter side after resizing (default: 256, unless crop_pct is given).
        crop_pct: timm's crop fraction: the shorter side is resized to
            floor(image_size / crop_pct) (default: None).
        interpolation: "bilinear" or "bicubic" (default: "bilinear").
        classes: Class names in index order (e.g. the training store's /classes); default:
            the sorted folder names. Folders not listed raise a ValueError.
        shard_id: This rank's shard (default: the global rank, as for ReLabelLoader).
        num_shards: Number of shards (default: the world size).
        num_threads: DALI CPU threads (default: this process's share of the CPUs).
        dtype: Image dtype: float32, float16 or bfloat16 (default: float32).
        channels_last: Return images in channels_last memory format (default: False).
        mean: Per-channel mean, 0-255 scale (default: ImageNet's).
        std: Per-channel std, 0-255 scale (default: ImageNet's).
        adjust_orientation: Apply EXIF orientation (default: False, as PIL does).
        jpeg_fancy_upsampling: As for ReLabelLoader (default: False).
        exclude: Relative paths (or a list file) to leave out.
    """

    batch_sampler = None  # as ReLabelLoader's: no DataLoader batch sampler

    def __init__(
        self,
        image_root: str,
        batch_size: int,
        *,
        device: Union[str, torch.device] = "cuda",
        image_size: int = 224,
        resize_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: str = "bilinear",
        classes: Optional[Sequence[str]] = None,
        shard_id: Optional[int] = None,
        num_shards: Optional[int] = None,
        num_threads: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        adjust_orientation: bool = False,
        jpeg_fancy_upsampling: bool = False,
        exclude: Union[None, str, os.PathLike, Sequence[str]] = None,
    ) -> None:
        _checks.check_int("batch_size", batch_size, 1)
        _checks.check_int("image_size", image_size, 1)
        if resize_size is not None and crop_pct is not None:
            raise ValueError(f"give resize_size (torchvision) or crop_pct (timm), not both: got "
                             f"resize_size={resize_size!r} and crop_pct={crop_pct!r}")
        if crop_pct is not None:
            if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not (
                    0.0 < crop_pct <= 1.0):
                raise ValueError(f"crop_pct must be a float in (0, 1], got {crop_pct!r}")
            resize_size = math.floor(image_size / crop_pct)
        elif resize_size is None:
            resize_size = 256
        _checks.check_int("resize_size", resize_size, 1)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got "
                             f"{interpolation!r}")
        if resize_size < image_size:
            raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}")
        mean, std = check_mean_std(mean, std)
        self.device, self._device_id = resolve_device(device)
        self.shard_id, self.num_shards = resolve_shard(shard_id, num_shards)
        self.image_root = os.fspath(image_root)
        paths, folders = find_images(self.image_root)
        if classes is not None:
            classes = list(classes)
            duplicated = sorted({name for name in classes if classes.count(name) > 1})
            if duplicated:
                raise ValueError(f"classes must be unique names, found {duplicated[:5]} more "
                                 "than once")
        self.classes = classes if classes is not None else folders
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(folders) - set(index))
        if unknown:
            raise ValueError(f"{len(unknown)} class folders of {self.image_root!r} are not in "
                             f"classes: {unknown[:_SHOWN_PATHS]}")
        excluded = set(read_path_list(exclude))
        self.paths = [path for path in paths if path not in excluded]
        if not self.paths:
            raise ValueError(f"no images found under {self.image_root!r}")
        empty = [path for path in self.paths
                 if os.path.getsize(os.path.join(self.image_root, path)) == 0]
        if empty:
            raise ValueError(f"{len(empty)} image(s) under {self.image_root!r} are empty files: "
                             f"{empty[:_SHOWN_PATHS]}; pass them as exclude= (`dali-relabel "
                             f"verify {self.image_root}` lists every file that fails to decode)")
        self.labels = [index[path.split("/", 1)[0]] for path in self.paths]
        self.dataset = LoaderDataset(self.image_root, self.classes, len(self.paths))
        self.batch_size = batch_size
        self.dtype = dtype
        self.channels_last = channels_last
        self.indices = list(range(self.shard_id, len(self.paths), self.num_shards))
        self.sampler = EpochSampler(check_epoch, len(self.indices))
        self._pipeline_args = dict(
            decoder_device="mixed" if self._device_id is not None else "cpu",
            image_size=image_size, resize_size=resize_size, interpolation=interpolation,
            mean=mean, std=std,
            dtype=dali_image_dtype(dtype), channels_last=channels_last,
            adjust_orientation=adjust_orientation, jpeg_fancy_upsampling=jpeg_fancy_upsampling,
            batch_size=batch_size, num_threads=num_threads or cpu_share(),
            device_id=self._device_id, seed=0)

    @classmethod
    def from_torchvision_args(cls, args: Any, **overrides: Any) -> "ValLoader":
        """The loader of torchvision's references/classification/train.py flags; keyword
        arguments override the mapped ones (docs/switching.md)."""
        from dali_relabel.loading.script_args import torchvision_val_kwargs

        return cls(**torchvision_val_kwargs(args, **overrides))

    @classmethod
    def from_timm_args(cls, args: Any, data_config: Mapping[str, Any], *, device: Any,
                       **overrides: Any) -> "ValLoader":
        """The loader of timm's train.py flags and its resolved data_config; keyword
        arguments override the mapped ones (docs/switching.md)."""
        from dali_relabel.loading.script_args import timm_val_kwargs

        return cls(**timm_val_kwargs(args, data_config, device=device, **overrides))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
        batch = 0
        try:
            for outputs in iterator:
                out = outputs[0]
                images = finish_images(out["images"], self.device, self.dtype,
                                       self.channels_last)
                batch += 1
                yield images, _transfer.to_device(out["labels"].view(-1).to(torch.int64),
                                                  self.device)
        except RuntimeError as error:
            raise RuntimeError(self._diagnose(batch, error)) from error

    def _diagnose(self, batch: int, error: RuntimeError) -> str:
        """Why DALI failed, naming the files of the batches in flight that do not decode."""
        from dali_relabel.images.verify import verify_images  # only on failure

        first = batch * self.batch_size
        paths = [self.paths[i] for i in self.indices[first:first + 4 * self.batch_size]]
        bad = verify_images(self.image_root, paths, num_threads=1, progress=False)
        if not bad:
            return f"the DALI validation pipeline failed: {error}"
        listing = "; ".join(f"{path}: {reason}" for path, reason in bad[:_SHOWN_PATHS])
        return (f"{len(bad)} validation image(s) failed to decode: {listing}. Find every such "
                f"file with `dali-relabel verify {self.image_root}` and pass the list as "
                "exclude=.")
