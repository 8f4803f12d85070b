"""`dali-relabel verify` and what happens when a bad file reaches the decoder anyway."""
import os

import numpy as np
import pytest
from PIL import Image

import dali_relabel
from labelmap_data import make_label_maps
from dali_relabel.cli import main
from dali_relabel import ReLabelLoader
from dali_relabel.images.path_lists import read_path_list, write_bad_list
from dali_relabel.images.verify import verify_images
from jpeg_data import textured_image
from script_runner import run_python

GOOD = 9


@pytest.fixture
def damaged_dataset(tmp_path):
    """Good JPEGs plus a truncated one and a zero-byte one, all listed by a store."""
    root = tmp_path / "train"
    os.makedirs(root / "n01")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(GOOD):
        textured_image(rng, 160, 120).save(root / "n01" / f"good_{i}.JPEG", quality=90)
        paths.append(f"n01/good_{i}.JPEG")
    data = (root / "n01" / "good_0.JPEG").read_bytes()
    (root / "n01" / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (root / "n01" / "empty.JPEG").write_bytes(b"")
    paths[3:3] = ["n01/truncated.JPEG"]
    paths.append("n01/empty.JPEG")
    values, indices = make_label_maps(len(paths), 5, 10, seed=4)
    store = tmp_path / "maps.h5"
    dali_relabel.write_labelmaps(store, values, indices, np.zeros(len(paths), np.int64), paths,
                                 [f"c{c}" for c in range(10)])
    return root, store


def test_verify_names_truncated_and_empty_files(damaged_dataset, tmp_path, capsys):
    root, store = damaged_dataset
    bad = dict(verify_images(str(root), dali_relabel.LabelMapStore.open(store).paths,
                             batch_size=4, num_threads=2, progress=False))
    assert sorted(bad) == ["n01/empty.JPEG", "n01/truncated.JPEG"]
    assert "0 bytes" in bad["n01/empty.JPEG"]
    assert "decoding failed" in bad["n01/truncated.JPEG"]

    out = tmp_path / "bad.txt"
    assert main(["verify", str(root), "--labelmaps", str(store), "--out", str(out),
                 "--batch-size", "4"]) == 1
    printed = capsys.readouterr().out
    assert "bad: n01/truncated.JPEG" in printed and "2 bad" in printed
    assert sorted(read_path_list(out)) == ["n01/empty.JPEG", "n01/truncated.JPEG"]

    # The list is what the loader takes: training then runs on the good images only.
    loader = ReLabelLoader(root, store, 3, device="cpu", image_size=16, exclude=str(out),
                           return_meta=True, num_threads=1)
    rows = sorted(row for batch in loader for row in batch.sample_index.tolist())
    assert len(rows) == GOOD and 3 not in rows and GOOD + 1 not in rows


def test_verify_whole_tree_as_a_command(damaged_dataset, tmp_path):
    root, _ = damaged_dataset
    os.remove(root / "n01" / "empty.JPEG")
    out = tmp_path / "tree_bad.txt"
    result = run_python("dali_relabel.cli", "verify", root, "--out", out, module=True,
                        timeout=120)
    assert result.returncode == 1, result.stderr
    assert read_path_list(out) == ["n01/truncated.JPEG"]
    os.remove(root / "n01" / "truncated.JPEG")
    result = run_python("dali_relabel.cli", "verify", root, "--out", out, module=True,
                        timeout=120)
    assert result.returncode == 0 and read_path_list(out) == []
    assert f"verified {GOOD} images" in result.stdout


def test_bad_file_reaching_the_decoder_is_named(damaged_dataset):
    root, store = damaged_dataset
    loader = ReLabelLoader(root, store, 4, device="cpu", image_size=16, exclude=["n01/empty.JPEG"],
                           shuffle=False, num_threads=1)
    with pytest.raises(RuntimeError, match="truncated.JPEG(.|\n)*dali-relabel verify"):
        for _ in loader:
            pass


# ---- path lists: path TAB reason, '#' only starts comments ------------------------------

PATH_LISTS = [
    pytest.param("c00/img #7.JPEG\tempty file (0 bytes)\n", ["c00/img #7.JPEG"],
                 id="hash-in-file-name"),
    pytest.param("# made by verify\n\nc0/a.jpg\n c0/b.jpg\tx # y\n", ["c0/a.jpg", " c0/b.jpg"],
                 id="comment-blank-and-reason"),
    pytest.param("c0/a.jpg\r\n", ["c0/a.jpg"], id="crlf"),
    pytest.param("../secret.jpg\tbad\n", "line 1: not normalized", id="escaping-path"),
    pytest.param("c0/a.jpg\n/abs.jpg\n", "line 2: absolute path", id="absolute-path"),
]


@pytest.mark.parametrize("text, expected", PATH_LISTS)
def test_read_path_list(tmp_path, text, expected):
    path = tmp_path / "list.txt"
    path.write_bytes(text.encode())
    if isinstance(expected, list):
        assert read_path_list(str(path)) == expected
    else:
        with pytest.raises(ValueError, match=expected) as error:
            read_path_list(path)
        assert str(path) in str(error.value)


def test_read_path_list_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"cannot read the path list {tmp_path / 'no.txt'}"):
        read_path_list(tmp_path / "no.txt")
    assert read_path_list(None) == [] and read_path_list(["a/b.jpg"]) == ["a/b.jpg"]


def test_verify_list_round_trips_through_exclude(tmp_path, capsys):
    root = tmp_path / "train"
    os.makedirs(root / "c00")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "c00" / "good.JPEG")
    (root / "c00" / "img #7.JPEG").write_bytes(b"")
    out = tmp_path / "bad.txt"
    assert main(["verify", str(root), "--out", str(out), "--num-threads", "1"]) == 1
    assert "c00/img #7.JPEG\t" in out.read_text()
    assert read_path_list(str(out)) == ["c00/img #7.JPEG"]
    write_bad_list(str(out), [("c0/x.jpg", "two\nlines")])
    assert out.read_text().splitlines()[1] == "c0/x.jpg\ttwo lines"


# ---- 16. a name no list can hold does not stop the list ----------------------------------

def test_a_bad_file_whose_name_holds_a_newline_does_not_stop_the_list(tmp_path, capsys):
    root = tmp_path / "train"
    os.makedirs(root / "c0")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "c0" / "good.JPEG")
    (root / "c0" / "empty.JPEG").write_bytes(b"")
    (root / "c0" / "bad\nname.JPEG").write_bytes(b"")
    (root / "c0" / "esc\x1b[2J.JPEG").write_bytes(b"")
    out = tmp_path / "bad.txt"
    assert main(["verify", str(root), "--out", str(out), "--num-threads", "1"]) == 1
    assert read_path_list(out) == ["c0/empty.JPEG"]
    printed = capsys.readouterr().out
    assert "\x1b" not in printed
    assert "skipped: c0/bad\\nname.JPEG: a name no image list can hold" in printed
    assert "skipped: c0/esc\\x1b[2J.JPEG: a name no image list can hold" in printed
    assert printed.endswith(f"verified 2 images listed by the image files under {root}: 1 bad, "
                            f"listed in {out} (train with exclude='{out}'); 2 files skipped, "
                            f"no tool lists them\n")


def test_verify_names_bad_arguments(tmp_path, capsys):
    for option, value in (("--batch-size", "0"), ("--num-threads", "-2")):
        assert main(["verify", str(tmp_path), "--out", str(tmp_path / "bad.txt"), option,
                     value]) == 1
        assert f"error: {option} must be an int >= 1, got {value}" in capsys.readouterr().err
