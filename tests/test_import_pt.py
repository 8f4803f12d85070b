"""`dali-relabel import-pt`: official-format `.pt` maps written here are imported, and the
targets afterwards equal the official training code's on the official crop coordinates."""
import logging
import re
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop

import dali_relabel.tools.import_pt as import_pt_module
from dali_relabel import LabelMapStore, label_pooling
from dali_relabel.cli import main
from dali_relabel.labelmaps import LabelMapError, LabelMapWriter
from dali_relabel.tools.jobs import check_resumable
from script_runner import run_code, start_python


C, K, S = 6, 5, 15
CLASSES = [f"n{c:08d}" for c in range(C)]
CROPS_PER_IMAGE = 8


def official_map(gen: torch.Generator) -> torch.Tensor:
    """[2, K, S, S] float32 as released: top-k values (exact in fp16) and class indices."""
    indices = torch.rand(S, S, C, generator=gen).argsort(dim=-1)[..., :K].permute(2, 0, 1)
    values = (torch.randn(K, S, S, generator=gen) * 3).half().float()
    values = values.sort(dim=0, descending=True).values
    return torch.stack([values, indices.float()])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An ImageNet-like train folder and an official-like `.pt` tree: every image has its
    map except one, and one map has no image."""
    base = tmp_path_factory.mktemp("release")
    images, src = base / "train", base / "relabel"
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    maps = {}
    for c, wnid in enumerate(CLASSES):
        os.makedirs(images / wnid)
        os.makedirs(src / wnid)
        for i in range(2):
            name = f"{wnid}_{10 * c + i}"
            width, height = (int(v) for v in rng.integers(40, 120, size=2))
            Image.new("RGB", (width, height), (40 * c, 0, 0)).save(images / wnid / f"{name}.JPEG")
            if (c, i) == (4, 1):
                continue  # an image without a map
            maps[f"{wnid}/{name}.JPEG"] = official_map(gen)
            torch.save(maps[f"{wnid}/{name}.JPEG"], src / wnid / f"{name}.pt")
    torch.save(official_map(gen), src / CLASSES[2] / "n00000002_999.pt")  # no such image
    return images, src, maps


def official_targets(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """relabel_imagenet's relabel_batch_fn, written out: densify with scatter_, then
    roi_align on the coordinates (y1, x1, h, w) -> (y1, x1, y2, x2) exactly as handed over."""
    label_maps = torch.zeros(len(maps), C, S, S)
    for label_map, topk in zip(label_maps, maps):
        label_map.scatter_(0, topk[1].long(), topk[0])
    coords = coords.clone()
    coords[:, 2:] += coords[:, :2]
    boxes = torch.cat([torch.arange(len(maps)).view(-1, 1).float(),
                       coords * label_maps.size(3) - 0.5], 1)
    return torch.softmax(roi_align(label_maps, boxes, output_size=(1, 1)).squeeze(), 1)


def crops(images, paths, seed):
    """RandomResizedCropWithCoords coordinates (y1, x1, h, w) of a few crops per image, and
    the same crops as this project's boxes (x1, y1, x2, y2), made from the very same float32
    numbers (roi_align's sample count is ceil(box size), so one ulp can matter)."""
    torch.manual_seed(seed)
    coords, rows = [], []
    for row, path in enumerate(paths):
        image = Image.open(images / path)
        width, height = image.size
        for _ in range(CROPS_PER_IMAGE):
            i, j, h, w = RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
            coords.append([i / height, j / width, h / height, w / width])
            rows.append(row)
    coords = torch.tensor(coords)
    corners = coords.clone()
    corners[:, 2:] += corners[:, :2]  # (y1, x1, y2, x2), as the official code adds them
    return coords, corners[:, [1, 0, 3, 2]], torch.tensor(rows)


def test_official_layout_reproduces_official_targets(release, tmp_path, capsys):
    images, src, maps = release
    out = tmp_path / "relabel.h5"
    assert main(["import-pt", str(src), "--images", str(images), "--out", str(out),
                 "--num-workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "image without a map: n00000004/n00000004_41.JPEG" in printed
    assert "map without an image: n00000002/n00000002_999.pt" in printed
    assert "11 maps (layout official); 1 images without a map, 1 maps without an image" in printed

    store = LabelMapStore.open(out)
    assert store.paths == sorted(maps) and store.classes == CLASSES
    assert store.labels.tolist() == [int(path[1:9]) for path in store.paths]
    assert store.attrs["layout"] == "official"
    for row, path in enumerate(store.paths):  # the sizes the loader plans crops with
        width, height = Image.open(images / path).size
        assert store.sizes[row].tolist() == [height, width]
    given = torch.stack([maps[path] for path in store.paths])
    coords, boxes, rows = crops(images, store.paths, seed=0)
    want = official_targets(given[rows], coords)
    got = label_pooling(store.values, store.indices, boxes, num_classes=C, sample_index=rows)
    assert_close(got, want, atol=1e-5, rtol=0)

    # Layout hw stores the maps as given: the transpose of the official layout, and
    # different targets (the official code's boxes are transposed).
    hw = tmp_path / "hw.h5"
    assert main(["import-pt", str(src), "--images", str(images), "--out", str(hw),
                 "--layout", "hw"]) == 0
    hw_store = LabelMapStore.open(hw)
    assert torch.equal(hw_store.values.float(), given[:, 0])
    assert torch.equal(hw_store.indices.long(), given[:, 1].long())
    assert torch.equal(hw_store.values, store.values.transpose(2, 3))
    hw_targets = label_pooling(hw_store.values, hw_store.indices, boxes, num_classes=C,
                               sample_index=rows)
    assert (hw_targets - want).abs().max() > 0.05


def test_strict_and_bad_files(release, tmp_path, capsys):
    images, src, _ = release
    out = tmp_path / "relabel.h5"
    assert main(["import-pt", str(src), "--images", str(images), "--out", str(out),
                 "--strict"]) == 1
    err = capsys.readouterr().err
    assert "strict: 1 images without a map and 1 maps without an image" in err
    assert "n00000004/n00000004_41.JPEG" in err and not out.exists()

    bad = tmp_path / "bad"
    os.makedirs(bad / CLASSES[0])
    torch.save(torch.zeros(5, 15, 15), bad / CLASSES[0] / "n00000000_0.pt")
    torch.save(torch.stack([torch.zeros(K, S, S), torch.full((K, S, S), 7.0)]),
               bad / CLASSES[0] / "n00000000_1.pt")
    for name, message in (("n00000000_0.pt", "expected a tensor [2, K, H, W]"),
                          ("n00000000_1.pt", "class indices in [7, 7], expected [0, 6)")):
        assert main(["import-pt", str(bad), "--images", str(images), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{bad / CLASSES[0] / name}: {message}" in err, err
        os.remove(bad / CLASSES[0] / name)
    assert not out.exists() and not os.path.exists(f"{out}.partial")
    assert main(["import-pt", str(tmp_path / "nowhere"), "--images", str(images), "--out",
                 str(out)]) == 1
    assert "nowhere: not a directory" in capsys.readouterr().err


def test_interrupted_import_resumes(release, tmp_path, monkeypatch, caplog, capsys):
    images, src, _ = release
    out = tmp_path / "relabel.h5"
    monkeypatch.setattr(import_pt_module, "_CHUNK", 4)
    write = LabelMapWriter.write
    written = []

    def interrupted_write(self, rows, *rest, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.extend(rows.tolist())
        return write(self, rows, *rest, **kwargs)

    monkeypatch.setattr(LabelMapWriter, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        main(["import-pt", str(src), "--images", str(images), "--out", str(out),
              "--num-workers", "1"])
    assert written == [0, 1, 2, 3] and not out.exists()
    # Another layout would mix two kinds of maps: refused.
    assert main(["import-pt", str(src), "--images", str(images), "--out", str(out),
                 "--layout", "hw"]) == 1
    assert "layout='official' (now 'hw')" in capsys.readouterr().err

    def recording_write(self, rows, *rest, **kwargs):
        written.extend(rows.tolist())
        return write(self, rows, *rest, **kwargs)

    monkeypatch.setattr(LabelMapWriter, "write", recording_write)
    with caplog.at_level(logging.INFO, logger="dali_relabel"):
        assert main(["import-pt", str(src), "--images", str(images), "--out", str(out)]) == 0
    assert "resuming, 4 of 11 maps already imported" in caplog.text
    assert written == list(range(11))  # rows 0-3 once, then only the rest

    monkeypatch.setattr(LabelMapWriter, "write", write)
    reference = tmp_path / "reference.h5"
    assert main(["import-pt", str(src), "--images", str(images), "--out", str(reference)]) == 0
    resumed, uninterrupted = LabelMapStore.open(out), LabelMapStore.open(reference)
    assert resumed.paths == uninterrupted.paths
    assert torch.equal(resumed.values, uninterrupted.values)
    assert torch.equal(resumed.indices, uninterrupted.indices)


SMALL = (2, 3, 3)  # K, H, W of the small release


@pytest.fixture
def small_release(tmp_path):
    """Two class folders of three 16 x 12 JPEGs and the official-format .pt maps of every
    image, [2, 2, 3, 3]."""
    images, src = tmp_path / "train", tmp_path / "relabel"
    gen = torch.Generator().manual_seed(0)
    for c in range(2):
        os.makedirs(images / f"c{c}")
        os.makedirs(src / f"c{c}")
        for i in range(3):
            Image.new("RGB", (16, 12), (90 * c, 40, 0)).save(images / f"c{c}" / f"img_{i}.jpg")
            maps = torch.stack([torch.randn(*SMALL, generator=gen),
                                torch.randint(0, 2, SMALL, generator=gen).float()])
            torch.save(maps, src / f"c{c}" / f"img_{i}.pt")
    return images, src


IMPORT = "import sys; from dali_relabel.cli import main; sys.exit(main(sys.argv[1:]))"


def test_import_pt_under_a_file_size_limit(small_release, tmp_path):
    images, src = small_release
    args = ["import-pt", str(src), "--images", str(images), "--layout", "hw"]
    assert main([*args, "--out", str(tmp_path / "reference.h5")]) == 0
    out = tmp_path / "maps.h5"
    limited = run_code(IMPORT, *args, "--out", out, file_size_limit=12_000)
    assert limited.returncode == 1, (limited.returncode, limited.stderr[-2000:])
    errors = [line for line in limited.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no space left" in errors[0], limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    assert main([*args, "--out", str(out)]) == 0
    with LabelMapStore.open(out) as resumed, LabelMapStore.open(tmp_path / "reference.h5") as ref:
        assert resumed.paths == ref.paths and torch.equal(resumed.values, ref.values)


HOLD = textwrap.dedent("""
    import sys, time, h5py
    f = h5py.File(sys.argv[1], "r+")
    print("holding", flush=True)
    time.sleep(60)
""")


def test_a_locked_partial_is_reported_as_locked_not_damaged(small_release, tmp_path, capsys):
    images, src = small_release
    out = tmp_path / "maps.h5"
    partial = f"{out}.partial"
    geometry = dict(num_rows=6, num_classes=2, topk=SMALL[0], height=SMALL[1],
                    width=SMALL[2], classes=["c0", "c1"])
    LabelMapWriter(out, **geometry).close()
    holder = start_python(None, partial, code=HOLD, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        attempts = [
            lambda: LabelMapWriter(out, **geometry),
            lambda: check_resumable(partial, paths=[], identity={}),
            lambda: LabelMapStore.open(partial),
        ]
        for attempt in attempts:
            with pytest.raises(LabelMapError, match="is locked by another process") as error:
                attempt()
            assert partial in str(error.value) and "delete" not in str(error.value)
            assert "damaged" not in str(error.value)
        assert main(["import-pt", str(src), "--images", str(images), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "is locked by another process" in err and "delete" not in err
    finally:
        holder.kill()
        holder.wait()
    LabelMapWriter(out, **geometry).close()  # the lock went with its holder


# ---- 16. a rerun of a finished import says so; malformed maps name their file ------------

def test_rerun_of_a_finished_import_says_it_is_complete(small_release, tmp_path, capsys):
    images, src = small_release
    out = tmp_path / "maps.h5"
    args = ["import-pt", str(src), "--images", str(images), "--out", str(out)]
    assert main(args) == 0  # as if killed right after its output was renamed into place
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out == (f"{out}: complete from an earlier run of the same "
                                       f"import (6 maps, layout official); nothing to do\n")
    assert out.read_bytes() == before
    # Other settings, or another file: refused, saying why.
    assert main([*args, "--layout", "hw"]) == 1
    err = capsys.readouterr().err
    assert f"out: {out} exists and is not the finished output of this job" in err
    assert "layout='official' (now 'hw')" in err and "remove it" in err
    out.write_bytes(b"not a label-map file")
    assert main(args) == 1
    assert "corrupt or not a label-map file" in capsys.readouterr().err


def test_maps_without_classes_name_their_file(small_release, tmp_path, capsys):
    images, src = small_release
    torch.save(torch.zeros(2, 0, 3, 3), src / "c0" / "img_0.pt")
    assert main(["import-pt", str(src), "--images", str(images), "--out",
                 str(tmp_path / "maps.h5")]) == 1
    assert (f"{src / 'c0' / 'img_0.pt'}: expected a tensor [2, K, H, W] with K, H, W >= 1 (at "
            f"least one class per cell), found [2, 0, 3, 3]") in capsys.readouterr().err


def test_a_pt_file_that_is_not_a_regular_file_is_skipped(small_release, tmp_path, caplog):
    images, src = small_release
    os.remove(src / "c1" / "img_2.pt")
    os.mkfifo(src / "c1" / "img_2.pt")  # torch.load would wait on it forever
    with caplog.at_level(logging.WARNING, logger="dali_relabel"):
        assert main(["import-pt", str(src), "--images", str(images), "--out",
                     str(tmp_path / "maps.h5")]) == 0
    assert "skipped 1 .pt file(s) that cannot be read: 'c1/img_2.pt' (a FIFO" in caplog.text
    assert len(LabelMapStore.open(tmp_path / "maps.h5")) == 5


def test_bad_arguments_name_themselves(small_release, tmp_path):
    images, src = small_release
    out = tmp_path / "maps.h5"
    for kwargs, message in ((dict(layout="wh"), "layout must be one of ('official', 'hw'), "
                                                "got 'wh'"),
                            (dict(num_workers=0), "num_workers must be an int >= 1, got 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            import_pt_module.import_pt(src, images, out, **kwargs)
