"""The machine annotator: ReLabel label maps for any image folder from a timm classifier.

Re-labelling, as Yun et al. do it ("Re-labeling ImageNet: from Single to Multi-Labels, from
Global to Localized Labels", CVPR 2021): a classifier whose head is global average pooling
followed by a linear layer is run fully-convolutionally. The linear layer (weights
W in R^{C x D}, bias b) is applied at every position of the feature map as a 1x1 convolution,

    L[c, i, j] = W[c] . F[:, i, j] + b[c],

so the map's spatial mean is exactly the classifier's own logits. Each image is resized whole
to `input_size` x `input_size` (no crop; the paper: 475), the map is brought to
`map_size` x `map_size` (the paper: 15) and the top-k classes of every cell are kept.

Resizing the map, when the network's h x w differs from `map_size`: larger maps are reduced
by adaptive average pooling of the logits (linear, so a cell holds the classifier applied to
its region's mean feature), smaller ones are enlarged bilinearly (align_corners=False).

Supported: timm models whose `forward_head` equals the classifier applied to the spatial mean
of `forward_features` (ResNet, EfficientNet, RegNet, DenseNet, ...). Others (a norm layer or
an MLP after the pooling, max pooling, token-based ViTs) are refused: there is no exact
per-position equivalent. This is checked numerically, not by name.

Several processes (torchrun) split the images by rank (row r goes to rank r % world). HDF5
without MPI allows one writer per file, so each rank writes its own resumable part file
`OUT.rank{r}-of-{world}` through `LabelMapWriter`; after a barrier rank 0 merges the parts
into OUT (also resumably) and deletes them. Every rank only reads images and writes its
own file, and a restart with the same number of processes continues every part.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config
from timm.data.transforms import str_to_pil_interp
from torch import nn
from tqdm import tqdm

import dali_relabel
from dali_relabel import _checks, _system
from dali_relabel.files import check_output_path
from dali_relabel.images.files import find_images, open_rgb_image
from dali_relabel.images.path_lists import read_path_list
from dali_relabel.labelmaps import LabelMapStore
from dali_relabel.labelmaps.writer import LabelMapWriter
from dali_relabel.tools.jobs import (
    PARTIAL_SUFFIX,
    check_complete,
    check_resumable,
    default_workers,
    unwritten_rows,
    utc_now,
)

__all__ = ["FullyConvolutionalAnnotator", "annotate", "load_classifier"]

logger = logging.getLogger(__name__)

# How long the ranks wait for each other before rank 0 merges (ranks that resumed may be
# far ahead of the others).
BARRIER_TIMEOUT = datetime.timedelta(days=7)
# A head counts as "global average pooling + linear" when forward_head matches the linear
# layer on the mean feature to this tolerance, relative to the logits' magnitude.
HEAD_TOLERANCE = 1e-3
_MERGE_ROWS = 8192
_HASH_BLOCK = 1 << 20
# Bounds of the sizes: beyond them a batch of images, or the maps, would not fit anywhere.
MAX_INPUT_SIZE = 4096
MAX_MAP_SIZE = 1024
# A batch of float32 images is held twice (the loader's and the device's copy).
_BATCH_COPIES = 2


def load_classifier(
    model: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Creates a timm classifier with its weights, in eval mode, on the CPU.

    Args:
        model: timm model name, e.g. "resnet50".
        checkpoint: Weights to load (a state dict, possibly under "state_dict", "model" or
            "state_dict_ema", as timm saves them). The number of classes is taken from its
            classifier.
        pretrained: Use timm's pretrained weights (downloaded by timm; needs network).

    Returns:
        The model.

    Raises:
        ValueError: Not exactly one of checkpoint and pretrained, an unknown model, or a
            checkpoint that is missing or does not fit the model.
    """
    if (checkpoint is None) == (not pretrained):
        raise ValueError("weights: pass exactly one of checkpoint (--checkpoint FILE) and "
                         "pretrained (--pretrained); a randomly initialised model makes "
                         "meaningless label maps")
    if not timm.is_model(model):
        raise ValueError(f"model: timm has no model {model!r} (see timm.list_models())")
    net = timm.create_model(model, pretrained=pretrained)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint {checkpoint}: no such file")
        try:
            state = timm.models.load_state_dict(checkpoint, weights_only=True)
        except Exception as e:  # torch.load raises many kinds on a damaged file
            raise ValueError(f"checkpoint {checkpoint}: cannot load it ({e})") from e
        classifier = _module_name(net, net.get_classifier())
        key = f"{classifier}.weight"
        if key not in state:
            raise ValueError(f"checkpoint {checkpoint}: has no {key!r}, the classifier of "
                             f"timm model {model!r}; is it a checkpoint of this model?")
        num_classes = state[key].shape[0]
        if num_classes != net.num_classes:
            net.reset_classifier(num_classes)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {checkpoint}: does not fit timm model {model!r}: "
                             f"{e}") from e
    return net.eval()


