"""The embedded synthetic ImageNet (dali_relabel.tools.synthetic): layout, exact maps, cache, seeds."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dali_relabel.tools.synthetic as synthetic
from dali_relabel import LabelMapStore
from dali_relabel import ReLabelLoader, ValLoader
from dali_relabel.images import find_images
from dali_relabel.tools.synthetic import COLOURS, LOGIT_SCALE, MAX_CLASSES, make_synthetic_imagenet

# topk = 4 = the most objects an image holds: every map keeps every class present.
SMALL = dict(num_classes=6, train_per_class=6, val_per_class=4, image_size=(64, 112),
             map_size=15, topk=4, seed=3, progress=False)
TINY = dict(num_classes=3, train_per_class=2, val_per_class=1, image_size=(32, 48),
            map_size=5, topk=2, seed=0, progress=False)
PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_imagenet(tmp_path_factory.mktemp("synthetic") / "small", **SMALL)


@pytest.fixture(scope="module")
def store(dataset):
    with LabelMapStore.open(dataset.labelmaps, placement="memory") as opened:
        yield opened


def file_digests(root):
    """{relative path: sha256} of every file under root."""
    return {os.path.relpath(os.path.join(folder, name), root):
            hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for folder, _, names in os.walk(root) for name in names}


def dense_maps(store):
    """[N, C, H, W] float32: the stored top-k logits densified (0 outside the top-k)."""
    values, indices = store.values.float(), store.indices.long()
    dense = torch.zeros(len(store), store.num_classes, store.height, store.width)
    return dense.scatter_add_(1, indices, values).numpy()


def test_layout_files_and_store(dataset, store):
    p = SMALL
    assert dataset.classes[:2] == ["c00_red_plain_disc", "c01_green_striped_square"]
    assert sorted(dataset.classes) == dataset.classes and len(dataset.classes) == 6
    for split, per_class in ((dataset.train_root, p["train_per_class"]),
                             (dataset.val_root, p["val_per_class"])):
        paths, folders = find_images(split)
        assert folders == dataset.classes
        assert len(paths) == per_class * p["num_classes"]
        sizes = set()
        for path in paths:
            with Image.open(os.path.join(split, path)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                sizes.add(image.size)
        assert all(64 <= side <= 112 for size in sizes for side in size)
        assert len({w for w, _ in sizes}) > 5 and len({h for _, h in sizes}) > 5
        assert any(w != h for w, h in sizes)

    store.validate(full=True, progress=False)
    assert (len(store), store.num_classes, store.topk, store.height, store.width) == (36, 6, 4,
                                                                                      15, 15)
    assert store.paths == find_images(dataset.train_root)[0]
    assert store.classes == dataset.classes
    folders = [dataset.classes.index(path.split("/")[0]) for path in store.paths]
    assert store.labels.tolist() == folders
    assert store.attrs["generator"] == "dali_relabel.tools.synthetic"
    assert store.attrs["seed"] == 3 and store.attrs["logit_scale"] == LOGIT_SCALE
    assert json.loads(store.attrs["parameters"])["train_per_class"] == 6
    manifest = json.loads(open(os.path.join(dataset.root, "manifest.json")).read())
    assert manifest["params"]["num_classes"] == 6 and manifest["classes"] == dataset.classes
    # Nothing but the dataset beside it: the temporary build folder was renamed into place.
    assert os.listdir(os.path.dirname(dataset.root)) == ["small"]


def test_cell_coverage_is_exact():
    mask = np.zeros((1, 70, 100), dtype=bool)
    mask[0, :, :37] = True  # 37 of 100 columns; cells are 100/15 = 6.67 pixels wide
    coverage = synthetic._coverage(mask, 15)[0]
    want = np.clip((37 - np.arange(15) * 100 / 15) / (100 / 15), 0, 1)
    np.testing.assert_allclose(coverage, np.broadcast_to(want, (15, 15)), atol=1e-12)
    assert coverage[0, 5] == pytest.approx(0.55)
    # One pixel, at row 32 (cell rows are 70/15 = 4.67 px: edge at 32.67) and column 46
    # (edge at 46.67): two thirds of it in cells 6, one third in cells 7, along both axes.
    mask = np.zeros((1, 70, 100), dtype=bool)
    mask[0, 32, 46] = True
    coverage = synthetic._coverage(mask, 15)[0]
    assert np.count_nonzero(coverage) == 4
    shares = np.outer([2 / 3, 1 / 3], [2 / 3, 1 / 3]) / (70 / 15 * 100 / 15)
    np.testing.assert_allclose(coverage[6:8, 6:8], shares, rtol=1e-9)

def colour_agreement(dataset, store, maps, rival):
    """Over the cells where `maps` and `rival` name different classes (or one of them the
    background), the share whose pixels show the colour of the class `maps` puts there.

    Counted are cells that `maps` has wholly covered by one class, with their neighbours (no
    edge in reach); the pixels' colour is the nearest in direction of the classes' colours.
    Returns (share, number of cells counted).
    """
    colours = PALETTE[[i % len(PALETTE) for i in range(len(dataset.classes))]]
    colours /= np.linalg.norm(colours, axis=1, keepdims=True)
    hits = total = 0
    for row, path in enumerate(store.paths):
        pixels = np.asarray(Image.open(os.path.join(dataset.train_root, path)), np.float64)
        height, width = pixels.shape[:2]
        top, cls = maps[row].max(axis=0), maps[row].argmax(axis=0)
        rival_cls = np.where(rival[row].max(axis=0) >= LOGIT_SCALE / 2, rival[row].argmax(axis=0),
                             -1)
        for h in range(1, store.height - 1):
            for w in range(1, store.width - 1):
                block = (slice(h - 1, h + 2), slice(w - 1, w + 2))
                if (top[block].min() < 0.99 * LOGIT_SCALE or np.any(cls[block] != cls[h, w])
                        or rival_cls[h, w] == cls[h, w]):
                    continue
                y0, y1 = int(np.ceil(h * height / 15)), int((h + 1) * height / 15)
                x0, x1 = int(np.ceil(w * width / 15)), int((w + 1) * width / 15)
                mean = pixels[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
                hits += int(np.argmax(colours @ mean) == cls[h, w] % len(colours))
                total += 1
    return hits / max(total, 1), total


def test_label_maps_agree_with_the_pixels(dataset, store):
    maps = dense_maps(store)
    # Where the map and its transposed or mirrored self disagree, the pixels side with the
    # map as stored: rows follow the image's vertical axis, columns its horizontal one.
    for wrong in (maps.transpose(0, 1, 3, 2), maps[..., ::-1], maps[:, :, ::-1]):
        share, cells = colour_agreement(dataset, store, maps, wrong)
        assert share > 0.97 and cells > 30
        share, cells = colour_agreement(dataset, store, wrong, maps)
        assert share < 0.3 and cells > 30


def test_logits_are_scaled_coverage_and_the_label_is_the_largest_object(store):
    maps = dense_maps(store)
    # Objects do not overlap in what is visible: per cell the shares sum to at most 1.
    assert maps.min() >= 0 and maps.sum(axis=1).max() <= LOGIT_SCALE * 1.002
    assert np.isclose(maps.max(axis=(1, 2, 3)), LOGIT_SCALE, rtol=2e-3).all()
    # Stored classes of a cell are distinct and its values sorted, as an annotator's top-k.
    assert (np.sort(store.indices.numpy(), axis=1)[:, 1:] != np.sort(
        store.indices.numpy(), axis=1)[:, :-1]).all()
    assert (np.diff(store.values.float().numpy(), axis=1) <= 0).all()
    area = maps.sum(axis=(2, 3))  # each class's visible area, in cells
    labels = store.labels.numpy()
    assert (area.argmax(axis=1) == labels).all()
    others = np.where(np.eye(store.num_classes, dtype=bool)[labels], 0, area).max(axis=1)
    assert (area[np.arange(len(labels)), labels] >= 1.2 * others).all()
    present = (area > 0).sum(axis=1)
    assert present.min() == 1 and present.max() == 4
    assert len(set(present.tolist())) == 4


def test_real_labels_hold_every_object(dataset):
    real = json.loads(open(dataset.real_labels).read())
    paths, _ = find_images(dataset.val_root)
    assert len(real) == len(paths) == 6 * 4
    for labels, path in zip(real, paths):
        assert labels == sorted(set(labels)) and 1 <= len(labels) <= 4
        assert dataset.classes.index(path.split("/")[0]) in labels
        assert all(0 <= c < 6 for c in labels)
    assert {len(labels) for labels in real} == {1, 2, 3, 4}


def test_plugs_into_the_loaders(dataset):
    loader = ReLabelLoader(dataset.train_root, dataset.labelmaps, 8, device="cpu",
                           image_size=48, num_threads=1)
    images, targets = next(iter(loader))
    assert images.shape == (8, 3, 48, 48) and targets.shape == (8, 6)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert (targets.max(dim=1).values > 1 / 6).all()  # never a blank map
    val = ValLoader(dataset.val_root, 8, device="cpu", classes=dataset.classes, image_size=48,
                    resize_size=56, num_threads=1)
    labels = torch.cat([labels for _, labels in val]).tolist()
    paths, _ = find_images(dataset.val_root)
    assert labels == [dataset.classes.index(path.split("/")[0]) for path in paths]


def test_cache_reuses_and_parameters_choose_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DALI_RELABEL_CACHE", str(tmp_path))
    first = make_synthetic_imagenet(**TINY)
    assert os.path.dirname(first.root) == str(tmp_path / "synthetic")
    stamps = {path: os.stat(os.path.join(first.root, path)).st_mtime_ns
              for path in file_digests(first.root)}
    again = make_synthetic_imagenet(**TINY)
    assert again == first
    assert stamps == {path: os.stat(os.path.join(first.root, path)).st_mtime_ns
                      for path in file_digests(first.root)}
    other = make_synthetic_imagenet(**{**TINY, "train_per_class": 3})
    assert other.root != first.root
    assert len(find_images(other.train_root)[0]) == 9
    assert sorted(os.listdir(tmp_path / "synthetic")) == sorted(
        os.path.basename(ds.root) for ds in (first, other))


def test_explicit_root_is_replaced_or_refused(tmp_path):
    root = tmp_path / "data"
    make_synthetic_imagenet(root, **TINY)
    replaced = make_synthetic_imagenet(root, **{**TINY, "seed": 1})
    manifest = json.loads(open(os.path.join(replaced.root, "manifest.json")).read())
    assert manifest["params"]["seed"] == 1
    assert os.listdir(tmp_path) == ["data"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="root"):
        make_synthetic_imagenet(tmp_path / "mine", **TINY)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_interrupted_build_leaves_nothing_complete(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_labelmaps", fail)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_imagenet(tmp_path / "data", **TINY)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert os.path.isfile(make_synthetic_imagenet(tmp_path / "data", **TINY).labelmaps)


def test_a_concurrent_builder_keeps_the_first_dataset(tmp_path):
    # Another process (e.g. a second torchrun rank) finishes the same dataset first.
    first = make_synthetic_imagenet(tmp_path / "data", **TINY)
    stamp = os.stat(first.labelmaps).st_mtime_ns
    params = json.loads(open(os.path.join(first.root, "manifest.json")).read())["params"]
    late = tmp_path / ".data.tmp-late"
    late.mkdir()
    synthetic._build(str(late), params=params, classes=first.classes, progress=False)
    assert synthetic._install(str(late), first.root, params, first.classes) == first
    assert os.listdir(tmp_path) == ["data"] and os.stat(first.labelmaps).st_mtime_ns == stamp


def test_seed_fixes_the_bytes(tmp_path):
    a = make_synthetic_imagenet(tmp_path / "a", **TINY)
    b = make_synthetic_imagenet(tmp_path / "b", **TINY)
    c = make_synthetic_imagenet(tmp_path / "c", **{**TINY, "seed": 1})
    digests = [{path: digest for path, digest in file_digests(ds.root).items()
                if path.endswith((".JPEG", ".json")) and path != "manifest.json"}
               for ds in (a, b, c)]
    assert len(digests[0]) == 3 * 2 + 3 * 1 + 1
    assert digests[0] == digests[1]
    jpegs = [path for path in digests[0] if path.endswith(".JPEG")]
    assert all(digests[0][path] != digests[2][path] for path in jpegs)
    with LabelMapStore.open(a.labelmaps) as sa, LabelMapStore.open(b.labelmaps) as sb:
        assert torch.equal(sa.values, sb.values) and torch.equal(sa.indices, sb.indices)


@pytest.mark.parametrize("argument, value", [
    ("num_classes", 1),
    ("num_classes", MAX_CLASSES + 1),
    ("num_classes", 2.0),
    ("num_classes", True),
    ("train_per_class", 0),
    ("val_per_class", -1),
    ("image_size", (16, 64)),
    ("image_size", (96, 64)),
    ("image_size", (64,)),
    ("image_size", (64.0, 96.0)),
    ("image_size", 64),
    ("map_size", 0),
    ("map_size", 33),
    ("topk", 0),
    ("topk", 4),
    ("seed", -1),
    ("objects", (0, 2)),
    ("objects", (3, 2)),
    ("objects", (4, 5)),  # at least 4 objects of distinct classes, with 3 classes
    ("objects", (1.0, 2.0)),
    ("main_side", (0.0, 0.5)),
    ("main_side", (0.6, 0.5)),
    ("main_side", (0.5, 1.2)),
    ("other_side", 0.3),
    ("other_side", (0.2, "0.3")),
])
def test_bad_arguments_name_themselves(tmp_path, argument, value):
    kwargs = {**TINY, argument: value}
    with pytest.raises(ValueError, match=rf"^{argument} must be .*, got ") as error:
        make_synthetic_imagenet(tmp_path / "data", **kwargs)
    assert str(error.value).endswith(f"got {value!r}")
    assert not os.listdir(tmp_path)


def test_scene_parameters_set_the_clutter(tmp_path, store):
    cluttered = make_synthetic_imagenet(tmp_path / "cluttered", **{
        **SMALL, "topk": 6, "objects": (3, 5), "main_side": (0.3, 0.4),
        "other_side": (0.2, 0.28)})
    with LabelMapStore.open(cluttered.labelmaps, placement="memory") as crowded:
        maps = dense_maps(crowded)
        area = maps.sum(axis=(2, 3)) / LOGIT_SCALE / crowded.height / crowded.width
        labels = crowded.labels.numpy()
        labelled = area[np.arange(len(labels)), labels]
        sizes = crowded.sizes.numpy().astype(np.float64)
    present = (area > 0).sum(axis=1)
    # At most `objects[1]`; fewer than objects[0] only where the draws could not place them.
    assert present.max() == 5 and (present >= 3).mean() > 0.8
    # An object lies in its square box: its share of the image is at most side^2 / (H W).
    short = sizes.min(axis=1)
    assert (labelled <= (0.4 * short) ** 2 / sizes.prod(axis=1) * 1.01).all()
    assert (area.argmax(axis=1) == labels).all()
    default_area = dense_maps(store).sum(axis=(2, 3))
    default_labelled = default_area[np.arange(len(store)), store.labels.numpy()] / (
        LOGIT_SCALE * store.height * store.width)
    assert labelled.mean() < 0.6 * default_labelled.mean()


def test_the_command_makes_a_data_set_the_loaders_take(tmp_path, capsys):
    from dali_relabel.cli import main
    out = tmp_path / "synthetic"
    assert main(["synthetic", "--out", str(out), "--classes", "3", "--train-per-class", "4",
                 "--val-per-class", "2", "--image-size", "48", "64", "--objects", "2", "3",
                 "--main-side", "0.4", "0.6", "--other-side", "0.2", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert f"label maps: {out / 'train_labelmaps.h5'}" in printed
    store = LabelMapStore.open(out / "train_labelmaps.h5")
    assert len(store) == 12 and store.num_classes == 3 and store.topk == 3
    for row, path in enumerate(store.paths):  # the sizes the loader plans crops with
        width, height = Image.open(out / "train" / path).size
        assert store.sizes[row].tolist() == [height, width]
        assert 48 <= width <= 64 and 48 <= height <= 64
    real = json.loads((out / "val_real_labels.json").read_text())
    assert {len(labels) for labels in real} <= {1, 2, 3} and max(map(len, real)) == 3
    images, targets = next(iter(ReLabelLoader(out / "train", store, 4, device="cpu",
                                              image_size=32)))
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 3)
    assert len(ValLoader(out / "val", 4, device="cpu", classes=store.classes)) == 2
