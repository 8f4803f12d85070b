"""Loader benchmark: what ReLabel's localized targets cost against the loaders people use.

Images per second of whole training batches, measured side by side on one machine, over the
same JPEG files, with the same number of CPU threads / DataLoader workers W = T:

  (a) official        the naver-ai/relabel_imagenet input pipeline (Yun et al., CVPR 2021),
                      reproduced here: a torchvision ImageFolder whose __getitem__ opens the
                      JPEG with PIL, applies RandomResizedCrop returning its coordinates, a
                      horizontal flip, ToTensor and Normalize, and torch.load()s the image's own
                      [2, 5, 15, 15] `.pt` label map; a DataLoader (W workers, shuffle,
                      drop_last, persistent workers); then, per batch in the main process, the
                      official target code: densify into zeros [B, 1000, 15, 15] with a
                      scatter_ per sample, torchvision roi_align (1x1), softmax
  (b) plain DALI      the loader one would write without ReLabel, images only:
                      fn.readers.file (shuffled) -> fn.decoders.image_random_crop ->
                      fn.resize(224, antialias) -> fn.crop_mirror_normalize (random flip) ->
                      DALIGenericIterator
  (c) ReLabelLoader   dali_relabel.ReLabelLoader over the same images with an HDF5 store of the
                      same maps (with /sizes): the epoch plan fixes the order and every window
                      on the host, a file reader reads the files in plan order, DALI
                      ROI-decodes the windows, LabelPooling makes the targets; the same
                      decoder settings as (b). ReLabel's cost is 1 - (c) / (b), measured in
                      paired segments (below).
  (d) bare decode     a DALI pipeline that only reads and decodes the JPEGs (no crop, no
                      resize) on the same T threads; for reference also PIL decoding
                      (Image.open(path).convert("RGB")) in a DataLoader with W workers

The official transform list also has ColorJitter and a PCA lighting noise; no loader here
applies them, so both are left out, which only favours (a). The official code hands roi_align
its crop as (y1, x1, y2, x2); here the columns are put in torchvision's (x1, y1, x2, y2) order,
the project's convention (same cost, correct targets).

The images are ImageNet-like JPEGs made from real photographs that ship with scikit-image and
scikit-learn (random window, short side 300-500 px, mild sensor noise, JPEG quality 88-96),
generated once into a cache folder with their label maps (one `.pt` file per image for (a), one
HDF5 store for (c), same values) and reused while the generation parameters match. Every file is
read once before timing (warm page cache); warm-up batches (a whole first epoch, then a few)
are not timed, so every method is timed in its second epoch; each method runs alone
(the others' workers and threads are shut down). Rounds alternate the methods, each round
starting one method later, so that noise of a shared machine hits them alike, and the median
round counts. Each timed run first waits
for the machine to be idle, measures the CPU that processes outside the benchmark take
meanwhile (/proc/stat, any PID namespace), and is repeated when that exceeds --max-other-cpu;
the JSON records it per method.

Rounds of whole loaders give each method's images/s, but a shared machine's speed drifts by
several percent between them, more than ReLabel's cost. So (b) and (c) are then built side by
side and, after an untimed epoch each, take turns in short segments (--segment-batches timed
batches, about a second): each pair of adjacent segments gives one ratio of (c) to (b), and
ReLabel's cost is the geometric mean of --pairs such ratios, with a 95% interval. It also
records how long the epoch plan takes for ImageNet's 1,281,167 images. Writes JSON and a PNG
to benchmarks/results/.

    python benchmarks/loader_bench.py [--device cuda|cpu] [--threads T] [--images N]
"""
import argparse
import concurrent.futures
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402
from torchvision.transforms import functional as torchvision_F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import nvidia.dali as dali  # noqa: E402
import nvidia.dali.fn as fn  # noqa: E402
import nvidia.dali.types as types  # noqa: E402
from nvidia.dali import pipeline_def  # noqa: E402

import dali_relabel  # noqa: E402
from dali_relabel import pipeline as relabel_pipeline  # noqa: E402
from dali_relabel.loading.train_loader import ReLabelLoader  # noqa: E402
from dali_relabel.loading.plan import EpochPlanner  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import mean_interval  # noqa: E402

logger = logging.getLogger("loader_bench")

NUM_CLASSES = 1000
TOPK = 5
MAP_SIZE = 15
CLASS_FOLDERS = 10
CLASSES_PER_IMAGE = 8  # distinct classes in one image's label map (its own + 7 others)
IMAGE_SIZE = 224
IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)
# Generation parameters of the ImageNet-like JPEGs (part of the cache manifest).
SHORT_SIDE = (300, 500)
JPEG_QUALITY = (88, 96)
NOISE_SIGMA = (2.0, 4.0)
WINDOW_AREA = (0.35, 1.0)
WINDOW_ASPECT = (0.66, 1.5)
GENERATOR_VERSION = 2  # 2: the store records the image sizes (/sizes)
# skimage.data colour photographs and the files they read; used only when every file ships
# inside the installed scikit-image (the others would be downloaded with pooch: never).
SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut.png",),
    "coffee": ("coffee.png",),
    "chelsea": ("chelsea.png",),
    "rocket": ("rocket.jpg",),
    "hubble_deep_field": ("hubble_deep_field.jpg",),
    "immunohistochemistry": ("ihc.png",),
    "retina": ("retina.jpg",),
    "stereo_motorcycle": ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz"),
}
METHODS = ("official", "plain_dali", "relabel_loader", "dali_decode", "pil_decode")
METHOD_NAMES = {
    "official": "(a) official: PIL + .pt files + dense roi_align",
    "plain_dali": "(b) plain DALI graph, images only",
    "relabel_loader": "(c) ReLabelLoader: DALI + LabelPooling",
    "dali_decode": "(d) DALI bare decode",
    "pil_decode": "(d') PIL bare decode, DataLoader",
}
IMAGENET_TRAIN_IMAGES = 1_281_167
SPREAD_WARNING_PERCENT = 15.0
# The paired comparison: ReLabel's cost is measured against this loader.
PAIRED = ("relabel_loader", "plain_dali")
SEGMENT_PAUSE_S = 0.25  # a loader left idle still prepares the batches its queue has room for
SEGMENT_DRAIN = 2  # batches a loader has prefetched when its turn comes (both: queue depth 2)