def _module_name(net: nn.Module, module: nn.Module) -> str:
    for name, candidate in net.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"the classifier of {type(net).__name__} is not one of its modules")


class FullyConvolutionalAnnotator(nn.Module):
    """A timm classifier with its linear head applied at every feature-map position.

    `forward(images)` returns float32 logits [B, C, map_size, map_size]. The backbone runs
    under bf16 autocast on CUDA; the 1x1 convolution and the resizing run in float32.

    Args:
        classifier: A timm model whose head is global average pooling + a linear layer.
        map_size: Side of the label map.

    Raises:
        ValueError: The model's classifier is not a linear layer.
    """

    def __init__(self, classifier: nn.Module, *, map_size: int) -> None:
        super().__init__()
        fc = classifier.get_classifier()
        if not isinstance(fc, nn.Linear):
            raise ValueError(
                f"model: the classifier of {type(classifier).__name__} is "
                f"{type(fc).__name__}, not a linear layer; only heads made of global average "
                "pooling + linear can be applied per position")
        self.classifier = classifier
        self.fc = fc
        self.map_size = map_size

    @property
    def num_classes(self) -> int:
        """C, the classifier's number of classes."""
        return self.fc.out_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map [B, D, h, w], float32 (computed in bf16 on CUDA)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            features = self.classifier.forward_features(images)
        self._check_feature_map(features)
        return features.float()

    def _check_feature_map(self, features: torch.Tensor) -> None:
        if features.dim() != 4 or features.shape[1] != self.fc.in_features:
            raise ValueError(
                f"model: forward_features of {type(self.classifier).__name__} gives "
                f"{list(features.shape)}, expected a feature map [B, {self.fc.in_features}, "
                "h, w] (channels first); token-based models are not supported")

    def dense_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier at every position: logits [B, C, h, w] (a 1x1 convolution)."""
        return F.conv2d(features, self.fc.weight.float()[:, :, None, None],
                        None if self.fc.bias is None else self.fc.bias.float())

    def resampling(self, height: int, width: int) -> str:
        """How an h x w logit map becomes map_size x map_size: "none",
        "adaptive-avg-pool" (larger maps) or "bilinear" (smaller ones)."""
        if (height, width) == (self.map_size, self.map_size):
            return "none"
        return "adaptive-avg-pool" if min(height, width) >= self.map_size else "bilinear"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.dense_logits(self.features(images))
        resampling = self.resampling(*logits.shape[-2:])
        if resampling == "none":
            return logits
        if resampling == "adaptive-avg-pool":
            return F.adaptive_avg_pool2d(logits, self.map_size)
        return F.interpolate(logits, size=(self.map_size, self.map_size), mode="bilinear",
                             align_corners=False)

    @torch.inference_mode()
    def check_head(self, input_size: int) -> tuple[int, int]:
        """Checks on a random image that the head is global average pooling + linear.

        Args:
            input_size: Side of the input images.

        Returns:
            (h, w) of the network's feature map at this input size.

        Raises:
            ValueError: The head is something else (the message says what differs).
        """
        device = self.fc.weight.device
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, input_size, input_size, generator=generator).to(device)
        try:
            features = self.classifier.forward_features(images).float()  # float32
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ValueError(f"input_size: {type(self.classifier).__name__} fails on "
                             f"{input_size} x {input_size} images ({e})") from e
        self._check_feature_map(features)
        want = self.classifier.forward_head(features).float()
        got = self.dense_logits(features).mean(dim=(2, 3))
        error = float((want - got).abs().max())
        if error > HEAD_TOLERANCE * max(1.0, float(want.abs().max())):
            raise ValueError(
                f"model: the head of {type(self.classifier).__name__} is not global average "
                f"pooling + linear (its logits differ from the linear layer on the mean feature "
                f"by {error:.3g}; e.g. a norm layer or an MLP after the pooling); it cannot be "
                "applied per position")
        return int(features.shape[2]), int(features.shape[3])


class _ImageFiles(torch.utils.data.Dataset):
    """Images resized whole to a square and normalized, with their row ids."""

    def __init__(self, image_root: str, paths: Sequence[str], rows: np.ndarray, *,
                 input_size: int, interpolation: str, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.image_root = image_root
        self.paths = list(paths)
        self.rows = rows
        self.size = input_size
        self.resample = str_to_pil_interp(interpolation)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, str]:
        """(row, normalized pixels [3, S, S], the image's (height, width) as decoded, "" or
        what went wrong reading the image).

        A bad image is reported as data, not raised in a worker process, so that the job
        stops with one clear message naming the file. Images of any size are decoded, as
        `dali-relabel verify` and the loaders (DALI) decode them.
        """
        path = os.path.join(self.image_root, self.paths[i])
        try:
            image = open_rgb_image(path)
        except ValueError as e:
            return (int(self.rows[i]), torch.zeros(3, self.size, self.size),
                    torch.ones(2, dtype=torch.int32), str(e))
        size = torch.tensor([image.height, image.width], dtype=torch.int32)
        image = image.resize((self.size, self.size), self.resample)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return int(self.rows[i]), (pixels / 255.0 - self.mean) / self.std, size, ""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_names(classes: Sequence[str] | None, folders: list[str], net: nn.Module,
                 num_classes: int, image_root: str) -> list[str]:
    """The names of the model's classes, in index order."""
    if classes is not None:
        classes = list(classes)
        if len(classes) != num_classes:
            raise ValueError(f"classes: {len(classes)} names given, the model has "
                             f"{num_classes} classes")
        return classes
    if len(folders) == num_classes:
        return folders
    subset = infer_imagenet_subset(net)
    if subset is not None and ImageNetInfo(subset).num_classes() == num_classes:
        logger.info("naming the model's %d classes with timm's %s synsets", num_classes, subset)
        return list(ImageNetInfo(subset).label_names())
    raise ValueError(f"classes: the model has {num_classes} classes but {image_root} has "
                     f"{len(folders)} class folders; pass the model's class names in index "
                     "order (--classes FILE, one per line)")


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        # Only barriers are exchanged, so gloo serves GPU jobs as well.
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'cuda' (or 'cuda:N') or 'cpu', got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device must be an available device: {str(device)!r} was asked "
                             f"for but CUDA is not available (no NVIDIA GPU or driver); pass "
                             f"device='cpu'")
        if device.index is None:  # under torchrun: this process's GPU
            device = torch.device("cuda", _system.local_cuda_index())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cuda' (or 'cuda:N') or 'cpu', got {str(device)!r}")
    return device


