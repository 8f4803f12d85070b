"""`dali-relabel show`: the numbers behind the picture, the PNG itself, and the command
line's help (every command listed, each with an example)."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch.testing import assert_close

import dali_relabel
import dali_relabel._system as system_module
from dali_relabel import LabelMapStore, reference_label_pooling
from dali_relabel.cli import main
from dali_relabel.tools.show import show_labelmap
from script_runner import run_code

C, K, M = 10, 3, 15
CLASSES = ImageNetInfo().label_names()[:C]  # WordNet ids: shown with their descriptions
LEFT, RIGHT = 1, 4  # the class that fills the left / right part of every map
PATHS = [f"{CLASSES[LEFT]}/a.JPEG", f"{CLASSES[RIGHT]}/b.JPEG"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two images whose maps say: class LEFT in the left 7 columns, RIGHT in the right 7."""
    root = tmp_path_factory.mktemp("show")
    rng = np.random.default_rng(0)
    values = np.empty((2, K, M, M), np.float32)
    indices = np.empty((2, K, M, M), np.int64)
    for n in range(2):
        for h in range(M):
            for w in range(M):
                main_class = LEFT if w < 7 else RIGHT if w > 7 else 0
                others = rng.permutation([c for c in range(C) if c != main_class])[:K - 1]
                indices[n, :, h, w] = [main_class, *others]
                values[n, :, h, w] = [6.0, *(rng.normal(size=K - 1))]
    for n, (path, size) in enumerate(zip(PATHS, [(160, 120), (120, 150)])):
        os.makedirs(root / "images" / os.path.dirname(path))
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[:, : size[0] // 2] = (200, 120, 40)
        pixels[:, size[0] // 2:] = (40, 120, 200)
        Image.fromarray(pixels).save(root / "images" / path, quality=95)
    store = root / "maps.h5"
    dali_relabel.write_labelmaps(store, values, indices, np.array([LEFT, RIGHT]), PATHS,
                                 CLASSES)
    return root / "images", store


def check_png(path, num_crops):
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 900 and height > 400 + 150 * num_crops  # one row per crop under the maps


def test_show_box_heatmaps_and_targets(dataset, tmp_path, capsys):
    images, store_path = dataset
    out = tmp_path / "box.png"
    box = [0.05, 0.1, 0.4, 0.9]  # inside the left part of the image
    shown = show_labelmap(store_path, images, 0, out, box=box)
    store = LabelMapStore.open(store_path)
    values, indices = store.values[:1], store.indices[:1]
    assert shown.path == PATHS[0] and shown.label == LEFT
    assert_close(shown.boxes, torch.tensor([box]))
    want = reference_label_pooling(values, indices, torch.tensor([box]), num_classes=C)
    assert shown.top_classes[0, 0] == LEFT
    assert_close(shown.top_probs, want.topk(5).values)
    assert shown.top_classes.tolist() == want.topk(5).indices.tolist()

    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    target = reference_label_pooling(values, indices, whole, num_classes=C)[0]
    assert shown.heatmap_classes == target.topk(2).indices.tolist()
    assert set(shown.heatmap_classes) == {LEFT, RIGHT}
    # Per-cell probabilities, independently: RoIAlign of the whole image with one output
    # bin per cell samples each cell at its centre.
    cells = reference_label_pooling(values, indices, whole, num_classes=C, output_size=M)
    cells = cells[0].view(M, M, C).permute(2, 0, 1)
    assert_close(shown.heatmaps, cells[shown.heatmap_classes])
    left = shown.heatmap_classes.index(LEFT)
    assert bool((shown.heatmaps[left, :, :7] > 0.9).all())  # rows = vertical axis: no
    assert bool((shown.heatmaps[left, :, 8:] < 0.1).all())  # transpose on the way
    check_png(out, 1)

    assert main(["show", str(store_path), "--images", str(images), "--index", "1", "--box",
                 "0.6", "0.0", "1.0", "0.5", "--out", str(tmp_path / "cli.png")]) == 0
    assert f"wrote {tmp_path / 'cli.png'}: {PATHS[1]}, 1 crop(s)" in capsys.readouterr().out
    check_png(tmp_path / "cli.png", 1)


def test_show_random_crops_as_the_loader_makes_them(dataset, tmp_path):
    images, store_path = dataset
    shown = show_labelmap(store_path, images, 1, tmp_path / "crops.png", num_crops=3, seed=5)
    check_png(tmp_path / "crops.png", 3)
    width, height = Image.open(images / PATHS[1]).size
    boxes = shown.boxes.numpy()
    assert len({tuple(b) for b in boxes.round(4).tolist()}) == 3  # three different crops
    # RandomResizedCrop windows: integral in pixels, inside the image, area >= 8%.
    pixels = boxes * [width, height, width, height]
    np.testing.assert_allclose(pixels, pixels.round(), atol=2e-3)
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) >= 0.08 - 1e-3).all()
    store = LabelMapStore.open(store_path)
    want = reference_label_pooling(store.values, store.indices, shown.boxes, num_classes=C,
                                   sample_index=torch.ones(3, dtype=torch.int64))
    assert_close(shown.top_probs, want.topk(5).values, atol=1e-5, rtol=0)
    again = show_labelmap(store_path, images, 1, tmp_path / "again.png", num_crops=3, seed=5)
    assert torch.equal(again.boxes, shown.boxes)