# ---------------------------------------------------------------------------------------------
# Data: ImageNet-like JPEGs, .pt label maps (official layout) and the HDF5 store
# ---------------------------------------------------------------------------------------------

def load_photos() -> List[Tuple[str, np.ndarray]]:
    """Colour photographs shipped inside scikit-image and scikit-learn, never downloaded.

    Returns (name, uint8 [H, W, 3]) pairs; empty when neither package is installed.
    """
    photos: List[Tuple[str, np.ndarray]] = []
    try:
        import skimage.data
    except ImportError:
        logger.warning("scikit-image is not installed: no skimage.data photos")
    else:
        shipped = Path(skimage.data.__file__).parent
        for name, files in SKIMAGE_PHOTOS.items():
            if not all((shipped / file).is_file() for file in files):
                logger.info("skimage.data.%s does not ship with this scikit-image: skipped", name)
                continue
            try:
                image = getattr(skimage.data, name)()
            except Exception as error:  # e.g. ModuleNotFoundError (pooch), ConnectionError
                logger.info("skimage.data.%s unavailable offline (%s): skipped", name,
                            type(error).__name__)
                continue
            if name == "stereo_motorcycle":
                photos += [("motorcycle_left", image[0]), ("motorcycle_right", image[1])]
            else:
                photos.append((name, image))
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        logger.warning("scikit-learn is not installed: no sklearn sample images")
    else:
        bunch = load_sample_images()
        photos += [(Path(path).stem, image) for path, image in zip(bunch.filenames, bunch.images)]
    keep = []
    for name, image in photos:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] >= 3 and image.dtype == np.uint8:
            keep.append((name, np.ascontiguousarray(image[..., :3])))
    return keep


def synthetic_sources(seed: int, count: int = 8) -> List[Tuple[str, np.ndarray]]:
    """Textured colour images (smoothed blocky noise over colour gradients), 480 x 640."""
    rng = np.random.default_rng([seed, 1])
    sources = []
    for n in range(count):
        blocks = (rng.random((rng.integers(6, 60), rng.integers(8, 80), 3)) * 255).astype(np.uint8)
        texture = np.asarray(Image.fromarray(blocks).resize((640, 480), Image.BICUBIC), np.float32)
        ramp = np.linspace(0, 1, 640, dtype=np.float32)[None, :, None] * rng.random(3) * 120
        image = np.clip(0.7 * texture + ramp, 0, 255).astype(np.uint8)
        sources.append((f"synthetic_{n}", image))
    return sources


_SOURCES: List[Tuple[str, np.ndarray]] = []


def _init_worker(sources: List[Tuple[str, np.ndarray]]) -> None:
    global _SOURCES
    _SOURCES = sources
    torch.set_num_threads(1)


def _make_image(task: Tuple[int, int, str]) -> Tuple[int, int, int, int]:
    """Writes one ImageNet-like JPEG; returns (index, bytes, width, height)."""
    index, seed, path = task
    rng = np.random.default_rng([seed, index])
    _, source = _SOURCES[rng.integers(len(_SOURCES))]
    src_h, src_w = source.shape[:2]
    area = src_h * src_w * rng.uniform(*WINDOW_AREA)
    aspect = math.exp(rng.uniform(math.log(WINDOW_ASPECT[0]), math.log(WINDOW_ASPECT[1])))
    w = int(min(src_w, round(math.sqrt(area * aspect))))
    h = int(min(src_h, round(math.sqrt(area / aspect))))
    x0 = int(rng.integers(0, src_w - w + 1))
    y0 = int(rng.integers(0, src_h - h + 1))
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray(source[y0:y0 + h, x0:x0 + w]).resize(size, Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), pixels.shape).astype(np.float32)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)
    return index, os.path.getsize(path), size[0], size[1]


