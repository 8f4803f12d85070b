"""Test utilities for the loaders: a small ImageFolder of real JPEGs with a label-map store,
torchvision's way (PIL) of cropping them, to compare the loaders' pixels against, and copies
of the set to spoil files in."""
import os
import shutil

import numpy as np
from PIL import Image

import dali_relabel
from labelmap_data import make_label_maps

NUM_IMAGES = 30
NUM_CLASSES = 10
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # images come out as 0-255 pixels


def textured_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Blocky colour noise smoothed by bicubic upsampling: any shift of a crop shows."""
    blocks = (rng.random((max(2, height // 12), max(2, width // 12), 3)) * 255).astype(np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.BICUBIC)


def make_jpeg_dataset(root) -> tuple:
    """NUM_IMAGES JPEGs of varied sizes in 3 class folders under `root` (a pathlib.Path) and
    a label-map store of NUM_CLASSES classes listing them, beside it: (root, store path)."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(NUM_IMAGES):
        label = i % 3
        width, height = (int(v) for v in rng.integers(90, 420, size=2))
        relative = f"n0000000{label}/img_{i:03d}.JPEG"
        os.makedirs(root / f"n0000000{label}", exist_ok=True)
        textured_image(rng, width, height).save(root / relative, quality=95)
        paths.append(relative)
        labels.append(label)
    values, indices = make_label_maps(NUM_IMAGES, 5, NUM_CLASSES, seed=1)
    store_path = root.parent / f"{root.name}_maps.h5"
    dali_relabel.write_labelmaps(store_path, values, indices, np.array(labels), paths,
                                 [f"n0000000{c}" for c in range(NUM_CLASSES)])
    return str(root), str(store_path)


def pil_crop(path: str, box, size: int, flip: bool, orient: bool = False,
             resample=Image.BILINEAR) -> np.ndarray:
    """torchvision's way: PIL crop at the pixel box, resize (bilinear unless `resample`),
    optional mirror."""
    image = Image.open(path)
    if orient:
        from PIL import ImageOps
        image = ImageOps.exif_transpose(image)
    image = image.convert("RGB")
    width, height = image.size
    left, top, right, bottom = (np.asarray(box) * [width, height, width, height]).round()
    crop = image.crop((int(left), int(top), int(right), int(bottom)))
    crop = crop.resize((size, size), resample)
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32)


def linked_copy(root: str, paths, folder):
    """`folder` with a link to each of the images, to spoil some without touching them."""
    for path in paths:
        os.makedirs(folder / os.path.dirname(path), exist_ok=True)
        os.symlink(os.path.join(root, path), folder / path)
    return folder


def indexed_copy(dataset, tmp_path) -> str:
    """A copy of the dataset's store with /sizes, made as a user would: `dali-relabel index`."""
    from dali_relabel.cli import main
    root, store_path = dataset
    indexed = tmp_path / "indexed.h5"
    shutil.copy(store_path, indexed)
    assert main(["index", str(indexed), "--images", root]) == 0
    return str(indexed)