def _check_batch_memory(input_size: int, batch_size: int) -> None:
    """Refuses a batch of input images that cannot fit in memory, before the model loads."""
    need = _BATCH_COPIES * batch_size * 3 * input_size * input_size * 4
    available = _system.available_memory()
    if need > available:
        raise ValueError(f"input_size must fit a batch in memory: {batch_size} images of "
                         f"{input_size} x {input_size} need about "
                         f"{_system.format_bytes(need)}, {_system.format_bytes(available)} "
                         f"are available; lower input_size or batch_size")


def annotate(
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    input_size: int = 475,
    map_size: int = 15,
    topk: int = 5,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    classes: Sequence[str] | None = None,
    exclude: str | os.PathLike | Sequence[str] | None = None,
    progress: bool = True,
) -> None:
    """Writes the label maps of every image of an ImageFolder tree to one HDF5 file.

    Rows follow the ImageFolder order (class folder, then file name); /labels holds each
    image's folder as an index into the model's classes (-1 when the folder is not one of
    them). Images are read with PIL without applying EXIF orientation, as the loaders read
    them by default. An interrupted job continues where it stopped when rerun with the same
    settings; under torchrun every rank annotates its share (see the module docstring).

    Args:
        image_root: ImageFolder root (one folder per class).
        out: The label-map file to write; must not exist yet, unless an earlier run of the
            same job (same images and settings) completed it: then nothing is done.
        model: timm model name; its head must be global average pooling + linear.
        checkpoint: Weights of the model (exclusive with `pretrained`).
        pretrained: Use timm's pretrained weights (timm downloads them).
        input_size: Side the whole image is resized to, 1 to 4096 (default: 475, as in the
            paper).
        map_size: Side of the stored maps, 1 to 1024 (default: 15).
        topk: Classes kept per cell (default: 5).
        batch_size: Images per forward pass.
        num_workers: Image-loading processes (default: this process's share of the CPUs,
            at most 8; 0 loads in the main process).
        device: "cuda" (bf16 autocast) or "cpu"; default "cuda" if available. Under
            torchrun "cuda" means the process's LOCAL_RANK GPU.
        classes: The model's class names in index order. Default: the class folders when
            there are as many as the model has classes, else timm's ImageNet synsets for an
            ImageNet-sized model.
        exclude: Relative image paths to leave out, or a file listing them (e.g. from
            `dali-relabel verify`).
        progress: Show a progress bar (on a terminal).

    Raises:
        ValueError: A bad argument, an unsupported model, an unreadable image, or an earlier
            partial run made with other settings.
        FileNotFoundError: image_root is not a directory.
    """
    _checks.check_int("input_size", input_size, 1, MAX_INPUT_SIZE)
    _checks.check_int("map_size", map_size, 1, MAX_MAP_SIZE)
    _checks.check_int("topk", topk, 1)
    _checks.check_int("batch_size", batch_size, 1)
    if num_workers is None:
        num_workers = default_workers()
    _checks.check_int("num_workers", num_workers, 0)
    _check_batch_memory(input_size, batch_size)
    image_root = _checks.check_path_arg("image_root", image_root, kind="folder")
    out = check_output_path(out, argument="out")
    # Names no image list can hold, and what is not a regular file, are left out here, at
    # the start (with a warning), as every tool leaves them out.
    paths, folders = find_images(image_root)
    excluded = set(read_path_list(exclude))
    paths = [path for path in paths if path not in excluded]
    if not paths:
        raise ValueError(f"image_root: no image files in the class folders of {image_root}")
    device = _resolve_device(device)

    net = load_classifier(model, checkpoint=checkpoint, pretrained=pretrained)
    annotator = FullyConvolutionalAnnotator(net, map_size=map_size).to(device).eval()
    if topk > annotator.num_classes:
        raise ValueError(f"topk: {topk} is more than the model's {annotator.num_classes} "
                         "classes")
    native = annotator.check_head(input_size)
    names = _class_names(classes, folders, net, annotator.num_classes, image_root)
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index.get(path.split("/", 1)[0], -1) for path in paths], dtype=np.int64)
    unknown = int(np.count_nonzero(labels < 0))
    if unknown:
        logger.warning("%d of %d images are in folders that are not classes of the model; "
                       "their /labels are -1", unknown, len(paths))
    data = resolve_data_config({}, model=net)
    identity = dict(annotator="timm fully-convolutional", model=model,
                    weights="checkpoint" if checkpoint is not None else "timm-pretrained",
                    checkpoint_sha256=_sha256(os.fspath(checkpoint)) if checkpoint else "",
                    input_size=input_size, interpolation=str(data["interpolation"]),
                    feature_map=f"{native[0]}x{native[1]}",
                    map_resample=annotator.resampling(*native))
    if os.path.lexists(out):
        # An earlier run of this very job finished it (and was stopped before it said so).
        check_complete(out, paths=paths, identity=identity, argument="out")
        logger.info("%s: complete from an earlier run of the same job; nothing to do", out)
        return
    attrs = dict(identity, checkpoint=os.path.abspath(checkpoint) if checkpoint else "",
                 image_root=os.path.abspath(image_root), software=f"dali-relabel "
                 f"{dali_relabel.__version__} annotate")
    job = _Job(image_root=image_root, paths=paths, labels=labels, classes=names,
               annotator=annotator, device=device, topk=topk, batch_size=batch_size,
               num_workers=num_workers, identity=identity, attrs=attrs, progress=progress,
               dataset_args=dict(input_size=input_size, interpolation=data["interpolation"],
                                 mean=data["mean"], std=data["std"]))

    rank, world, started = _distributed()
    try:
        if world == 1:
            job.annotate(out, np.arange(len(paths)), desc="annotate")
            return
        rows = np.arange(rank, len(paths), world)
        if len(rows):
            job.annotate(_part_path(out, rank, world), rows, desc=f"annotate rank {rank}")
        dist.barrier()
        if rank == 0:
            job.merge(out, world)
    finally:
        if started:
            dist.destroy_process_group()