def test_show_names_bad_arguments(dataset, tmp_path, capsys):
    images, store_path = dataset
    out = str(tmp_path / "x.png")
    cases = [
        (["--index", "2"], f"index must be an int in [0, 1], got 2 ({store_path} has 2 rows)"),
        (["--index", "0", "--box", "0.5", "0.1", "0.2", "0.9"],
         "box must be (x1, y1, x2, y2) with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, got "
         "[0.5, 0.1, 0.2, 0.9]"),
        (["--index", "0", "--crops", "0"], "num_crops must be an int in [1, 8], got 0"),
        (["--index", "0", "--seed", "-1"], "seed must be an int in [0, 9223372036854775807], "
                                           "got -1"),
    ]
    for extra, message in cases:
        assert main(["show", str(store_path), "--images", str(images), "--out", out,
                     *extra]) == 1
        assert message in capsys.readouterr().err
    assert main(["show", str(store_path), "--images", str(tmp_path), "--index", "0",
                 "--out", out]) == 1
    assert f"{tmp_path / PATHS[0]}: cannot read the image" in capsys.readouterr().err
    assert main(["show", str(store_path), "--images", str(images), "--index", "0",
                 "--out", str(tmp_path / "no" / "x.png")]) == 1
    assert "out: the folder" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_help_lists_every_command_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    for command in ("annotate", "import-pt", "info", "verify", "show"):
        assert f"    {command}" in listing
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        assert "example" in help_text and f"dali-relabel {command} " in help_text


# ---- 5. large images: drawn small, refused before decoding when they cannot fit ----------

SHOW_UNDER_ULIMIT = """
import resource, sys
from dali_relabel.cli import main
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + (3 << 29)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(["show", *sys.argv[1:]]))
"""


def test_a_large_image_is_drawn_within_the_memory_limit(tmp_path):
    """8000 x 8000 pixels under `ulimit -v` of 1.5 GB more than the interpreter holds:
    drawing the image whole would take several GB of float copies in matplotlib."""
    root = tmp_path / "images"
    os.makedirs(root / CLASSES[0])
    rng = np.random.default_rng(0)
    small = Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8))
    small.resize((8000, 8000), Image.BILINEAR).save(root / CLASSES[0] / "big.JPEG", quality=70)
    store = tmp_path / "maps.h5"
    dali_relabel.write_labelmaps(store, np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4), np.int64),
                                 np.zeros(1, np.int64), [f"{CLASSES[0]}/big.JPEG"], CLASSES)
    out = tmp_path / "big.png"
    result = run_code(SHOW_UNDER_ULIMIT, store, "--images", root, "--index", "0", "--box", "0.1",
                      "0.1", "0.5", "0.5", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    check_png(out, 1)


def test_an_image_that_cannot_fit_is_refused_before_decoding(dataset, tmp_path, monkeypatch,
                                                             capsys):
    images, store_path = dataset
    root = tmp_path / "images"
    os.makedirs(root / os.path.dirname(PATHS[0]))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (13500).to_bytes(2, "big") * 2  # declares 13500 x 13500 pixels
    (root / PATHS[0]).write_bytes(bytes(data))
    monkeypatch.setattr(system_module, "available_memory", lambda: 1 << 30, raising=False)
    assert main(["show", str(store_path), "--images", str(root), "--index", "0", "--box",
                 "0", "0", "1", "1", "--out", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == (
        f"dali-relabel show: error: {root / PATHS[0]}: the image declares 13500 x 13500 "
        f"pixels; decoding it needs about 1.5 GB of memory, 1.1 GB are available\n")
    assert not (tmp_path / "x.png").exists()
