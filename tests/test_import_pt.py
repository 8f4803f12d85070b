"""`dali-relabel import-pt`: official-format `.pt` maps written here are imported, and the
targets afterwards equal the official training code's on the official crop coordinates."""
import logging
import os

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
from dali_relabel.labelmaps.store import LabelMapWriter

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
