"""The `dali-relabel` command line (dali_relabel.cli) across its commands: outputs checked
before any work, and every failure one line that names the file and the problem."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dali_relabel
from dali_relabel.cli import main
from script_runner import run_cli



@pytest.fixture
def release(tmp_path):
    """Two class folders of three JPEGs and official-format .pt maps of every image, and a
    label-map file of the images."""
    images, src = tmp_path / "train", tmp_path / "relabel"
    gen = torch.Generator().manual_seed(0)
    paths = []
    for c in range(2):
        os.makedirs(images / f"c{c}")
        os.makedirs(src / f"c{c}")
        for i in range(3):
            Image.new("RGB", (32, 24), (90 * c, 40, 0)).save(images / f"c{c}" / f"img_{i}.jpg")
            paths.append(f"c{c}/img_{i}.jpg")
            maps = torch.stack([torch.randn(2, 3, 3, generator=gen),
                                torch.randint(0, 2, (2, 3, 3), generator=gen).float()])
            torch.save(maps, src / f"c{c}" / f"img_{i}.pt")
    store = tmp_path / "maps.h5"
    dali_relabel.write_labelmaps(store, np.zeros((6, 2, 3, 3)), np.zeros((6, 2, 3, 3), np.int64),
                                 np.array([0, 0, 0, 1, 1, 1]), paths, ["c0", "c1"])
    return images, src, store


# ---- 14. outputs are checked before the work ---------------------------------------------

def test_output_paths_are_checked_before_any_work(release, tmp_path, capsys):
    images, src, store = release
    missing = tmp_path / "no" / "such" / "dir"
    cases = [
        (["import-pt", src, "--images", images, "--out", ""], "out: expected a file path"),
        (["import-pt", src, "--images", images, "--out", tmp_path], "is a folder"),
        (["import-pt", src, "--images", images, "--out", missing / "x.h5"], "does not exist"),
        (["annotate", "--model", "test_resnet", "--checkpoint", "none.pth", "--images", images,
          "--out", ""], "out: expected a file path"),
        (["verify", images, "--out", ""], "--out: expected a file path"),
        (["verify", images, "--out", missing / "bad.txt"], "does not exist"),
        (["show", store, "--images", images, "--index", "0", "--out", tmp_path],
         "is a folder"),
    ]
    for argv, message in cases:
        assert main([str(arg) for arg in argv]) == 1, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not os.path.exists(".partial") and not os.path.exists(tmp_path / ".partial")


# ---- 14. a full disk is one line: the file and "no space left" ---------------------------

def test_verify_out_on_a_full_disk(release, tmp_path):
    images, _, _ = release
    for i in range(40):  # bad files: a list longer than the limit
        (images / "c0" / f"empty_{i:02d}_{'x' * 40}.jpg").write_bytes(b"")
    out = tmp_path / "bad.txt"
    result = run_cli("verify", images, "--out", out, "--num-threads", "1", "--device", "cpu",
                     file_size_limit=1000)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"dali-relabel verify: error: {out}: writing failed: no space left on "
                      f"device (or the file-size limit)"], result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["maps.h5", "relabel", "train"]  # nothing left


def test_show_out_on_a_full_disk(release, tmp_path):
    images, _, store = release
    out = tmp_path / "row0.png"
    result = run_cli("show", store, "--images", images, "--index", "0", "--box", "0", "0", "1",
                     "1", "--out", out, file_size_limit=4000)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"dali-relabel show: error: {out}: writing failed: no space left on "
                      f"device (or the file-size limit)"], result.stderr[-2000:]
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


# ---- 8. folders the tools cannot list are named ------------------------------------------

def test_an_image_root_that_cannot_be_listed_is_named(release, tmp_path, capsys):
    images, src, store = release
    long = tmp_path / ("x" * 300)
    out = tmp_path / "out.h5"
    for argv in (["import-pt", src, "--images", long, "--out", out],
                 ["annotate", "--model", "test_resnet", "--checkpoint", "none.pth", "--images",
                  long, "--out", out],
                 ["verify", long, "--out", tmp_path / "bad.txt"]):
        assert main([str(arg) for arg in argv]) == 1
        err = capsys.readouterr().err
        assert err == (f"dali-relabel {argv[0]}: error: image_root: cannot list the folder "
                       f"'{long}' (File name too long)\n"), err
    assert main(["index", str(store), "--images", str(long)]) == 1
    err = capsys.readouterr().err
    assert "6 of 6 images under" in err and err.count("\n") == 1
    assert "'c0/img_0.jpg' (cannot read the image (File name too long))" in err