def make_label_maps(num_images: int, labels: np.ndarray, seed: int
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Random top-k maps shaped like an annotator's (as tests/conftest.py makes them): each image
    draws a small pool of classes (its own label first), every cell lists TOPK distinct ones,
    values sorted descending. Values are float16, so the .pt files (float32) and the HDF5
    store (float16) hold exactly the same numbers."""
    rng = np.random.default_rng([seed, 2])
    cells = (num_images, MAP_SIZE, MAP_SIZE)
    others = rng.random((num_images, NUM_CLASSES)).argsort(axis=1)
    pools = np.empty((num_images, CLASSES_PER_IMAGE), dtype=np.int64)
    for n in range(num_images):
        row = others[n][others[n] != labels[n]][:CLASSES_PER_IMAGE - 1]
        pools[n] = np.concatenate([[labels[n]], row])
    picks = rng.random((*cells, CLASSES_PER_IMAGE)).argsort(axis=-1)[..., :TOPK]
    indices = np.take_along_axis(pools[:, None, None, :].repeat(MAP_SIZE, 1).repeat(MAP_SIZE, 2),
                                 picks, axis=-1)
    values = -np.sort(-(rng.standard_normal((*cells, TOPK)) * 4), axis=-1)
    return (values.transpose(0, 3, 1, 2).astype(np.float16),
            indices.transpose(0, 3, 1, 2).astype(np.int16))


def dataset_params(num_images: int, source: str, source_names: Sequence[str], seed: int) -> Dict:
    return dict(generator_version=GENERATOR_VERSION, num_images=num_images, source=source,
                source_names=list(source_names), seed=seed, class_folders=CLASS_FOLDERS,
                num_classes=NUM_CLASSES, topk=TOPK, map_size=MAP_SIZE,
                classes_per_image=CLASSES_PER_IMAGE, short_side=list(SHORT_SIDE),
                jpeg_quality=list(JPEG_QUALITY), noise_sigma=list(NOISE_SIGMA),
                window_area=list(WINDOW_AREA), window_aspect=list(WINDOW_ASPECT))


def relative_paths(num_images: int) -> List[str]:
    """ImageFolder layout, in the order ImageFolder lists it (class folder, then file name)."""
    paths = [f"n{n % CLASS_FOLDERS:08d}/img_{n:06d}.JPEG" for n in range(num_images)]
    return sorted(paths)


def prepare_dataset(cache: Path, num_images: int, source: str, seed: int,
                    workers: int) -> Dict:
    """The benchmark's images, .pt maps and HDF5 store under `cache`, (re)generated when the
    manifest's parameters differ. Returns the manifest (parameters, paths, sizes)."""
    if source == "photos":
        sources = load_photos()
        if not sources:
            logger.warning("neither scikit-image nor scikit-learn photos are available: falling "
                           "back to synthetic textured images (pip install '.[bench]')")
            source = "synthetic"
    if source == "synthetic":
        sources = synthetic_sources(seed)
    params = dataset_params(num_images, source, [name for name, _ in sources], seed)
    image_root, relabel_root = cache / "images", cache / "relabel"
    store_path, manifest_path = cache / "labelmaps.h5", cache / "manifest.json"
    paths = relative_paths(num_images)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        complete = store_path.is_file() and all(
            (image_root / p).is_file() and (relabel_root / pt_path(p)).is_file() for p in paths)
        if manifest.get("params") == params and complete:
            logger.info("reusing %d cached images in %s", num_images, cache)
            return manifest
        logger.info("cached data in %s was made with other parameters: regenerating", cache)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in (manifest_path, store_path):
        stale.unlink(missing_ok=True)
    for folder in (image_root, relabel_root):
        shutil.rmtree(folder, ignore_errors=True)

    start = time.perf_counter()
    labels = np.array([int(p.split("/")[0][1:]) for p in paths], dtype=np.int64)
    for name in sorted({p.split("/")[0] for p in paths}):
        (image_root / name).mkdir(parents=True, exist_ok=True)
        (relabel_root / name).mkdir(parents=True, exist_ok=True)
    tasks = [(i, seed, str(image_root / p)) for i, p in enumerate(paths)]
    sizes = np.zeros(num_images, dtype=np.int64)
    dims = np.zeros((num_images, 2), dtype=np.int64)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers),
                                                initializer=_init_worker,
                                                initargs=(sources,)) as pool:
        for index, nbytes, width, height in tqdm(
                pool.map(_make_image, tasks, chunksize=16), total=num_images,
                desc="generating JPEGs", unit="img"):
            sizes[index] = nbytes
            dims[index] = (width, height)
    values, indices = make_label_maps(num_images, labels, seed)
    for n, relative in enumerate(tqdm(paths, desc="writing .pt label maps", unit="file")):
        # The official release: one float32 [2, K, H, W] tensor per image (values, classes).
        score_map = torch.stack([torch.from_numpy(values[n]).float(),
                                 torch.from_numpy(indices[n]).float()])
        target = relabel_root / pt_path(relative)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        torch.save(score_map, tmp)
        os.replace(tmp, target)
    dali_relabel.write_labelmaps(store_path, values, indices, labels, paths,
                                 [f"n{c:08d}" for c in range(NUM_CLASSES)],
                                 sizes=dims[:, ::-1], annotator="loader_bench random maps",
                                 source=source)
    manifest = dict(
        params=params,
        generation_seconds=time.perf_counter() - start,
        mean_jpeg_bytes=float(sizes.mean()),
        mean_width=float(dims[:, 0].mean()),
        mean_height=float(dims[:, 1].mean()),
        total_jpeg_bytes=int(sizes.sum()),
    )
    tmp = manifest_path.with_name(manifest_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    logger.info("generated %d images in %.1f s (mean %.1f KB, %.0f x %.0f px)", num_images,
                manifest["generation_seconds"], manifest["mean_jpeg_bytes"] / 1e3,
                manifest["mean_width"], manifest["mean_height"])
    return manifest


def pt_path(relative_image_path: str) -> str:
    """The official code's label-map path for an image: class/stem.pt."""
    return "/".join(relative_image_path.split("/")[-2:]).split(".")[0] + ".pt"


def cache_name(cache: Path) -> str:
    """The cache folder as recorded in the results: under ~ when it is in the home folder."""
    home = Path.home()
    return f"~/{cache.relative_to(home)}" if cache.is_relative_to(home) else str(cache)


def warm_page_cache(folders: Sequence[Path], files: Sequence[Path]) -> int:
    """Reads every file once; returns the bytes read."""
    total = 0
    targets = list(files) + [p for folder in folders for p in sorted(folder.rglob("*"))
                             if p.is_file()]
    for path in targets:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


# ---------------------------------------------------------------------------------------------
# (a) The official ReLabel input pipeline (naver-ai/relabel_imagenet, utils/relabel_functions.py
#     and utils/data_loader.py), minus ColorJitter and lighting
# ---------------------------------------------------------------------------------------------

class RandomResizedCropWithCoords(torchvision.transforms.RandomResizedCrop):
    """RandomResizedCrop that also returns (top/H, left/W, height/H, width/W)."""

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        coords = (i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0])
        return torchvision_F.resized_crop(img, i, j, h, w, self.size, self.interpolation), coords


class ComposeWithCoords(torchvision.transforms.Compose):
    def __call__(self, img):
        coords = None
        for t in self.transforms:
            if isinstance(t, RandomResizedCropWithCoords):
                img, coords = t(img)
            else:
                img = t(img)
        return img, coords


