"""`dali-relabel annotate`: a small timm classifier, run fully-convolutionally, labels
generated JPEGs; checked against the model's own forward pass."""
import datetime
import hashlib
import logging
import os
import signal
import subprocess

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.testing import assert_close

from labelmap_data import KILLED_AFTER_TWO_WRITES

from dali_relabel import LabelMapError, LabelMapStore
from dali_relabel.cli import main
from dali_relabel.labelmaps import LabelMapWriter
from dali_relabel.tools.jobs import read_name_list
from script_runner import run_code, run_python, start_python


MODEL = "test_resnet"  # timm's 0.4 M-parameter ResNet; stride 32
SIZE = 128  # input side: a 4 x 4 feature map
RED, BLUE = (230, 20, 20), (20, 20, 230)
# ImageFolder order (class folder, then file name); the folders are the 2-class model's
# classes: 0 = blue, 1 = red.
PATHS = ["blue/plain.jpg", "blue/wide.jpg", "red/left.jpg", "red/plain.jpg", "red/top.jpg"]


def two_colours(width: int, height: int, *, red_until: int, axis: str) -> Image.Image:
    """Red up to `red_until` pixels along x (axis "x") or y (axis "y"), blue after."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = BLUE
    if axis == "x":
        pixels[:, :red_until] = RED
    else:
        pixels[:red_until, :] = RED
    return Image.fromarray(pixels)


def model_input(image: Image.Image) -> torch.Tensor:
    """The annotator's view of an image, written out independently: the whole image resized
    to SIZE x SIZE (test_resnet's bilinear), normalized with its mean and std of 0.5."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32)
    return ((torch.from_numpy(pixels / 255.0).permute(2, 0, 1) - 0.5) / 0.5)[None]


def densify(store: LabelMapStore) -> torch.Tensor:
    """[N, C, H, W] float32 logits; with K == C it is the annotator's full map."""
    dense = torch.zeros(len(store), store.num_classes, store.height, store.width)
    return dense.scatter_(1, store.indices.long(), store.values.float())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for folder in ("blue", "red"):
        os.makedirs(root / folder)
    Image.new("RGB", (100, 90), BLUE).save(root / "blue/plain.jpg", quality=95)
    # Wide: only the left quarter is red. Resized whole, map column 0 is red; a centre crop
    # would see blue only.
    two_colours(320, 80, red_until=80, axis="x").save(root / "blue/wide.jpg", quality=95)
    two_colours(150, 110, red_until=75, axis="x").save(root / "red/left.jpg", quality=95)
    Image.new("RGB", (90, 120), RED).save(root / "red/plain.jpg", quality=95)
    two_colours(110, 150, red_until=75, axis="y").save(root / "red/top.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """A random-init test_resnet whose classifier separates red from blue features: the
    colour of each region decides the class, so the map shows where red is."""
    torch.manual_seed(0)
    net = timm.create_model(MODEL, num_classes=2).eval()
    assert net.pretrained_cfg["interpolation"] == "bilinear"
    assert net.pretrained_cfg["mean"] == net.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        red, blue = (net.forward_features(model_input(Image.new("RGB", (64, 64), colour)))
                     .mean(dim=(2, 3))[0] for colour in (RED, BLUE))
        direction = red - blue
        offset = (direction * (red + blue) / 2).sum()
        net.fc.weight.copy_(torch.stack([-direction, direction]))  # 0 = blue, 1 = red
        net.fc.bias.copy_(torch.stack([offset, -offset]))
    checkpoint = tmp_path_factory.mktemp("models") / "colour.pth"
    torch.save(net.state_dict(), checkpoint)
    return net, checkpoint


def annotate(root, out, checkpoint, *extra, model=MODEL, size=SIZE):
    return main(["annotate", "--model", model, "--checkpoint", str(checkpoint),
                 "--images", str(root), "--out", str(out), "--input-size", str(size),
                 "--device", "cpu", "--num-workers", "0", *extra])


RUN = ("--map-size", "4", "--topk", "2", "--batch-size", "2")


@pytest.fixture(scope="module")
def annotated(images, colour_model, tmp_path_factory):
    """One uninterrupted single-process run: 5 images, 4 x 4 maps, both classes kept."""
    out = tmp_path_factory.mktemp("annotated") / "maps.h5"
    assert annotate(images, out, colour_model[1], *RUN) == 0
    return out


def test_map_follows_the_image_regions(images, colour_model, annotated):
    net, checkpoint = colour_model
    store = LabelMapStore.open(annotated)
    assert store.paths == PATHS
    assert store.classes == ["blue", "red"]
    assert store.labels.tolist() == [0, 0, 1, 1, 1]
    assert (store.topk, store.height, store.width) == (2, 4, 4)
    for row, path in enumerate(store.paths):  # the sizes the loader plans crops with
        width, height = Image.open(images / path).size
        assert store.sizes[row].tolist() == [height, width]
    assert store.sizes_adjust_orientation is False
    dense = densify(store)
    red = (dense[:, 1] > dense[:, 0]).int()
    left = torch.tensor([[1, 1, 0, 0]] * 4)
    expected = {
        "blue/plain.jpg": torch.zeros(4, 4, dtype=torch.int),
        "blue/wide.jpg": torch.tensor([[1, 0, 0, 0]] * 4),  # the whole image, not a crop
        "red/left.jpg": left,  # the map's left columns follow the image's left half
        "red/plain.jpg": torch.ones(4, 4, dtype=torch.int),
        "red/top.jpg": left.T,  # rows are the image's vertical axis
    }
    for i, path in enumerate(PATHS):
        assert red[i].tolist() == expected[path].tolist(), path
        # Global average pooling + linear is linear: the map's mean is the model's logits.
        with torch.no_grad():
            logits = net(model_input(Image.open(images / path)))[0]
        assert_close(dense[i].mean(dim=(1, 2)), logits, atol=1e-2, rtol=1e-3)

    attrs = store.attrs
    assert attrs["model"] == MODEL and attrs["weights"] == "checkpoint"
    assert attrs["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (attrs["input_size"], attrs["topk"], attrs["map_resample"]) == (SIZE, 2, "none")
    started = datetime.datetime.fromisoformat(attrs["date"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() < 3600


def test_topk_map_size_and_class_names(images, tmp_path, capsys):
    torch.manual_seed(1)
    net = timm.create_model(MODEL, num_classes=10).eval()
    checkpoint = tmp_path / "ten.pth"
    torch.save(net.state_dict(), checkpoint)
    # 10 classes but 2 class folders: the annotator needs the model's class names.
    assert annotate(images, tmp_path / "unnamed.h5", checkpoint) == 1
    assert "--classes FILE" in capsys.readouterr().err
    names = [f"class{c}" for c in range(10)]
    names[3], names[8] = "blue", "red"
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    named = ("--classes", str(tmp_path / "names.txt"))

    assert annotate(images, tmp_path / "full.h5", checkpoint, *named, "--map-size", "4",
                    "--topk", "10") == 0
    full_store = LabelMapStore.open(tmp_path / "full.h5")
    assert full_store.classes == names and full_store.labels.tolist() == [3, 3, 8, 8, 8]
    full = densify(full_store)
    for i, path in enumerate(PATHS):
        with torch.no_grad():
            logits = net(model_input(Image.open(images / path)))[0]
        assert_close(full[i].mean(dim=(1, 2)), logits, atol=1e-2, rtol=1e-3)

    # 4 x 4 -> 2 x 2: each cell averages a 2 x 2 block of logits; top-3 of 10 kept.
    assert annotate(images, tmp_path / "small.h5", checkpoint, *named, "--map-size", "2",
                    "--topk", "3") == 0
    small = LabelMapStore.open(tmp_path / "small.h5")
    assert small.attrs["map_resample"] == "adaptive-avg-pool"
    want = F.avg_pool2d(full, 2)
    values = small.values.float()
    assert bool((values[:, :-1] >= values[:, 1:]).all())  # best first
    assert_close(values, want.sort(dim=1, descending=True).values[:, :3], atol=1e-2, rtol=0)
    assert_close(values, want.gather(1, small.indices.long()), atol=1e-2, rtol=0)

    # 4 x 4 -> 8 x 8: bilinear, as documented.
    assert annotate(images, tmp_path / "large.h5", checkpoint, *named, "--map-size", "8",
                    "--topk", "10") == 0
    large = LabelMapStore.open(tmp_path / "large.h5")
    assert large.attrs["map_resample"] == "bilinear"
    want = F.interpolate(full, size=(8, 8), mode="bilinear", align_corners=False)
    assert_close(densify(large), want, atol=1e-2, rtol=0)


def test_refuses_unsupported_models_and_bad_arguments(images, colour_model, tmp_path, capsys):
    checkpoint = colour_model[1]
    out = tmp_path / "maps.h5"
    for model in ("test_convnext", "test_vit"):
        torch.save(timm.create_model(model, num_classes=2).state_dict(), tmp_path / model)
    cases = [
        # A norm layer after the pooling has no per-position equivalent.
        (dict(model="test_convnext", checkpoint=tmp_path / "test_convnext"),
         "is not global average pooling + linear"),
        (dict(model="test_vit", checkpoint=tmp_path / "test_vit"), "token-based"),
        (dict(checkpoint=tmp_path / "missing.pth"), "missing.pth: no such file"),
        (dict(model="test_efficientnet"), "has no 'classifier.weight'"),
        (dict(model="no_such_model"), "timm has no model 'no_such_model'"),
        (dict(extra=("--topk", "3")), "topk: 3 is more than the model's 2 classes"),
        (dict(extra=("--topk", "2", "--input-size", "0")),
         "input_size must be an int in [1, 4096], got 0"),
        (dict(extra=("--topk", "2", "--input-size", "100000")),
         "input_size must be an int in [1, 4096], got 100000"),
        (dict(extra=("--topk", "0")), "topk must be an int >= 1, got 0"),
        (dict(extra=("--topk", "2", "--num-workers", "-1")),
         "num_workers must be an int >= 0, got -1"),
        (dict(root=tmp_path / "nowhere"), "is not a directory"),
    ]
    for case, message in cases:
        assert annotate(case.get("root", images), out, case.get("checkpoint", checkpoint),
                        *case.get("extra", ("--topk", "2")),
                        model=case.get("model", MODEL)) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("dali-relabel annotate: error: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["test_convnext", "test_vit"]  # nothing written

    out.write_bytes(b"")
    assert annotate(images, out, checkpoint, "--topk", "2") == 1
    assert f"{out} exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exactly one source of weights
        main(["annotate", "--model", MODEL, "--checkpoint", str(checkpoint), "--pretrained",
              "--images", str(images), "--out", str(tmp_path / "x.h5")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bad_image_is_named_and_can_be_excluded(images, colour_model, tmp_path, capsys):
    root = tmp_path / "images"
    for folder in ("blue", "red"):  # both classes of the model
        os.makedirs(root / folder)
    for path in ("blue/plain.jpg", "red/left.jpg", "red/top.jpg"):
        (root / path).write_bytes((images / path).read_bytes())
    (root / "red" / "cut.jpg").write_bytes((images / "red" / "top.jpg").read_bytes()[:300])
    loading = ("--num-workers", "1", "--map-size", "4", "--topk", "2")
    assert annotate(root, tmp_path / "maps.h5", colour_model[1], *loading) == 1
    err = capsys.readouterr().err
    assert f"{root / 'red' / 'cut.jpg'}: cannot read the image" in err and "--exclude" in err
    assert "Traceback" not in err  # one message, not a worker's traceback
    (tmp_path / "bad.txt").write_text("red/cut.jpg\ttruncated\n")
    assert annotate(root, tmp_path / "kept.h5", colour_model[1], *loading,
                    "--exclude", str(tmp_path / "bad.txt")) == 0
    kept = LabelMapStore.open(tmp_path / "kept.h5")
    assert kept.paths == ["blue/plain.jpg", "red/left.jpg", "red/top.jpg"]


def test_killed_job_resumes_where_it_stopped(images, colour_model, annotated, tmp_path,
                                             capsys, caplog, monkeypatch):
    checkpoint = colour_model[1]
    out = tmp_path / "maps.h5"
    args = ["annotate", "--model", MODEL, "--checkpoint", str(checkpoint), "--images",
            str(images), "--out", str(out), "--input-size", str(SIZE), "--device", "cpu",
            "--num-workers", "0", *RUN]
    result = run_code(KILLED_AFTER_TWO_WRITES, *args, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    partial = tmp_path / "maps.h5.partial"
    assert not out.exists() and partial.exists()
    with pytest.raises(LabelMapError, match="never written"):  # no reader accepts it
        LabelMapStore.open(partial)

    # Other settings would mix two kinds of maps in one file: refused.
    assert annotate(images, out, checkpoint, *RUN, size=96) == 1
    assert "input_size=128 (now 96)" in capsys.readouterr().err

    written = []
    write = LabelMapWriter.write

    def recording_write(self, rows, *rest, **kwargs):
        written.extend(int(row) for row in rows)
        return write(self, rows, *rest, **kwargs)

    monkeypatch.setattr(LabelMapWriter, "write", recording_write)
    with caplog.at_level(logging.INFO, logger="dali_relabel"):
        assert annotate(images, out, checkpoint, *RUN) == 0
    assert "resuming, 4 of 5 images already done" in caplog.text
    assert written == [4]  # two batches of two survived the kill; only the last image ran
    assert not partial.exists()
    resumed, uninterrupted = LabelMapStore.open(out), LabelMapStore.open(annotated)
    assert resumed.paths == uninterrupted.paths
    assert torch.equal(resumed.indices, uninterrupted.indices)
    assert_close(resumed.values, uninterrupted.values, atol=2e-3, rtol=0)


def test_torchrun_ranks_share_the_work(images, colour_model, annotated, tmp_path):
    out = tmp_path / "maps.h5"
    result = run_python("dali_relabel.cli", "annotate", "--model", MODEL, "--checkpoint",
                        colour_model[1], "--images", images, "--out", out, "--input-size", SIZE,
                        "--device", "cpu", "--num-workers", "0", *RUN, module=True, torchrun=2,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(tmp_path) == ["maps.h5"]  # the rank parts were merged and removed
    merged, single = LabelMapStore.open(out), LabelMapStore.open(annotated)
    assert merged.paths == single.paths and merged.labels.tolist() == single.labels.tolist()
    assert torch.equal(merged.indices, single.indices)
    assert torch.equal(merged.sizes, single.sizes)
    assert_close(merged.values, single.values, atol=2e-3, rtol=0)
    assert {key: merged.attrs[key] for key in ("model", "checkpoint_sha256", "input_size")} == {
        key: single.attrs[key] for key in ("model", "checkpoint_sha256", "input_size")}


def small_run(images, out, checkpoint, workers):
    return ["annotate", "--model", MODEL, "--checkpoint", str(checkpoint),
            "--images", str(images), "--out", str(out), "--input-size", "64", "--map-size",
            "2", "--topk", "2", "--batch-size", "1", "--device", "cpu", "--num-workers",
            str(workers)]


def test_rerun_right_after_kill_9_is_not_locked_out_by_workers(images, colour_model, tmp_path):
    out = tmp_path / "maps.h5"
    args = small_run(images, out, colour_model[1], workers=1)
    # Not capturing the output: reading it would wait for the orphaned worker as well.
    killed = start_python(None, *args, code=KILLED_AFTER_TWO_WRITES,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    # The killed job's loading worker lives on for a few seconds; it must not hold the file.
    h5py.File(f"{out}.partial", "r+").close()
    assert main(args) == 0
    assert LabelMapStore.open(out).paths == PATHS


def test_images_over_pils_pixel_limit_decode_in_annotate_and_show(images, colour_model,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "maps.h5"
    # The test images are over twice this; the forked loading worker sees it too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    assert main(small_run(images, out, colour_model[1], workers=1)) == 0
    assert main(["show", str(out), "--images", str(images), "--index", "0", "--box", "0",
                 "0", "1", "1", "--out", str(tmp_path / "row0.png")]) == 0
    assert "DecompressionBomb" not in capsys.readouterr().err
    assert (tmp_path / "row0.png").read_bytes()[:4] == b"\x89PNG"
    assert Image.MAX_IMAGE_PIXELS == 50  # lifted only while decoding


def test_name_lists_keep_hashes_inside_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# classes\nn01#a\n  n02  \n\n")
    assert read_name_list(path, argument="--classes") == ["n01#a", "n02"]


# ---- 16. a rerun of a finished job says so; names no list can hold are left out at once --

def test_rerun_of_a_finished_job_says_it_is_complete(images, colour_model, annotated, capsys,
                                                      caplog):
    before = annotated.read_bytes()
    with caplog.at_level(logging.INFO, logger="dali_relabel"):
        assert annotate(images, annotated, colour_model[1], *RUN) == 0
    assert "complete from an earlier run of the same job; nothing to do" in caplog.text
    assert annotated.read_bytes() == before
    assert annotate(images, annotated, colour_model[1], *RUN, size=96) == 1
    err = capsys.readouterr().err
    assert f"out: {annotated} exists and is not the finished output of this job" in err
    assert "input_size=128 (now 96)" in err


def test_a_name_no_list_can_hold_is_left_out_at_the_start(images, colour_model, tmp_path,
                                                          caplog):
    root = tmp_path / "images"
    for folder in ("blue", "red"):
        os.makedirs(root / folder)
    for path in ("blue/plain.jpg", "red/left.jpg"):
        (root / path).write_bytes((images / path).read_bytes())
    (root / "red" / "ta\tb.jpg").write_bytes((images / "red/top.jpg").read_bytes())
    with caplog.at_level(logging.WARNING, logger="dali_relabel"):
        assert annotate(root, tmp_path / "maps.h5", colour_model[1], "--map-size", "4",
                        "--topk", "2") == 0
    assert "skipped 1 image file(s) that no tool can use: 'red/ta\\tb.jpg'" in caplog.text
    assert LabelMapStore.open(tmp_path / "maps.h5").paths == ["blue/plain.jpg", "red/left.jpg"]