def _part_path(out: str, rank: int, world: int) -> str:
    return f"{out}.rank{rank}-of-{world}"


class _Job:
    """One annotation run: the inputs shared by the rank files and the merge."""

    def __init__(self, *, image_root: str, paths: list[str], labels: np.ndarray,
                 classes: list[str], annotator: FullyConvolutionalAnnotator,
                 device: torch.device, topk: int, batch_size: int, num_workers: int,
                 identity: dict, attrs: dict, progress: bool, dataset_args: dict) -> None:
        self.image_root = image_root
        self.paths = paths
        self.labels = labels
        self.classes = classes
        self.annotator = annotator
        self.device = device
        self.topk = topk
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.identity = identity
        self.attrs = attrs
        self.progress = progress
        self.dataset_args = dataset_args

    def _writer(self, path: str, rows: np.ndarray) -> LabelMapWriter:
        """The resumable writer of `path` for image rows `rows` (after checking a partial)."""
        paths = [self.paths[row] for row in rows]
        earlier = check_resumable(path + PARTIAL_SUFFIX, paths=paths, identity=self.identity)
        date = earlier["date"] if earlier and "date" in earlier else utc_now()
        size = self.annotator.map_size
        return LabelMapWriter(path, num_rows=len(rows), num_classes=len(self.classes),
                              topk=self.topk, height=size, width=size, classes=self.classes,
                              with_sizes=True, **self.attrs, date=date)

    @torch.inference_mode()
    def annotate(self, path: str, rows: np.ndarray, *, desc: str) -> None:
        """Annotates image rows `rows` into file `path` (row i of the file is rows[i])."""
        if os.path.exists(path):  # a rank's part finished by an earlier run
            check_resumable(path, paths=[self.paths[row] for row in rows],
                            identity=self.identity)
            logger.info("%s: complete from an earlier run", path)
            return
        todo = unwritten_rows(path + PARTIAL_SUFFIX, len(rows))
        dataset = _ImageFiles(self.image_root, [self.paths[rows[i]] for i in todo], todo,
                              **self.dataset_args)
        # The workers are forked here, before the file is opened: forked processes inherit
        # HDF5's lock on an open file, and would hold it for seconds after a kill -9.
        batches = iter(torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda"))
        with self._writer(path, rows) as writer:
            if not np.array_equal(writer.missing(), todo):
                raise ValueError(f"{path}{PARTIAL_SUFFIX}: another process wrote to it while "
                                 "this job started; one job per output file")
            if writer.num_written:
                logger.info("%s: resuming, %d of %d images already done", path,
                            writer.num_written, len(rows))
            with tqdm(total=len(rows), initial=writer.num_written, unit="img", desc=desc,
                      disable=None if self.progress else True) as bar:
                for local, images, sizes, errors in batches:
                    bad = [error for error in errors if error]
                    if bad:
                        raise ValueError(
                            f"{bad[0]}; list the bad images with `dali-relabel verify "
                            f"{self.image_root}` and pass the list as --exclude")
                    logits = self.annotator(images.to(self.device, non_blocking=True))
                    values, indices = logits.topk(self.topk, dim=1)
                    image_rows = rows[local.numpy()]
                    writer.write(local, values, indices, self.labels[image_rows],
                                 [self.paths[row] for row in image_rows], sizes=sizes)
                    bar.update(len(local))

    def merge(self, out: str, world: int) -> None:
        """Rank 0: copies every rank's part into `out`, then deletes the parts."""
        all_rows = np.arange(len(self.paths))
        parts = [_part_path(out, rank, world) for rank in range(min(world, len(self.paths)))]
        with self._writer(out, all_rows) as writer:
            missing = writer.missing()
            with tqdm(total=len(all_rows), initial=writer.num_written, unit="row",
                      desc="merge", disable=None if self.progress else True) as bar:
                for rank, part in enumerate(parts):
                    local = (missing[missing % world == rank] - rank) // world
                    with LabelMapStore.open(part) as store:
                        for start in range(0, len(local), _MERGE_ROWS):
                            chunk = torch.from_numpy(local[start:start + _MERGE_ROWS])
                            writer.write(chunk * world + rank, store.values[chunk],
                                         store.indices[chunk], store.labels[chunk],
                                         [store.paths[i] for i in chunk],
                                         sizes=store.sizes[chunk])
                            bar.update(len(chunk))
            complete = writer.is_complete
        if complete:
            for part in parts:
                os.remove(part)