class ImageFolderWithCoordsAndLabelMap(torchvision.datasets.ImageFolder):
    """ImageFolder that loads each image's label map from its own .pt file."""

    def __init__(self, relabel_root: str, **kwargs):
        self.relabel_root = relabel_root
        super().__init__(**kwargs)

    def __getitem__(self, index):
        path, target = self.samples[index]
        score_path = os.path.join(self.relabel_root,
                                  "/".join(path.split("/")[-2:]).split(".")[0] + ".pt")
        sample = self.loader(path)  # PIL: Image.open(f).convert("RGB")
        sample, coords = self.transform(sample)
        score_maps = torch.load(score_path)
        return sample, target, coords, score_maps


def official_dataset(image_root: str, relabel_root: str,
                     image_size: int = IMAGE_SIZE) -> ImageFolderWithCoordsAndLabelMap:
    transform = ComposeWithCoords(transforms=[
        RandomResizedCropWithCoords(size=image_size, scale=(0.08, 1)),  # bilinear
        torchvision.transforms.RandomHorizontalFlip(),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(mean=IMAGENET_MEAN_01, std=IMAGENET_STD_01),
    ])
    return ImageFolderWithCoordsAndLabelMap(relabel_root=relabel_root, root=image_root,
                                            transform=transform)


def official_loader(image_root: str, relabel_root: str, batch_size: int, workers: int,
                    device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        official_dataset(image_root, relabel_root), batch_size=batch_size, shuffle=True,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0)


def official_boxes(coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """Collated crop coordinates -> [B, 4] float32 (x1, y1, x2, y2), normalized.

    As relabel_batch_fn: (top, left, h, w) -> (y1, x1, y2, x2); then, unlike the official
    code, the columns in roi_align's (x1, y1, x2, y2) order (the project's convention).
    """
    coords = torch.cat(coords, 0).view(4, -1).transpose(1, 0)
    coords[:, 2:] += coords[:, :2]
    return coords[:, [1, 0, 3, 2]].float()


def official_targets(label_maps_topk: torch.Tensor, boxes: torch.Tensor,
                     device: torch.device, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The official get_labelmaps + get_relabel: host densify, copy, roi_align, softmax.

    Args:
        label_maps_topk (Tensor[B, 2, K, H, W]): float32 values and class indices, as loaded.
        boxes (Tensor[B, 4]): (x1, y1, x2, y2) normalized, on `device`.
    Returns:
        Tensor[B, C] float32 softmax targets on `device`.
    """
    num_batches = label_maps_topk.size(0)
    sizes = label_maps_topk[0].size()
    label_maps = torch.zeros([num_batches, num_classes, sizes[2], sizes[3]])
    for label_map, label_topk in zip(label_maps, label_maps_topk):
        label_map.scatter_(0, label_topk[1][:, :, :].long(), label_topk[0][:, :, :])
    label_maps = label_maps.to(device)
    target = roi_align(
        input=label_maps,
        boxes=torch.cat([torch.arange(num_batches, device=device).view(num_batches, 1).float(),
                         boxes.float() * label_maps.size(3) - 0.5], 1),
        output_size=(1, 1))
    return torch.nn.functional.softmax(target.view(num_batches, num_classes), 1)


def official_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator:
    while True:
        for images, _, coords, label_maps in loader:
            images = images.to(device, non_blocking=True)
            boxes = official_boxes(coords).to(device, non_blocking=True)
            yield images, official_targets(label_maps, boxes, device)


# ---------------------------------------------------------------------------------------------
# (b) ReLabelLoader and (c) the bare-decode ceilings
# ---------------------------------------------------------------------------------------------

def endless(loader) -> Iterator:
    """Epoch after epoch of a loader (ReLabelLoader or DataLoader) as one stream of batches."""
    while True:
        yield from loader


@pipeline_def
def decode_pipeline(files: Sequence[str], decoder_device: str):
    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=False, dont_use_mmap=True,
                               name="Reader")
    # The decoder settings of ReLabelLoader's graph, minus the crop window.
    return fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                             adjust_orientation=False, jpeg_fancy_upsampling=True)


def dali_decode_batches(pipe) -> Iterator:
    while True:  # the reader wraps around at the end of the file list
        yield pipe.run()


class PILDecodeDataset(torch.utils.data.Dataset):
    """Decodes each file as torchvision's pil_loader does; returns only its size."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        with open(self.files[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return image.size


@pipeline_def
def plain_dali_pipeline(files: Sequence[str], decoder_device: str):
    """The DALI training graph one writes without ReLabel: images only, DALI's own crops."""
    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=True, dont_use_mmap=True,
                               name="Reader")
    images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                           random_area=[0.08, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3])
    images = fn.resize(images, size=[IMAGE_SIZE, IMAGE_SIZE], interp_type=types.INTERP_LINEAR,
                       antialias=True)
    return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(),
                                    mean=list(relabel_pipeline.IMAGENET_MEAN),
                                    std=list(relabel_pipeline.IMAGENET_STD), dtype=types.FLOAT,
                                    output_layout="CHW")


def plain_dali_batches(iterator: DALIGenericIterator) -> Iterator:
    while True:
        for outputs in iterator:
            yield outputs[0]["images"]
        iterator.reset()


