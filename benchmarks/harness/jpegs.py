"""The benchmarks' ImageNet-like JPEG set, with its label maps in both layouts: one `.pt`
file per image (the official release's, for the official pipeline) and one HDF5 label-map
file (for ReLabelLoader), holding the same values.

The JPEGs are made from real photographs that ship with scikit-image and scikit-learn (random
window, short side 300-500 px, mild sensor noise, JPEG quality 88-96), or from textured
synthetic images where neither is installed; an ImageFolder of CLASS_FOLDERS class folders.
``prepare_dataset`` generates them once into a cache folder and reuses them while the
generation parameters match; ``locations`` names the parts.
"""
import concurrent.futures
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dali_relabel import write_labelmaps
from dali_relabel.files import atomic_path
from harness.inputs import MAP_SIZE, NUM_CLASSES, TOPK
from harness.official import pt_path

logger = logging.getLogger(__name__)

CLASS_FOLDERS = 10
CLASSES_PER_IMAGE = 8  # distinct classes in one image's label map (its own + 7 others)
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
    write_labelmaps(store_path, values, indices, labels, paths,
                    [f"n{c:08d}" for c in range(NUM_CLASSES)],
                    sizes=dims[:, ::-1], annotator="loader_bench random maps", source=source)
    manifest = dict(
        params=params,
        generation_seconds=time.perf_counter() - start,
        mean_jpeg_bytes=float(sizes.mean()),
        mean_width=float(dims[:, 0].mean()),
        mean_height=float(dims[:, 1].mean()),
        total_jpeg_bytes=int(sizes.sum()),
    )
    with atomic_path(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2))
    logger.info("generated %d images in %.1f s (mean %.1f KB, %.0f x %.0f px)", num_images,
                manifest["generation_seconds"], manifest["mean_jpeg_bytes"] / 1e3,
                manifest["mean_width"], manifest["mean_height"])
    return manifest


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


def locations(cache: Path, num_images: int) -> Dict:
    """Where prepare_dataset puts the set's parts: image_root (the ImageFolder), relabel_root
    (the .pt maps), store (the HDF5 file) and paths (the images under image_root, in
    ImageFolder's order)."""
    return dict(image_root=str(cache / "images"), relabel_root=str(cache / "relabel"),
                store=str(cache / "labelmaps.h5"), paths=relative_paths(num_images))