def plan_ms(seed: int) -> float:
    """Milliseconds to plan one epoch of ImageNet's training set (order, windows, flips) on
    one rank, for image sizes spread like ImageNet's."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(200, 500, IMAGENET_TRAIN_IMAGES),
                      rng.integers(250, 650, IMAGENET_TRAIN_IMAGES)], axis=1).astype(np.int32)
    planner = EpochPlanner(sizes, np.arange(IMAGENET_TRAIN_IMAGES), batch_size=256, seed=seed,
                           shuffle=True, shard_id=0, num_shards=1, drop_last=True,
                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    planner.plan(0)
    return time_call(lambda: planner.plan(1), lambda: None, repeats=3)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def cpu_snapshot() -> Optional[Tuple[int, int, int]]:
    """(busy jiffies of the machine without steal, steal jiffies, jiffies of this process and
    its descendants, e.g. DataLoader workers); None where /proc is missing (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        parents, own = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            pid = int(entry.name)
            parents[pid] = int(stat[1])
            own[pid] = int(stat[11]) + int(stat[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    busy = sum(fields[:3]) + sum(fields[4:7])  # user nice system (idle) iowait irq softirq
    return busy, fields[7], sum(own.get(pid, 0) for pid in tree)


def other_cpu(before, after, seconds: float) -> Dict:
    """CPU used by processes outside this benchmark (and stolen by the hypervisor) during a
    timed window, in % of the machine's capacity over that window."""
    if before is None or after is None:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    capacity = seconds * (os.cpu_count() or 1)
    foreign = max(0, (after[0] - before[0]) - (after[2] - before[2])) / hz
    steal = (after[1] - before[1]) / hz
    return dict(other_cpu_percent=100 * foreign / capacity, steal_percent=100 * steal / capacity)


def time_batches(batches: Iterator, warmup: int, num_batches: int,
                 sync: Callable[[], None]) -> Dict:
    """Seconds for `num_batches` batches after `warmup` untimed ones."""
    for _ in range(warmup):
        next(batches)
    sync()
    snapshot = cpu_snapshot()
    start = time.perf_counter()
    stamps = []
    for _ in range(num_batches):
        next(batches)
        sync()
        stamps.append(time.perf_counter() - start)
    interference = other_cpu(snapshot, cpu_snapshot(), stamps[-1])
    gaps = np.diff([0.0] + stamps) * 1e3
    return dict(seconds=stamps[-1], batches=num_batches,
                median_batch_ms=float(np.median(gaps)), max_batch_ms=float(gaps.max()),
                **interference)


def time_call(fn_: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of one call, after a warm-up call."""
    fn_()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn_()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def open_method(name: str, data: Dict, args, device: torch.device) -> Tuple[object, Iterator]:
    """Builds the method's loader: (the loader, an endless iterator of its batches)."""
    files = [os.path.join(data["image_root"], p) for p in data["paths"]]
    if name == "official":
        loader = official_loader(data["image_root"], data["relabel_root"], args.batch_size,
                                 args.threads, device)
        return loader, official_batches(loader, device)
    if name == "relabel_loader":
        loader = ReLabelLoader(data["image_root"], data["store"], args.batch_size,
                               device=str(device), num_threads=args.threads, seed=args.seed)
        return loader, endless(loader)
    if name == "plain_dali":
        pipe = plain_dali_pipeline(
            files, decoder_device="mixed" if device.type == "cuda" else "cpu",
            batch_size=args.batch_size, num_threads=args.threads,
            device_id=(device.index or 0) if device.type == "cuda" else None, seed=args.seed)
        pipe.build()
        loader = DALIGenericIterator([pipe], ["images"], reader_name="Reader")
        return loader, plain_dali_batches(loader)
    if name == "dali_decode":
        order = np.random.default_rng(args.seed).permutation(len(files))
        loader = decode_pipeline(
            [files[i] for i in order], decoder_device="mixed" if device.type == "cuda" else "cpu",
            batch_size=args.batch_size, num_threads=args.threads,
            device_id=(device.index or 0) if device.type == "cuda" else None, seed=args.seed)
        loader.build()
        return loader, dali_decode_batches(loader)
    if name == "pil_decode":
        loader = torch.utils.data.DataLoader(
            PILDecodeDataset(files), batch_size=args.batch_size, shuffle=True,
            num_workers=args.threads, drop_last=True, persistent_workers=True)
        return loader, endless(loader)
    raise ValueError(f"unknown method {name!r}")


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run_method(name: str, data: Dict, args, device: torch.device) -> Dict:
    """Builds the method's loader, times it, shuts it down; returns its row."""
    sync = device_sync(device)
    extra: Dict = {}
    loader, batches = open_method(name, data, args, device)
    try:
        row = time_batches(batches, args.warmup, args.batches, sync)
        if name == "relabel_loader":
            # Diagnostic: the share of LabelPooling in a batch (gather from the mmap'ed store,
            # sparse kernel, softmax), on fresh random crops of random rows.
            gen = torch.Generator().manual_seed(args.seed)
            rows = torch.randint(0, len(loader.store), (args.batch_size,), generator=gen)
            boxes = random_boxes(args.batch_size, gen).to(device)
            flip = torch.zeros(args.batch_size, dtype=torch.bool)
            targets = loader.targets
            extra["targets_ms_per_batch"] = time_call(
                lambda: targets(boxes, flip, rows), sync, repeats=20)
    finally:
        batches.close()
        del batches, loader
        gc.collect()
    row.update(extra)
    row["images"] = row["batches"] * args.batch_size
    row["images_per_s"] = row["images"] / row["seconds"]
    return row


def wait_until_idle(max_seconds: float, max_busy_percent: float) -> Optional[float]:
    """Waits (at most `max_seconds`) for a second in which the machine is busy below
    `max_busy_percent`; processes of other PID namespaces count too. Returns the last busy %."""
    busy = None
    deadline = time.perf_counter() + max_seconds
    while True:
        before = cpu_snapshot()
        if before is None:
            return None
        time.sleep(1.0)
        after = cpu_snapshot()
        busy = other_cpu(before, after, 1.0)["other_cpu_percent"]
        if busy <= max_busy_percent or time.perf_counter() >= deadline:
            return busy


def run_clean(name: str, data: Dict, args, device: torch.device) -> Dict:
    """run_method, repeated (up to --retries times) while other processes took more than
    --max-other-cpu % of the machine during the timed window; keeps the cleanest run."""
    attempts = []
    for attempt in range(1 + args.retries):
        if args.wait_idle > 0:
            busy = wait_until_idle(args.wait_idle, args.max_other_cpu)
            if busy is not None and busy > args.max_other_cpu:
                logger.warning("the machine stayed %.0f%% busy for %.0f s; timing %s anyway",
                               busy, args.wait_idle, name)
        row = run_method(name, data, args, device)
        attempts.append(row)
        other = row.get("other_cpu_percent", 0.0) + row.get("steal_percent", 0.0)
        if other <= args.max_other_cpu:
            break
        logger.warning("%s: other processes used %.0f%% of the CPU while it was timed "
                       "(%.0f images/s)%s", name, other, row["images_per_s"],
                       ": timing it again" if attempt < args.retries else "")
    best = min(attempts, key=lambda r: r.get("other_cpu_percent", 0.0)
               + r.get("steal_percent", 0.0))
    return dict(best, attempts=len(attempts))


def paired_segments(data: Dict, args, device: torch.device) -> Dict:
    """ReLabelLoader against the plain DALI graph, closely interleaved.

    Both loaders are built and run one epoch (untimed); then they take turns: each segment
    waits SEGMENT_PAUSE_S for the other loader's prefetching to end, takes the SEGMENT_DRAIN
    batches its own queue holds and times --segment-batches batches. Each pair of adjacent
    segments gives one ratio of images/s, so that the machine's changing speed cancels out;
    the order within a pair alternates. Returns the segments' rates, the ratios and their
    geometric mean with a 95% interval.
    """
    sync = device_sync(device)
    opened = {name: open_method(name, data, args, device) for name in PAIRED}
    rates: Dict[str, List[float]] = {name: [] for name in PAIRED}
    other: List[float] = []
    try:
        for _, batches in opened.values():
            for _ in range(args.images // args.batch_size):
                next(batches)
        for pair in tqdm(range(args.pairs), desc="paired segments", unit="pair"):
            for name in PAIRED if pair % 2 == 0 else PAIRED[::-1]:
                time.sleep(SEGMENT_PAUSE_S)
                row = time_batches(opened[name][1], SEGMENT_DRAIN, args.segment_batches, sync)
                rates[name].append(row["batches"] * args.batch_size / row["seconds"])
                other.append(row.get("other_cpu_percent", 0.0) + row.get("steal_percent", 0.0))
    finally:
        for _, batches in opened.values():
            batches.close()
        del opened
        gc.collect()
    log_ratios = [math.log(r / p) for r, p in zip(rates["relabel_loader"], rates["plain_dali"])]
    interval = mean_interval(log_ratios)
    return dict(pairs=args.pairs, segment_batches=args.segment_batches,
                drained_batches=SEGMENT_DRAIN, pause_s=SEGMENT_PAUSE_S,
                images_per_s={name: statistics.median(values) for name, values in rates.items()},
                segments_images_per_s=rates,
                percent_of_plain=100 * math.exp(interval["mean"]),
                percent_of_plain_ci95=[100 * math.exp(v) for v in interval["ci95"]],
                median_other_cpu_percent=statistics.median(other))


def random_boxes(batch: int, gen: torch.Generator) -> torch.Tensor:
    area = torch.empty(batch).uniform_(0.08, 1.0, generator=gen)
    log_ratio = torch.empty(batch).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    x1 = torch.rand(batch, generator=gen) * (1 - w)
    y1 = torch.rand(batch, generator=gen) * (1 - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def official_targets_ms(data: Dict, args, device: torch.device) -> float:
    """Diagnostic: main-process milliseconds of the official target code for one batch."""
    sync = device_sync(device)
    dataset = official_dataset(data["image_root"], data["relabel_root"])
    samples = [dataset[i] for i in range(args.batch_size)]
    _, _, coords, label_maps = torch.utils.data.default_collate(samples)
    boxes = official_boxes(coords).to(device)
    return time_call(lambda: official_targets(label_maps, boxes, device), sync, repeats=10)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> Dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return dict(
        cpu=model,
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else model,
        platform=platform.platform(),
        python=platform.python_version(),
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
        dali_version=dali.__version__,
        pillow_version=Image.__version__,
        dali_relabel_version=dali_relabel.__version__,
    )


def format_table(result: Dict) -> str:
    methods = result["methods"]
    header = (f"{'method':<50} {'images/s':>9} {'ms/batch':>9} {'x official':>10} "
              f"{'% plain':>8} {'other CPU':>9}  rounds (images/s)")
    lines = [header, "-" * len(header)]
    plain = methods["plain_dali"]["images_per_s"]
    official = methods["official"]["images_per_s"]
    for name in METHODS:
        row = methods[name]
        lines.append(f"{METHOD_NAMES[name]:<50} {row['images_per_s']:>9.1f} "
                     f"{row['median_batch_ms']:>9.1f} {row['images_per_s'] / official:>10.2f} "
                     f"{100 * row['images_per_s'] / plain:>7.1f}% "
                     f"{row.get('other_cpu_percent', float('nan')):>8.1f}%  "
                     + " ".join(f"{rate:.0f}" for rate in row["rounds_images_per_s"]))
    return "\n".join(lines)


def summary_line(summary: Dict) -> str:
    """What ReLabel costs, in words."""
    low, high = summary["percent_of_plain_ci95"]
    return (f"ReLabelLoader against the plain DALI graph, in {summary['pairs']} interleaved "
            f"pairs of segments: {summary['percent_of_plain']:.1f}% of its throughput (95% "
            f"interval {low:.1f}-{high:.1f}%; ReLabel costs "
            f"{summary['relabel_cost_percent']:.1f}%); {summary['ratio_vs_official']:.2f}x "
            "the official pipeline (median rounds)")


def plot(result: Dict, path: Path) -> None:
    methods = result["methods"]
    names = list(METHODS)
    rates = [methods[n]["images_per_s"] for n in names]
    colors = ["tab:red", "tab:purple", "tab:green", "tab:blue", "tab:gray"]
    pairs = result["paired_segments"]
    fig, axes = plt.subplots(1, 2, figsize=(16, 6), gridspec_kw=dict(width_ratios=[3, 2]))
    ax = axes[0]
    bars = ax.bar(range(len(names)), rates, color=colors)
    for bar, rate in zip(bars, rates):
        ax.text(bar.get_x() + bar.get_width() / 2, rate, f"{rate:.0f}", ha="center",
                va="bottom", fontsize=10)
    plain = methods["plain_dali"]["images_per_s"]
    ax.axhline(plain, color="tab:purple", linestyle="--", linewidth=1.2,
               label=f"plain DALI graph: {plain:.0f} images/s")
    summary = result["summary"]
    relabel = names.index("relabel_loader")
    ax.annotate(f"{summary['ratio_vs_official']:.2f}x official",
                xy=(relabel, rates[relabel] + 0.06 * max(rates)),
                xytext=(relabel, rates[relabel] + 0.2 * max(rates)),
                ha="center", fontsize=11, fontweight="bold",
                arrowprops=dict(arrowstyle="->", color="black"))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([METHOD_NAMES[n].replace(": ", ":\n", 1).replace(", ", ",\n", 1)
                        for n in names], fontsize=9)
    ax.set_ylabel("images / s (with targets for (a) and (c)), median round")
    ax.set_ylim(0, 1.4 * max(rates))
    settings = result["settings"]
    dataset = result["dataset"]
    ax.set_title(f"Training loaders on {result['machine']['device']} "
                 f"({settings['threads']} threads/workers, B={settings['batch_size']}, "
                 f"{dataset['num_images']} JPEGs, mean {dataset['mean_jpeg_kb']:.0f} KB)",
                 fontsize=11)
    ax.legend(loc="upper right")
    ax = axes[1]
    segments = pairs["segments_images_per_s"]
    ratios = 100 * np.array(segments["relabel_loader"]) / np.array(segments["plain_dali"])
    ax.plot(np.arange(1, len(ratios) + 1), ratios, "o", color="tab:green", markersize=3,
            alpha=0.6, label="one pair of adjacent segments")
    low, high = summary["percent_of_plain_ci95"]
    ax.axhspan(low, high, color="tab:green", alpha=0.2, label="95% interval")
    ax.axhline(summary["percent_of_plain"], color="tab:green", linewidth=1.5,
               label=f"geometric mean: {summary['percent_of_plain']:.1f}% "
                     f"({low:.1f}-{high:.1f}%)")
    ax.axhline(100, color="tab:purple", linestyle="--", linewidth=1.2,
               label="plain DALI graph")
    ax.set_xlabel(f"pair of segments ({pairs['segment_batches']} timed batches each)")
    ax.set_ylabel("ReLabelLoader, % of the plain DALI graph's images/s")
    ax.set_title("ReLabelLoader against the plain DALI graph, interleaved", fontsize=11)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of images and targets; DALI decodes 'mixed' on cuda "
                             "(default: cuda if present, else cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="DataLoader workers W = DALI threads T = torch threads of the main "
                             f"process (default: os.cpu_count() = {os.cpu_count()})")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--images", type=int, default=6400,
                        help="JPEGs in the benchmark set (default: 6400)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per method and round (default: all full batches of "
                             "one epoch after the warm-up)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches first: one epoch (training runs many, and "
                             "ReLabelLoader checks every image's size in its first), then one "
                             "per DataLoader worker, so no timed batch was prepared during the "
                             "warm-up (default: images // batch-size + max(2, threads))")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all methods; the median round counts (default: 3)")
    parser.add_argument("--pairs", type=int, default=150,
                        help="pairs of interleaved segments of ReLabelLoader and the plain DALI "
                             "graph that measure ReLabel's cost; 0: none (default: 150)")
    parser.add_argument("--segment-batches", type=int, default=18,
                        help="timed batches per segment, after the 2 its loader prefetched "
                             "while the other one ran (default: 18, about a second)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset to run (default: {','.join(METHODS)})")
    parser.add_argument("--source", choices=("photos", "synthetic"), default="photos",
                        help="photos: scikit-image/scikit-learn sample photographs (synthetic "
                             "when neither is installed); synthetic: textured images "
                             "(default: photos)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "dali-relabel" /
                                               "loader_bench"),
                        help="folder of the generated images and label maps "
                             "(default: ~/.cache/dali-relabel/loader_bench)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for loader_bench.json and .png (default: benchmarks/results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and loaders (default: 0)")
    parser.add_argument("--max-other-cpu", type=float, default=10.0,
                        help="time a method again when processes outside the benchmark (any "
                             "PID namespace, read from /proc/stat) used more than this %% of "
                             "the machine while it was timed (default: 10)")
    parser.add_argument("--retries", type=int, default=2,
                        help="extra attempts per method and round under interference; the "
                             "least disturbed one counts (default: 2)")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="before each timed run, wait up to this many seconds for the "
                             "machine to be idle (below --max-other-cpu); 0: do not wait "
                             "(default: 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if min(args.threads, args.batch_size, args.rounds, args.segment_batches) < 1 or min(
            args.retries, args.pairs) < 0 or args.pairs == 1:
        parser.error("--threads, --batch-size, --rounds and --segment-batches must be >= 1, "
                     "--retries >= 0, --pairs 0 or >= 2")
    per_epoch = args.images // args.batch_size
    if args.warmup is None:
        args.warmup = per_epoch + max(2, args.threads)
    if args.batches is None:  # the rest of the second epoch
        args.batches = per_epoch - args.warmup % per_epoch
    if args.batches < 1:
        parser.error(f"--images {args.images} at --batch-size {args.batch_size} leaves no timed "
                     f"batch after {args.warmup} warm-up batches")
    if args.warmup % per_epoch + args.batches > per_epoch:
        logger.warning("%d warm-up + %d timed batches cross the end of an epoch (%d batches): "
                       "the timing includes an epoch restart", args.warmup, args.batches,
                       per_epoch)
    paired = args.pairs > 0 and set(PAIRED) <= set(methods)
    torch.set_num_threads(args.threads)
    # Recorded only: the 1-minute average lags; each timed run instead waits for an idle
    # machine and measures the CPU other processes take while it runs (/proc/stat).
    load_before = os.getloadavg()

    cache = Path(args.cache).expanduser()
    manifest = prepare_dataset(cache, args.images, args.source, args.seed, args.threads)
    paths = relative_paths(args.images)
    data = dict(image_root=str(cache / "images"), relabel_root=str(cache / "relabel"),
                store=str(cache / "labelmaps.h5"), paths=paths)
    folder_samples = [os.path.relpath(p, data["image_root"]).replace(os.sep, "/")
                      for p, _ in official_dataset(data["image_root"],
                                                   data["relabel_root"]).samples]
    with dali_relabel.LabelMapStore.open(data["store"]) as store:
        store_paths = list(store.paths)
    if folder_samples != paths or store_paths != paths:
        raise RuntimeError(f"{cache}: the ImageFolder, the store and the benchmark disagree "
                           "about the image list; delete the cache folder")
    warmed = warm_page_cache([cache / "images", cache / "relabel"], [cache / "labelmaps.h5"])
    logger.info("page cache warmed: read %.1f MB", warmed / 1e6)

    rounds: Dict[str, List[Dict]] = {m: [] for m in methods}
    # Each round starts one method later, so that no method always follows the same one.
    runs = [(r, m) for r in range(args.rounds)
            for m in methods[r % len(methods):] + methods[:r % len(methods)]]
    for _, name in tqdm(runs, desc="loader_bench", unit="run"):
        rounds[name].append(run_clean(name, data, args, device))
    rows = {}
    for name, runs_of in rounds.items():
        ordered = sorted(runs_of, key=lambda r: r["images_per_s"])
        rates = [r["images_per_s"] for r in runs_of]
        median = ordered[(len(ordered) - 1) // 2]
        rows[name] = dict(median, rounds_images_per_s=rates,
                          rounds_spread_percent=100 * (max(rates) - min(rates))
                          / median["images_per_s"])
        if rows[name]["rounds_spread_percent"] > SPREAD_WARNING_PERCENT:
            logger.warning("%s: the rounds differ by %.0f%% (%s images/s); the median round "
                           "counts", name,
                           rows[name]["rounds_spread_percent"],
                           ", ".join(f"{rate:.0f}" for rate in rates))
    if "official" in rows:
        rows["official"]["targets_ms_per_batch"] = official_targets_ms(data, args, device)
    summary: Dict = dict(plan_ms_imagenet=plan_ms(args.seed))
    rate = {name: row["images_per_s"] for name, row in rows.items()}
    pairs = paired_segments(data, args, device) if paired else None
    if pairs is not None:
        summary.update(percent_of_plain=pairs["percent_of_plain"],
                       percent_of_plain_ci95=pairs["percent_of_plain_ci95"],
                       relabel_cost_percent=100 - pairs["percent_of_plain"], pairs=args.pairs)
    if {"official", "relabel_loader"} <= rate.keys():
        summary["ratio_vs_official"] = rate["relabel_loader"] / rate["official"]
    if {"dali_decode", "relabel_loader"} <= rate.keys():
        summary["percent_of_bare_decode"] = 100 * rate["relabel_loader"] / rate["dali_decode"]
    result = dict(
        machine=machine_info(device),
        settings=dict(threads=args.threads, dataloader_workers=args.threads,
                      dali_threads=args.threads, torch_threads=torch.get_num_threads(),
                      batch_size=args.batch_size, warmup_batches=args.warmup,
                      timed_batches=args.batches, rounds=args.rounds,
                      max_other_cpu_percent=args.max_other_cpu, retries=args.retries,
                      wait_idle_seconds=args.wait_idle, image_size=IMAGE_SIZE,
                      seed=args.seed, cache=cache_name(cache),
                      load_average_before=load_before, load_average_after=os.getloadavg()),
        dataset=dict(num_images=args.images, source=manifest["params"]["source"],
                     source_photos=manifest["params"]["source_names"],
                     mean_jpeg_kb=manifest["mean_jpeg_bytes"] / 1e3,
                     mean_width=manifest["mean_width"], mean_height=manifest["mean_height"],
                     class_folders=CLASS_FOLDERS, num_classes=NUM_CLASSES, topk=TOPK,
                     map_size=MAP_SIZE, classes_per_image=CLASSES_PER_IMAGE,
                     generation=manifest["params"]),
        methods=rows,
        paired_segments=pairs,
        summary=summary,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_bench.json").write_text(json.dumps(result, indent=2))
    complete = set(METHODS) <= rows.keys() and pairs is not None
    if complete:
        plot(result, out / "loader_bench.png")
        logger.info(format_table(result))
    else:
        for name, row in rows.items():
            logger.info("%-50s %9.1f images/s", METHOD_NAMES[name], row["images_per_s"])

    logger.info("\n%d JPEGs (%s, mean %.1f KB, %.0f x %.0f px), B=%d, %d threads/workers on %s, "
                "%d warm-up + %d timed batches x %d round(s)", args.images,
                result["dataset"]["source"], result["dataset"]["mean_jpeg_kb"],
                manifest["mean_width"], manifest["mean_height"], args.batch_size, args.threads,
                device, args.warmup, args.batches, args.rounds)
    if "targets_ms_per_batch" in rows.get("official", {}):
        logger.info("targets alone, per batch of %d: official %.2f ms (main process)%s",
                    args.batch_size, rows["official"]["targets_ms_per_batch"],
                    f", ReLabelLoader {rows['relabel_loader']['targets_ms_per_batch']:.2f} ms"
                    if "relabel_loader" in rows else "")
    if {"percent_of_plain", "ratio_vs_official"} <= summary.keys():
        logger.info(summary_line(summary))
    logger.info("planning one epoch of ImageNet (%d images) on one rank: %.0f ms",
                IMAGENET_TRAIN_IMAGES, summary["plan_ms_imagenet"])
    logger.info("wrote %s%s", out / "loader_bench.json",
                f" and {out / 'loader_bench.png'}" if complete else "")
    return result


if __name__ == "__main__":
    main()
